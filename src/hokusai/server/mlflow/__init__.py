"""Everything that talks to MLflow: the upstream client, the embedded server supervisor and its launcher."""
