"""Tools for trying the service locally; nothing here is used by the service itself."""
