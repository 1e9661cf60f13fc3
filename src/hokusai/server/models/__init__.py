"""Model files and the isolated worker processes that load and run model code (never the API process)."""
