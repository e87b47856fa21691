"""Data in: reading, checking and profiling tables, splitting them, preprocessing, and drift."""
