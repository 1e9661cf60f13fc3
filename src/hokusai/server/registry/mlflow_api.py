"""Kept for importers of the old place: MlflowApi (one MLflow call, errors mapped) lives in mlflow/registry_client.py,
beside the typed RegistryClient built on it."""

from hokusai.server.mlflow.registry_client import DATABASE_ERROR, ConcurrentChange, MlflowApi

__all__ = ["DATABASE_ERROR", "ConcurrentChange", "MlflowApi"]
