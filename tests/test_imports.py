"""Startup time is part of every `dvc repro`: stages import only what they use."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "lightning", "mlflow", "prefect", "matplotlib")

PROBE = """
import json, sys
from trackflow.stages.ingest import main as ingest
from trackflow.stages.split import main as split
assert ingest(["--params", sys.argv[1], "--out", "ingested"]) == 0
assert split(["--params", sys.argv[1], "--dataset", "ingested/dataset.parquet", "--out", "s"]) == 0
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def test_ingest_and_split_import_no_heavy_library(write_params, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), str(write_params())],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_the_library_and_the_command_line_import_without_heavy_libraries() -> None:
    code = (
        "import sys, trackflow.cli, trackflow.config, trackflow.data.ingest, trackflow.data.split, "
        "trackflow.data.preprocessing, trackflow.tracking, trackflow.io, trackflow.registry.gate, "
        "trackflow.registry.promotion, trackflow.registry.lineage, trackflow.data.inputs, "
        "trackflow.data.drift; "
        "trackflow.cli.build_parser(); "
        "print([m for m in ('prefect', 'torch', 'mlflow', 'fastapi') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
