"""Prefect flows over the DVC pipeline.

This package only wires library calls (``trackflow``) into Prefect flows and tasks; it holds no
numerical logic, and the library never imports it. The training and batch-scoring flows are the
next milestone.
"""
