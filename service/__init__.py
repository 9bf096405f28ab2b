"""Everything that answers requests: the CLI now, the HTTP API next."""
