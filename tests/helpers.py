"""Plain helpers shared by the test modules (fixtures live in ``conftest.py``).

Test modules import from here, never from each other or from ``conftest``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pandas as pd
import pytest
import requests
import yaml

from trackflow.config import set_dotted

if TYPE_CHECKING:
    from trackflow.tracking import Tracking

REPO_ROOT = Path(__file__).resolve().parents[1]

# Training that tests the wiring, not the accuracy: every test that trains through params.yaml
# starts from these (the ``fast_params`` fixture, or ``project_params`` for a repository's copy).
FAST_TRAINING: dict[str, Any] = {"pretrain.max_epochs": 2, "train.max_epochs": 2}
#: Gate floors every candidate passes: for tests of the registry's mechanics, not of the floors.
LOW_FLOORS: dict[str, Any] = {"promotion.min_accuracy": 0.0, "promotion.min_anomaly_auroc": 0.0}


# --- params.yaml ---------------------------------------------------------------------------------


def project_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repository's ``params.yaml``, parsed, with dotted ``overrides`` set by ``set_dotted``."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return raw


def write_project_params(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write the repository's ``params.yaml`` with ``overrides`` to ``path``; return ``path``."""
    path.write_text(yaml.safe_dump(project_params(overrides), sort_keys=False))
    return path


# --- the project's stages ------------------------------------------------------------------------


def copy_project(destination: Path) -> None:
    """Copy what a pipeline run needs (code, dvc.yaml, params, DVC config) into ``destination``."""
    names = ("src", "data/raw", "data/batches/README.md", ".dvc/config", "dvc.yaml", "params.yaml")
    for name in (*names, ".gitignore"):
        source = REPO_ROOT / name
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def prefect_deployment(name: str) -> tuple[dict[str, Any], Any]:
    """``prefect.yaml``'s deployment ``name``, and the flow its entrypoint loads."""
    from prefect.flows import load_flow_from_entrypoint

    deployments = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    (deployment,) = [d for d in deployments if d["name"] == name]
    cwd = Path.cwd()
    os.chdir(REPO_ROOT)  # entrypoints are relative to the project
    try:
        return deployment, load_flow_from_entrypoint(
            deployment["entrypoint"], use_placeholder_flow=False
        )
    finally:
        os.chdir(cwd)


def train_argv(params: Path, data: Path, backbone: str = "backbone.pt") -> list[str]:
    """Arguments of the train stage: model.pt, train.json, train_run.json, train_history.csv."""
    return [
        "--params",
        str(params),
        "--data",
        str(data),
        "--backbone",
        backbone,
        "--model-out",
        "model.pt",
        "--metrics",
        "train.json",
        "--run-out",
        "train_run.json",
        "--history",
        "train_history.csv",
    ]


def pretrain_argv(params: Path, data: Path) -> list[str]:
    """Arguments of the pretrain stage, writing backbone.pt, pretrain.json, pretrain_run.json."""
    return [
        "--params",
        str(params),
        "--data",
        str(data),
        "--backbone-out",
        "backbone.pt",
        "--metrics",
        "pretrain.json",
        "--run-out",
        "pretrain_run.json",
    ]


def run_data_stages(params: Path) -> int:
    """ingest -> split -> preprocess into the working directory; the first non-zero exit code."""
    from trackflow.stages.ingest import main as ingest
    from trackflow.stages.preprocess import main as preprocess
    from trackflow.stages.split import main as split

    steps = (
        (ingest, ["--out", "ingested"]),
        (split, ["--dataset", "ingested/dataset.parquet", "--out", "split"]),
        (
            preprocess,
            [
                "--splits",
                "split",
                "--out",
                "processed",
                "--preprocessor",
                "models/preprocessor.joblib",
                "--metrics",
                "metrics/preprocess.json",
                "--plots",
                "plots",
            ],
        ),
    )
    for stage, argv in steps:
        if code := stage(["--params", str(params), *argv]):
            return code
    return 0


#: Set by .ci/run: a test needing the services fails, not skips, when they cannot run.
REQUIRE_SERVICES_ENV = "TRACKFLOW_REQUIRE_SERVICES"


