"""The /models/* domain: model versions in the MLflow registry, as the API reference shapes them."""
