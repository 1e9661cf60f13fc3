-- Run by the postgres image on its first start (an empty data directory), after it made the `hokusai` role and
-- database: MLflow's tracking and registry store gets a database of its own on the same server, owned by the same
-- role (MLflow creates its tables there at its first start).
CREATE DATABASE mlflow OWNER hokusai;