def services_missing(message: str) -> NoReturn:
    """Skip the test that needs the services, saying how to run them; fail instead under CI,
    where a skip would hide that the services tests tested nothing."""
    if os.environ.get(REQUIRE_SERVICES_ENV) == "1":
        pytest.fail(message)
    pytest.skip(message)


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a server process started by a test; kill it if it does not exit in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dvc(*args: str, cwd: Path) -> str:
    """Run ``dvc`` with the test interpreter; it must succeed. Returns its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=True
    )
    return result.stdout


# --- trained candidates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A trained target model with its detector, as the train and anomaly stages leave them."""

    folder: Path
    processed: Path

    @property
    def files(self) -> dict[str, Path]:
        """The pipeline's paths to this candidate's inputs and outputs, by register-stage flag."""
        data = self.processed.parent
        return {
            "splits": data / "split",
            "data": self.processed,
            "preprocessor": data / "models/preprocessor.joblib",
            "model": self.folder / "model.pt",
            "detector": self.folder / "detector.joblib",
            "run": self.folder / "train_run.json",
        }


def candidate_store_uri(root: Path) -> str:
    """The MLflow store the session's candidates were trained in."""
    return f"sqlite:///{root}/mlflow.db"


def raw_rows(candidate: Candidate, part: str) -> pd.DataFrame:
    """The candidate's raw target rows of a split part, with their ``target`` label."""
    from trackflow.io import read_table

    return read_table(candidate.files["splits"] / f"target_{part}.parquet")


def register_champion(candidate: Candidate, name: str) -> tuple[Tracking, str]:
    """Log the candidate as a packaged model, register it as ``name`` and make it champion.

    Returns the candidate store's tracking and the version registered.
    """
    from trackflow.config import load_params
    from trackflow.io import read_json
    from trackflow.registry.packaging import log_packaged_model
    from trackflow.tracking import setup_tracking

    tracking = setup_tracking(load_params(candidate.folder / "params.yaml").base.mlflow)
    files = candidate.files
    run_id = read_json(files["run"])["run_id"]
    features = raw_rows(candidate, "train").drop(columns="target")
    info = log_packaged_model(
        tracking, run_id, files["preprocessor"], files["model"], files["detector"],
        features.head(5), features,
    )  # fmt: skip
    client = tracking.client
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=info.model_uri, run_id=run_id, model_id=info.model_id
    ).version
    client.set_registered_model_alias(name, "champion", version)
    return tracking, str(version)


def imputing_twin(scorer: Any, rows: Any) -> Any:
    """A Scorer like ``scorer`` whose preprocessor, fitted on ``rows``, imputes missing values."""
    from trackflow.config import PreprocessConfig
    from trackflow.data.preprocessing import fit_preprocessor
    from trackflow.registry.packaging import Scorer

    config = PreprocessConfig(pca={"n_components": scorer.preprocessor[-1].n_components_})
    return Scorer(
        preprocessor=fit_preprocessor(rows, config, impute=True, seed=0),
        network=scorer.network,
        detector=scorer.detector,
        columns=scorer.columns,
        classes=scorer.classes,
    )


