"""Batching concurrent requests: one client's bad numbers fail only that client."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import numpy as np
import pytest
import requests

from tests.helpers import (
    PREDICTIONS,
    Candidate,
    row_dicts,
    training_rows,
)
from trackflow.registry.packaging import Scorer
from trackflow.serving.batching import Batcher
from trackflow.serving.model import ServedModel


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_batch_that_fails_is_scored_request_by_request(
    candidates: dict[str, Candidate], caplog: pytest.LogCaptureFixture
) -> None:
    """A request whose rows fail in scoring fails alone; the requests batched with it answer.

    The poisoned rows skip the checks (they go to the batcher directly), so scoring them meets a
    real fault: 1e50 overflows float32 in the network and the detector refuses the NaN.
    """
    files = candidates["good"].files
    scorer = Scorer.from_files(files["preprocessor"], files["model"], files["detector"])
    served = ServedModel("m", "1", None, "", scorer, {}, "now")
    rows = scorer.check(training_rows(candidates["good"]).head(8)).to_numpy()
    valid = [rows[start : start + 2] for start in range(0, 8, 2)]
    poisoned = np.full((1, rows.shape[1]), 1e50)
    with pytest.raises(ValueError):
        served.score(poisoned)
    batcher = Batcher(max_rows=100)

    async def score_together() -> list[Any]:
        requests_ = [valid[0], poisoned, *valid[1:]]
        calls = [batcher.score(served, values) for values in requests_]
        return await asyncio.gather(*calls, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="trackflow.serving.batching"):
        answers = asyncio.run(score_together())

    assert "a batch of 5 requests failed; scoring them one by one" in caplog.text
    assert isinstance(answers[1], ValueError)
    assert [answers[0], *answers[2:]] == [served.score(values) for values in valid]


@pytest.mark.slow
def test_a_client_sending_huge_numbers_fails_alone_beside_valid_clients(
    open_server, registry
) -> None:
    """Four clients send valid rows while a fifth sends 1e308 and 1e30 rows: only it fails."""
    reference = open_server.predict(registry.rows.head(3)).json()["predictions"]
    huge = [registry.rows.head(3) * 0 + value for value in (1e308, 1e30)]
    bodies = {
        "valid": json.dumps({"rows": row_dicts(registry.rows, 3)}).encode(),
        "poisoned": [json.dumps({"rows": row_dicts(rows, 3)}).encode() for rows in huge],
    }
    answers: dict[str, list[tuple[int, Any]]] = {"valid": [], "poisoned": []}
    stop = threading.Event()
    url = f"http://127.0.0.1:{open_server.port}{PREDICTIONS}"

    def client(kind: str) -> None:
        session = requests.Session()
        count = 0
        while not stop.is_set():
            body = bodies[kind] if kind == "valid" else bodies[kind][count % 2]
            response = session.post(url, data=body, timeout=30)
            answers[kind].append((response.status_code, response.json()))
            count += 1

    clients = [threading.Thread(target=client, args=(kind,)) for kind in ["valid"] * 4]
    clients.append(threading.Thread(target=client, args=("poisoned",)))
    for thread in clients:
        thread.start()
    time.sleep(3.0)
    stop.set()
    for thread in clients:
        thread.join()

    assert len(answers["valid"]) > 20 and len(answers["poisoned"]) > 5
    assert {status for status, _ in answers["valid"]} == {200}
    for _, body in answers["valid"]:  # batched with others: equal up to float32 rounding
        got = body["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in reference]
        np.testing.assert_allclose(
            [p["anomaly_score"] for p in got], [p["anomaly_score"] for p in reference], rtol=1e-5
        )
    assert {status for status, _ in answers["poisoned"]} == {422}
    assert all(
        body["message"].startswith("values out of the model's range at row 0 column pixel_0_0")
        for _, body in answers["poisoned"]
    )
