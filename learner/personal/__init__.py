"""Personal versions: a user's own head on the active global version (model), how it is trained
(training) and the round that trains, gates and registers it (rounds)."""
