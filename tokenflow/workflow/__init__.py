"""Workflow: durable stages, content hashes, lineage and MLflow tracking."""
