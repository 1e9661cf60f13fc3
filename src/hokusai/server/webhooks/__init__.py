"""Webhook subscriptions and their deliveries: signed (Standard Webhooks), retried, leased across processes."""
