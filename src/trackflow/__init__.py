"""trackflow: a reproducible, tracked path from raw data to a served model."""

__version__ = "0.1.0"
