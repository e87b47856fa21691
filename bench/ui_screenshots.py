"""Screenshots of the MLflow UI as a user sees it: runs table, charts, compare view, scoring runs.

Checks by eye what the tests check on the store: that candidates of different transfer modes can be
told apart in MLflow's own UI (run names, descriptions, the same metric keys), and that scored
batches sit in their own experiment. It

1. runs the pipeline's own stages in a work folder with its own SQLite store: ingest -> split ->
   preprocess -> pretrain, then train -> evaluate -> anomaly -> register once per transfer mode
   (``--epochs`` each, PCA to 16 components, one anomaly detector: about a minute here), and
   scores two batches with ``trackflow score``: the target test rows, and the same rows plus
   N(0, 3) noise clipped to 0..16 (the batch that must be flagged as drifted);
2. starts ``mlflow server --workers 1`` on that store, on loopback only;
3. takes headless Chromium screenshots (Debian: ``apt-get install -y chromium``) of the candidates'
   runs table and charts, the compare view of the candidates, the scoring experiment's runs table,
   the registered version's page (its "Source run"), and a sweep of 8 trials (``trackflow sweep``):
   its runs, nested under the parent, and the parent run's page.

    python bench/ui_screenshots.py --out /tmp/ui           # PNGs and the store's folder path
    python bench/ui_screenshots.py --out /tmp/ui --store /tmp/ui/store --skip-runs  # again

The PNGs are written to ``--out``; they are not meant to be committed. Nothing leaves the machine:
the server listens on 127.0.0.1 and Chromium runs with networking features off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from common import REPO, run, set_params

MODES = ("finetune", "feature_extraction", "scratch")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def build_store(folder: Path, epochs: int) -> None:
    """Run the pipeline once per transfer mode and score two batches, in ``folder``."""
    from trackflow.config import set_dotted

    folder.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides = {
        "base.mlflow.tracking_uri": f"sqlite:///{folder.absolute()}/mlflow.db",
        "base.mlflow.artifact_location": str(folder.absolute() / "artifacts"),
        "preprocess.pca.n_components": 16,
        "model.widths": [64],
        "pretrain.max_epochs": epochs,
        "train.max_epochs": epochs,
        "anomaly.detectors": ["knn"],
        "evaluate.baselines": False,
        "promotion.min_accuracy": 0.5,  # a candidate of a few epochs can become champion
        "promotion.min_anomaly_auroc": 0.5,
    }
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the params' store, not the caller's
    os.chdir(folder)
    run("ingest", "split", "preprocess", "pretrain")
    for mode in MODES:
        set_params(folder, {"train.mode": mode})
        run("train", "evaluate", "anomaly", "register")
    score_batches(folder)
    sweep(folder)


def sweep(folder: Path) -> None:
    """A small sweep with ``trackflow sweep``: a parent run and its trials, nested."""
    from trackflow.cli import main as cli

    if cli(["sweep", "--params", "params.yaml", "--n-trials", "8", "--study", "ui-sweep"]) != 0:
        sys.exit(f"the sweep in {folder} failed")


def score_batches(folder: Path) -> None:
    """Score the target test rows, clean and with N(0, 3) noise, with ``trackflow score``."""
    import numpy as np
    import pandas as pd

    from trackflow.cli import main as cli

    rows = pd.read_parquet(folder / "data/split/target_test.parquet").drop(columns="target")
    noisy = (rows + np.random.default_rng(6).normal(0, 3, rows.shape)).clip(0, 16)
    for name, frame in (("test_rows", rows), ("noisy_rows", noisy)):
        frame.to_csv(folder / f"{name}.csv", index=False)
        if cli(["score", str(folder / f"{name}.csv"), "--params", "params.yaml"]) != 0:
            sys.exit(f"scoring {name} failed")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_server(store: Path, port: int, log: Path) -> Iterator[str]:
    """``mlflow server`` on the store, one worker, loopback only; yields its base URL."""
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{store.absolute()}/mlflow.db"]
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    """Wait for the server's ``/health`` to answer; fail if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"mlflow server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    sys.exit(f"mlflow server did not answer within {timeout_s:.0f} s")


def api(url: str, path: str, body: dict | None = None) -> dict:
    """One call of the server's REST API (GET, or POST with a JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def pages(url: str, experiment: str) -> dict[str, str]:
    """The UI pages to capture, by file name: what a user opens to compare candidates."""
    name = urllib.parse.quote(experiment)
    candidates = api(url, f"experiments/get-by-name?experiment_name={name}")["experiment"]
    scoring = api(url, f"experiments/get-by-name?experiment_name={name}-scoring")["experiment"]
    found = api(url, "runs/search", {"experiment_ids": [candidates["experiment_id"]]})
    trained = [
        r["info"]["run_id"] for r in found["runs"] if r["info"]["run_name"].startswith("train-")
    ]
    sweep_run = next(
        r["info"]["run_id"] for r in found["runs"] if r["info"]["run_name"] == "sweep-ui-sweep"
    )
    scored = api(url, "runs/search", {"experiment_ids": [scoring["experiment_id"]]})["runs"]
    noisy = next(r["info"]["run_id"] for r in scored if "noisy" in r["info"]["run_name"])
    runs = urllib.parse.quote(json.dumps(trained))
    ids = urllib.parse.quote(json.dumps([candidates["experiment_id"]]))
    experiment_page = f"{url}/#/experiments/{candidates['experiment_id']}/runs"
    scoring_page = f"{url}/#/experiments/{scoring['experiment_id']}/runs"
    return {
        "runs_table.png": f"{experiment_page}?compareRunsMode=TABLE",
        "runs_charts.png": f"{experiment_page}?compareRunsMode=CHART",
        "compare_runs.png": f"{url}/#/compare-runs?runs={runs}&experiments={ids}",
        "candidate_run.png": f"{experiment_page}/{trained[-1]}",
        "model_version.png": f"{url}/#/models/trackflow/versions/1",
        "scoring_runs.png": scoring_page,
        "scoring_run_noisy.png": f"{scoring_page}/{noisy}",
        "sweep_runs.png": f"{experiment_page}?searchFilter="
        + urllib.parse.quote("tags.`trackflow.sweep.study` = 'ui-sweep'"),
        "sweep_run.png": f"{experiment_page}/{sweep_run}",
    }


def screenshot(chromium: str, page: str, png: Path, budget_ms: int) -> None:
    """One headless Chromium screenshot of ``page``, given ``budget_ms`` of virtual time."""
    with tempfile.TemporaryDirectory(prefix="trackflow-chromium-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        command += [f"--screenshot={png}", "--window-size=1600,1000"]
        command += [f"--virtual-time-budget={budget_ms}", page]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if result.returncode != 0 or not png.is_file():
        sys.exit(f"chromium failed on {page}: {result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--store", type=Path, help="work folder of the runs (default: OUT/store)")
    parser.add_argument("--skip-runs", action="store_true", help="reuse the runs in --store")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each training stage")
    parser.add_argument("--budget-ms", type=int, default=15000, help="Chromium's virtual time")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (Debian: apt-get install -y chromium)")
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    store = (args.store or out / "store").absolute()
    if not args.skip_runs:
        build_store(store, args.epochs)
    experiment = yaml.safe_load((store / "params.yaml").read_text())["base"]["mlflow"]
    with mlflow_server(store, free_port(), out / "mlflow_server.log") as url:
        for name, page in pages(url, experiment["experiment_name"]).items():
            screenshot(chromium, page, out / name, args.budget_ms)
            print(f"{out / name}: {page}")
    print(f"store: {store}")


if __name__ == "__main__":
    main()
