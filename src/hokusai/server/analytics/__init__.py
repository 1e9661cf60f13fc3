"""Model analytics: compare, evaluate, predict, metrics, lineage, contributors and their impact."""
