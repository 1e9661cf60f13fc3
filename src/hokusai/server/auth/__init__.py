"""API keys: format, storage, validation and the FastAPI dependencies that enforce them."""
