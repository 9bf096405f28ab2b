"""Alembic environment and versions: the only way emoloop's schema is made (storage.migrate)."""
