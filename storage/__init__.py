"""Everything persisted: the SQL store and the artifact store."""
