"""Prefect flows over the DVC pipeline: ``flows.training`` and ``flows.scoring``.

This package only wires library calls (``trackflow``; :mod:`trackflow.pipeline.driver` drives DVC)
into Prefect flows and tasks; it holds no numerical logic, and the library never imports it.

Importing it sets two Prefect defaults this machine needs, unless already set: a 120 s start
timeout for Prefect's temporary local server (its first start takes ~19 s here, over the 20 s
default) and no analytics.
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
