"""Local services for a team: PostgreSQL, an MLflow tracking server, a Prefect server, workers."""
