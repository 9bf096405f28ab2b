"""The emotion model and everything that changes it."""