def race_two_promotions(
    tracking: Tracking,
    name: str,
    candidates: dict[str, Candidate],
    params: Path,
    run_ids: dict[str, str] | None = None,
) -> None:
    """Register ``weak`` then ``good`` as versions 1 and 2 of ``name``, promote both at once with
    two ``trackflow promote`` processes, and check that the lock serialised them.

    Both succeed; exactly one promotion is a "first model"; the ledger is numbered without a gap;
    ``champion`` is version 2 in the alias and in the ledger; the lock model is gone. The
    processes inherit this process's environment, so use the store ``tracking`` uses.

    Args:
        tracking: The store holding the registry.
        name: A model name no other test uses (``params`` names it as ``model.name``).
        candidates: The session's trained candidates.
        params: A params file with ``model.name`` = ``name`` and floors every candidate passes.
        run_ids: The run to log each candidate into, by kind (default: its training run).
    """
    from trackflow.registry.gate import seen_rows
    from trackflow.registry.promotion import (
        LOCK_SUFFIX,
        alias_version,
        champion_stack,
        ledger,
        record_seen_rows,
        register_candidate,
    )

    for kind in ("weak", "good"):
        candidate = candidates[kind]
        rows = raw_rows(candidate, "test").drop(columns="target")
        logged = packaged_model(tracking, candidate, rows, run_id=(run_ids or {}).get(kind))
        seen = seen_rows(candidate.files["splits"], "target", list(rows.columns))
        record_seen_rows(tracking, logged["run_id"], seen)
        source, run_id, model_id = logged["source"], logged["run_id"], logged["model_id"]
        register_candidate(tracking, name, source, run_id, model_id, {}, 60)
    cli = [sys.executable, "-m", "trackflow.cli", "promote", "--params", str(params)]
    cli += ["--splits", str(candidates["good"].files["splits"])]
    racers = [
        subprocess.Popen(
            [*cli, "--version", v], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for v in ("1", "2")
    ]
    outputs = [p.communicate(timeout=300) for p in racers]
    assert all(p.returncode == 0 for p in racers), outputs
    waited = [err for _, err in outputs if f"waiting for the lock {name}{LOCK_SUFFIX}" in err]
    assert len(waited) == 1, outputs  # they did race: one held the lock while the other asked

    client = tracking.client
    entries = ledger(client, name)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    promotions = [e for e in entries if e.action == "promote"]
    firsts = [e for e in promotions if e.reason.startswith("first model")]
    assert len(firsts) == 1  # the second racer saw the first one's champion
    assert champion_stack(entries)[-1] == alias_version(client, name) == "2"
    assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")


# --- a toy DVC pipeline for the flows ------------------------------------------------------------

TOY_STAGES = """
stages:
  report:          # listed first, runs last: the order comes from the dependencies
    cmd: python toy.py report
    deps: [toy.py, metrics/evaluate.json]
    outs: [report.txt]
  evaluate:
    cmd: python toy.py evaluate
    deps: [toy.py, models/train_run.json]
    params: [evaluate.calibration_bins]
    metrics: [metrics/evaluate.json]
  train:
    cmd: python toy.py train
    deps: [toy.py, data.txt]
    params: [train.mode]
    outs: [models/train_run.json]
  prepare:
    cmd: python toy.py prepare
    deps: [toy.py]
    outs: [data.txt]
"""

TOY_SCRIPT = """
import json, os, sys
from pathlib import Path

import yaml

step = sys.argv[1]
raw = yaml.safe_load(Path("params.yaml").read_text())
if step == "prepare":
    Path("data.txt").write_text("rows")
elif step == "train":  # an MLflow run, like the real train stage
    from trackflow.config import load_params
    from trackflow.registry.lineage import run_tags
    from trackflow.tracking import setup_tracking

    params = load_params("params.yaml")  # tagged as the real stages are: flow run id included
    tracking = setup_tracking(params.base.mlflow)
    run = tracking.client.create_run(
        tracking.experiment_id, run_name="train", tags=run_tags(params)
    )
    run_id = run.info.run_id
    tracking.client.log_param(run_id, "train.mode", params.train.mode)
    tracking.client.set_terminated(run_id)
    Path("models").mkdir(exist_ok=True)
    flow_run = os.environ.get("TRACKFLOW_FLOW_RUN_ID")
    run = {"run_id": run_id, "experiment_id": tracking.experiment_id, "flow_run_id": flow_run}
    Path("models/train_run.json").write_text(json.dumps(run))
elif step == "evaluate":
    if raw["evaluate"]["calibration_bins"] == 3:
        sys.exit(print("error: three bins cannot hold these rows", file=sys.stderr) or 3)
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/evaluate.json").write_text(json.dumps({"test": {"accuracy": 0.9}}))
else:
    Path("report.txt").write_text(Path("metrics/evaluate.json").read_text())
"""


def make_toy_repo(repo: Path) -> Path:
    """A four-stage DVC pipeline (``TOY_STAGES``) in ``repo``, with the project's params.yaml."""
    repo.mkdir()
    dvc("init", "--no-scm", "-q", cwd=repo)
    (repo / "dvc.yaml").write_text(TOY_STAGES)
    (repo / "toy.py").write_text(TOY_SCRIPT)
    (repo / "params.yaml").write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    return repo


# --- the REST service ----------------------------------------------------------------------------

TOKEN = "test-token-0123"
MAX_ROWS = 50
MAX_BODY_MB = 0.1  # 104,857 bytes: 50 rows of 64 columns fit (~52 kB)
POLL_S = 3.0  # poll interval of the server whose alias moves
OPEN_MODEL = "serving-open"  # the model the ``open_server`` fixture serves
PREDICTIONS = f"/models/{OPEN_MODEL}/predictions"


@dataclass(frozen=True)
class Registry:
    """Packaged models logged once, registered under each server's own model name."""

    tracking: Tracking
    uri: str
    rows: pd.DataFrame  # raw target test rows, features only
    sources: dict[str, dict[str, Any]]  # kind -> create_model_version arguments

    def register(self, name: str, *kinds: str) -> list[str]:
        client = self.tracking.client
        client.create_registered_model(name)
        with pytest.MonkeyPatch.context() as patch:  # MLflow finds logged models by the global URI
            patch.setenv("MLFLOW_TRACKING_URI", self.uri)
            return [
                str(client.create_model_version(name, **self.sources[kind]).version)
                for kind in kinds
            ]

    def promote(self, name: str, version: str) -> None:
        self.tracking.client.set_registered_model_alias(name, "champion", version)


@dataclass
class Server:
    """A ``trackflow serve`` process on loopback serving ``name``, and a client for it."""

    name: str
    port: int
    process: subprocess.Popen
    log: Path
    token: str | None = None

    def request(self, method: str, path: str, auth: bool = True, **kwargs: Any):
        headers = dict(kwargs.pop("headers", {}))
        if auth and self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        url = f"http://127.0.0.1:{self.port}{path}"
        return requests.request(method, url, headers=headers, timeout=30, **kwargs)

    def predict(self, rows: pd.DataFrame, **kwargs: Any):
        body = {"rows": rows.to_dict(orient="records")}
        return self.request("POST", f"/models/{self.name}/predictions", json=body, **kwargs)

    def describe(self) -> dict[str, Any]:
        return self.request("GET", f"/models/{self.name}").json()

    def is_ready(self) -> bool:
        return self.request("GET", "/ready", auth=False).status_code == 200

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Seconds until ``condition()`` holds (not listening yet = not yet); fails after."""
        start = time.monotonic()
        while not self._holds(condition):
            assert self.process.poll() is None, f"the server exited:\n{self.log_tail()}"
            if time.monotonic() - start > timeout:
                pytest.fail(f"{what}: not within {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)
        return time.monotonic() - start

    @staticmethod
    def _holds(condition: Callable[[], bool]) -> bool:
        try:
            return condition()
        except requests.ConnectionError:
            return False

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]


@contextmanager
def running_server(
    registry: Registry,
    name: str,
    folder: Path,
    token: str | None = None,
    poll_s: float = 30.0,
    *options: str,
) -> Iterator[Server]:
    """``trackflow serve`` for ``name`` on a free loopback port, stopped (by its pid) after."""
    from trackflow.serving.app import TOKEN_VARIABLE

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri}
    env.pop(TOKEN_VARIABLE, None)
    if token:
        env[TOKEN_VARIABLE] = token
    argv = [sys.executable, "-m", "trackflow.cli", "serve", "--model-name", name]
    argv += ["--params", str(REPO_ROOT / "params.yaml"), "--port", str(port)]
    argv += ["--poll-interval", str(poll_s), "--max-rows", str(MAX_ROWS)]
    argv += ["--max-body-mb", str(MAX_BODY_MB), *options]
    log = folder / f"serve-{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(name, port, process, log, token)
    try:
        yield server
    finally:
        stop_process(process)


def check_hot_swap(server: Server, registry: Registry, poll_s: float) -> None:
    """Move ``champion`` from version 1 to 2 (or back) while four clients stream predictions.

    Checks that every answer was 200, that the new version answered within two poll intervals
    of the move and none did before it, and that the server ends serving it.
    """
    before = current_version(server)
    after = "2" if before == "1" else "1"
    answers: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def stream(offset: int) -> None:
        session = requests.Session()
        if server.token:
            session.headers["Authorization"] = f"Bearer {server.token}"
        url = f"http://127.0.0.1:{server.port}/models/{server.name}/predictions"
        count = 0
        while not stop.is_set():
            rows = row_dicts(registry.rows.iloc[(offset + count) % 100 :], 1 + count % 3)
            response = session.post(url, json={"rows": rows}, timeout=30)
            answers.append(
                (time.monotonic(), response.status_code, response.headers.get("X-Model-Version"))
            )
            count += 1

    streams = [threading.Thread(target=stream, args=(n * 7,)) for n in range(4)]
    for thread in streams:
        thread.start()
    try:
        time.sleep(1.0)
        promoted_at = time.monotonic()
        registry.promote(server.name, after)
        server.wait_for(
            lambda: any(version == after for _, _, version in answers), 4 * poll_s, "new version"
        )
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in streams:
            thread.join()

    assert {status for _, status, _ in answers} == {200}
    assert {version for _, _, version in answers} == {before, after}
    switched_at = min(t for t, _, version in answers if version == after)
    assert switched_at - promoted_at <= 2 * poll_s, "new version later than two poll intervals"
    assert all(version == before for t, _, version in answers if t < promoted_at)
    assert current_version(server) == after
    assert len(answers) > 40


def packaged_model(
    tracking: Tracking,
    candidate: Candidate,
    rows: pd.DataFrame,
    preprocessor: Path | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Log a candidate (with another preprocessor if given) as a packaged model into ``run_id``
    (default: its training run); return the arguments that register it."""
    from trackflow.io import read_json
    from trackflow.registry.packaging import log_packaged_model

    files = candidate.files
    run_id = run_id or read_json(files["run"])["run_id"]
    info = log_packaged_model(
        tracking, run_id, preprocessor or files["preprocessor"], files["model"],
        files["detector"], rows.head(5), training_rows(candidate),
    )  # fmt: skip
    return {"source": info.model_uri, "run_id": run_id, "model_id": info.model_id}


def training_rows(candidate: Candidate) -> pd.DataFrame:
    """The candidate's raw target training rows, features only."""
    return raw_rows(candidate, "train").drop(columns="target")


def imputing_preprocessor(candidate: Candidate, folder: Path) -> Path:
    """The candidate's fitted preprocessor behind a median imputer fitted on its training rows.

    On complete rows it answers as the candidate does; missing values get the training median,
    as ``data.non_finite: impute`` makes the pipeline do.
    """
    import joblib
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    fitted = joblib.load(candidate.files["preprocessor"])
    imputer = SimpleImputer(strategy="median", keep_empty_features=True)
    imputer.set_output(transform="pandas").fit(training_rows(candidate))
    path = folder / "imputing-preprocessor.joblib"
    joblib.dump(Pipeline([("impute", imputer), *fitted.steps]).set_output(transform="pandas"), path)
    return path


def broken_copy(
    good: dict[str, Any], folder: Path, corrupt: Callable[[Path], None]
) -> dict[str, Any]:
    """A copy of the good packaged model with ``corrupt`` applied to its artifacts folder."""
    import mlflow

    path = Path(mlflow.artifacts.download_artifacts(good["source"], dst_path=str(folder)))
    corrupt(path / "artifacts")
    return {"source": str(path), "run_id": good["run_id"]}


def expected_predictions(registry: Registry, uri: str, rows: pd.DataFrame) -> pd.DataFrame:
    """What the pyfunc model at ``uri`` answers for ``rows``, loaded in this process."""
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registry.uri)
        return mlflow.pyfunc.load_model(uri).predict(rows)


def current_version(server: Server) -> str:
    return server.describe()["version"]


def row_dicts(rows: pd.DataFrame, count: int = 1) -> list[dict[str, Any]]:
    return rows.head(count).to_dict(orient="records")


def with_cell(rows: pd.DataFrame, value: str, row: int = 0, column: str = "pixel_0_0") -> bytes:
    """Two rows as JSON text with one cell replaced by raw JSON ``value`` (e.g. ``NaN``)."""
    records = row_dicts(rows, 2)
    records[row][column] = "@CELL@"
    return json.dumps({"rows": records}).replace('"@CELL@"', value).encode()


def without(record: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in names}
