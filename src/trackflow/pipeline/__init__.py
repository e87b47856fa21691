"""Driving the DVC pipeline stage by stage (what the Prefect flows wire), and its reports."""
