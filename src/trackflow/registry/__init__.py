"""The MLflow model registry: URIs, the packaged model, the gate, promotion and lineage."""
