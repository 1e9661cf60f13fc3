"""Health, readiness, liveness, version and metrics endpoints."""
