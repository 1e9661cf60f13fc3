"""Per-key rate limits (default, per-key override, per-route policies) and failed-auth limits per address."""
