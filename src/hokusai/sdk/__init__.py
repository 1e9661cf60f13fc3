"""The Python SDK: typed clients for the Hokusai Registry API (httpx only; nothing server-side)."""
