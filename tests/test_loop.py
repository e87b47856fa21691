"""The online-learning loop end to end: ``python -m flows.loop_demo --tiny`` (``make loop-demo``).

A copy of the project, a real ``prefect server start`` with a ``process`` worker and ``trackflow
serve``, four clients streaming requests. Drift found by batch scoring emits the event and the
server's automation starts the ``retrain`` deployment: before any label, the run stops and
registers nothing; after ``trackflow add-batch`` and the trigger's cool-down, the next drifted
batch's run retrains, the gate promotes and the service follows. Tiny settings (a few epochs, no
accuracy floors): the wiring and the order, not the accuracy targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow

TIMEOUT_S = 900  # ~4 min on two idle cores; the demo's own steps give up earlier
ORDER = [
    "champion",
    "service ready",
    "drift before labels",
    "retrain without new labels",
    "batch added",
    "drift detected",
    "retrain started",
    "version promoted",
    "new version answered",
]


def test_drift_starts_a_retraining_the_gate_promotes_and_the_service_answers_with_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "loop.json"
    argv = [sys.executable, "-m", "flows.loop_demo", "--tiny", "--workdir", str(tmp_path / "w")]
    argv += ["--add-rows", "400", "--stream-rows", "200", "--holdout-rows", "300"]
    argv += ["--cooldown", "20", "--timeout", "600", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())

    at = {step["step"]: step["at"] for step in result["steps"]}
    assert set(at) == {*ORDER, "retrain finished"}, done.stdout[-3000:]
    assert [at[step] for step in ORDER] == sorted(at[step] for step in ORDER), done.stdout[-3000:]
    # the register stage moves the alias before the run ends; the service may answer before too
    assert at["retrain started"] < at["version promoted"] < at["retrain finished"]

    no_labels = result["no_labels_run"]  # the first event's run: it stops, registering nothing
    assert no_labels["state"] == "Completed"
    assert no_labels["message"].startswith("no new labelled rows since champion v1")
    assert no_labels["versions_after"] == no_labels["versions_before"] == ["1"]

    assert Path(no_labels["drifted_batch"]).name == "early.csv"  # started by the first event
    assert result["drift"]["detected"] and result["drift"]["rules_fired"]
    retrain = result["retrain_run"]  # started by the second batch's event, after the cool-down
    assert Path(retrain["drifted_batch"]).name == "stream.csv" and retrain["drift_event_id"]
    before, after = result["versions"]["before"], result["versions"]["after"]
    assert (before, after) == ("1", "2")  # the event's run registered and promoted version 2
    assert result["failed_requests"] == []  # not one failed request while the alias moved
    assert result["versions_answered"] == [before, after]
    assert result["answers"] > 50
    accuracy = result["accuracy_shifted"]
    assert accuracy["before"]["versions"] == [before] and accuracy["after"]["versions"] == [after]
    assert accuracy["after"]["accuracy"] > accuracy["before"]["accuracy"]
