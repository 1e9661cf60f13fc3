"""Model lifecycle events: derived from MLflow's registry (the source of truth), kept in an outbox table, served by
GET /api/v1/events, published to a Redis stream and delivered to webhooks (hokusai.server.webhooks)."""
