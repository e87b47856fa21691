"""The documented params fragments under ``examples/`` stay valid as the params evolve."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT
from trackflow.config import flatten, load_params

EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/*.yaml: the documented configurations for other data are missing"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_merges_into_valid_params(example: Path) -> None:
    fragment = yaml.safe_load(example.read_text(encoding="utf-8"))
    params = load_params(REPO_ROOT / "params.yaml", overrides=flatten(fragment))
    merged = params.model_dump(mode="json")
    for key, value in flatten(fragment).items():
        node = merged
        for part in key.split("."):
            node = node[part]
        assert node == (list(value) if isinstance(value, tuple) else value), key
