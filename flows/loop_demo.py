"""The online-learning loop end to end, on a copy of the project: what ``make loop-demo`` runs.

    python -m flows.loop_demo                          # default params, in a new temporary folder
    python -m flows.loop_demo --tiny --workdir /tmp/loop --json /tmp/loop/timeline.json

In ``--workdir`` (kept afterwards, to look at with the MLflow and Prefect UIs) it makes a copy of
this project (git + DVC, its own MLflow store under ``project/mlruns``) and starts, on loopback, a
Prefect server with its services, a ``process`` worker of the work pool ``trackflow`` and
``trackflow serve`` on the copy's champion. Then, timing each step:

1. ``dvc repro``: the first champion (``--tiny``: a few epochs, floors at 0: the wiring, not the
   accuracy); the ``retrain`` deployment of ``prefect.yaml`` is deployed with its drift trigger
   (its cool-down shortened to ``--cooldown``, 30 s, so that the demo need not wait 600 s);
2. ``trackflow shifted-digits``: two shifted streams of the target classes to score, labelled rows
   of the same shift to learn from, and labelled held-out rows to measure on;
3. drift before labels: ``python -m flows.scoring`` of the first stream finds it drifted and
   emits ``trackflow.batch.drifted``; the trigger's automation starts a retrain run, which finds no
   new labelled rows and stops, registering nothing;
4. ``trackflow add-batch``: the labelled shifted rows join the data;
5. once the cool-down is over, the second stream is scored: drift, the event, a retrain run
   (``train.mode: continue``) by the worker; the gate decides; the service follows the alias.

Meanwhile four clients keep asking the service for predictions (about 20 requests/s in all);
every answer is recorded. It
prints a timeline (drift detected, retrain started, version promoted, first answer from the new
version), the accuracy on the held-out shifted rows before and after (the service's answers), the
failed requests (there should be none), and writes it all as JSON with ``--json``. Exit status 0
when the new version was promoted and served with no failed request, 1 otherwise. The processes
are stopped at the end; the folder stays.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHECKOUT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: What a pipeline run of the copy needs from this checkout.
PROJECT_FILES = (
    "src",
    "data/raw",
    "data/batches/README.md",
    ".dvc/config",
    "dvc.yaml",
    ".gitignore",
)
#: ``--tiny``: a loop that runs in a couple of minutes on two cores (the wiring, not accuracy).
TINY = {
    "pretrain.max_epochs": 3,
    "train.max_epochs": 5,
    "anomaly.detectors": ["knn"],
    "promotion.min_accuracy": 0.0,
    "promotion.min_anomaly_auroc": 0.0,
}
DEPLOYMENT = "trackflow-retrain/retrain"
TRIGGER_NAME = "trackflow-retrain-on-drift"  # prefect.yaml: the automation prefect deploy makes


@dataclass
class Timeline:
    """Steps with their wall-clock times, printed as they happen."""

    start: float = field(default_factory=time.time)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def mark(self, step: str, detail: str = "", at: float | None = None) -> float:
        """Record ``step`` as done at ``at`` (default: now) and print it."""
        at = time.time() if at is None else at
        self.steps.append({"step": step, "at": at, "seconds": at - self.start, "detail": detail})
        print(f"[{at - self.start:7.1f} s] {step}" + (f": {detail}" if detail else ""), flush=True)
        return at

    def at(self, step: str) -> float:
        """When ``step`` was done."""
        return next(s["at"] for s in self.steps if s["step"] == step)


@dataclass
class Answers:
    """Every answer the streaming clients got: (time, HTTP status or error, model version)."""

    records: list[tuple[float, str, str | None]] = field(default_factory=list)

    def first(self, version: str) -> float | None:
        """When ``version`` answered first; None if it has not."""
        return min((t for t, _, v in self.records if v == version), default=None)

    @property
    def failed(self) -> list[tuple[float, str, str | None]]:
        """The answers other than 200 (errors included)."""
        return [r for r in self.records if r[1] != "200"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.loop_demo``: run the loop once; 0 if promoted and served cleanly."""
    parser = argparse.ArgumentParser(prog="python -m flows.loop_demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="folder to work in (default: a new temp one)")
    parser.add_argument("--tiny", action="store_true", help="few epochs, no floors: the wiring")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="params of the copy"
    )
    parser.add_argument("--add-rows", type=int, default=600, help="labelled shifted rows to add")
    parser.add_argument("--stream-rows", type=int, default=300, help="shifted rows to score")
    parser.add_argument("--holdout-rows", type=int, default=500, help="rows to measure accuracy")
    parser.add_argument(
        "--cooldown", type=int, default=30, help="the trigger's cool-down, s (prefect.yaml: 600)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="most seconds to wait a step")
    parser.add_argument("--json", type=Path, help="write the timeline and figures here")
    args = parser.parse_args(argv)

    from trackflow.pipeline.driver import parse_overrides

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the copy has its own store, not the caller's
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="trackflow-loop-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = (TINY if args.tiny else {}) | parse_overrides(args.set)
    print(f"loop demo in {workdir}", flush=True)
    result = run(workdir, overrides, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["ok"] else 1


def run(workdir: Path, overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The whole loop; the figures for the report."""
    timeline = Timeline()
    project = make_project(workdir / "project", overrides)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    home = workdir / "prefect"
    env = base_env(home)
    tracking, name = project_tracking(project)
    # Every process on the copy's store, whatever folder it starts in (the worker runs the flows
    # from the checkout, the stages run in the copy).
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri
    with ExitStack() as stack:
        api_url = stack.enter_context(prefect_server(home, env, logs))  # starts while dvc runs
        step(["dvc", "repro"], project, env, logs / "dvc-repro.log", args.timeout)
        first = champion(tracking, name)
        if first is None:
            raise SystemExit(f"no champion after dvc repro: see {project / 'models'}")
        timeline.mark("champion", f"{name} version {first} (dvc repro)")
        env["PREFECT_API_URL"] = wait_for_api(api_url, args.timeout)
        deploy(workdir, project, name, env, args.cooldown)
        worker = ["prefect", "worker", "start", "--pool", "trackflow", "--type", "process"]
        stack.enter_context(background(worker, CHECKOUT, env, logs / "worker.log"))
        serve = stack.enter_context(service(project, env, logs / "serve.log", args.timeout))
        timeline.mark("service ready", f"serving version {first}")

        data = shifted_data(workdir / "stream", project, env, args)
        accuracy_before = serve.accuracy(data["holdout"])
        answers = Answers()
        stack.enter_context(streaming(serve, data["holdout"], answers))

        # Drift before any label: the event's run finds nothing new and stops.
        early = score(data["early"], project, env, logs / "scoring-early.log", args.timeout)
        timeline.mark("drift before labels", ", ".join(early["drift"]["rules_fired"]) or "NO DRIFT")
        no_labels = retrain_without_labels(env, tracking, name, args, logs)
        timeline.mark("retrain without new labels", no_labels["message"], no_labels["ended"])
        cool_down_ends = no_labels["created"] + no_labels["cooldown_s"]

        step(["trackflow", "add-batch", str(data["labelled"])], project, env,
             logs / "add-batch.log", args.timeout)  # fmt: skip
        timeline.mark("batch added", f"{args.add_rows} labelled shifted rows (trackflow add-batch)")
        if (wait := cool_down_ends + 1 - time.time()) > 0:
            print(f"(waiting {wait:.0f} s for the trigger's cool-down to end)", flush=True)
            time.sleep(wait)

        scored = score(data["stream"], project, env, logs / "scoring.log", args.timeout)
        drift = scored["drift"]
        timeline.mark("drift detected", ", ".join(drift["rules_fired"]) or "NO DRIFT")
        known = {no_labels["flow_run_id"]}
        run_, promoted, promoted_time = wait_for_retrain(
            env, tracking, name, first, args, logs, known
        )
        timeline.mark("retrain started", f"flow run {run_.name}", run_.start_time.timestamp())
        if promoted:
            timeline.mark("version promoted", f"version {promoted}", promoted_time)
        timeline.mark("retrain finished", f"{run_.state_name}", run_.end_time.timestamp())
        if promoted:
            answered = wait_until(lambda: answers.first(promoted), args.timeout, "new answers")
            timeline.mark("new version answered", f"version {promoted}", answered)
        else:
            timeline.mark("not promoted", gate_decision(project))
        time.sleep(1.0)
        accuracy_after = serve.accuracy(data["holdout"])
    timeline.steps.sort(key=lambda s: s["at"])
    drift_to_served = (
        timeline.at("new version answered") - timeline.at("drift detected") if promoted else None
    )
    result = {
        "ok": bool(promoted) and not answers.failed,
        "workdir": str(workdir),
        "model": name,
        "versions": {"before": first, "after": promoted},
        "steps": timeline.steps,
        "no_labels_run": no_labels,
        "retrain_run": {
            "flow_run": run_.name,
            "state": run_.state_name,
            "drifted_batch": run_.parameters.get("drifted_batch"),
            "drift_event_id": run_.parameters.get("drift_event_id"),
        },
        "drift": {k: drift.get(k) for k in ("detected", "rules_fired", "share_drifted", "max_psi")},
        "accuracy_shifted": {"before": accuracy_before, "after": accuracy_after},
        "drift_to_served_s": drift_to_served,
        "answers": len(answers.records),
        "failed_requests": [list(r) for r in answers.failed],
        "versions_answered": sorted({str(v) for _, _, v in answers.records}),
    }
    report(result)
    return result


# --- the copy and its processes ------------------------------------------------------------------


def make_project(folder: Path, overrides: dict[str, Any]) -> Path:
    """A git + DVC repository with this project's pipeline, code and params (with overrides)."""
    from trackflow.config import load_params, set_dotted

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    git = {**os.environ, "GIT_AUTHOR_NAME": "loop demo", "GIT_COMMITTER_NAME": "loop demo"}
    git |= {
        "GIT_AUTHOR_EMAIL": "demo@trackflow.invalid",
        "GIT_COMMITTER_EMAIL": "demo@trackflow.invalid",
    }
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=folder, env=git, check=True, capture_output=True)
    for name in PROJECT_FILES:
        source, target = CHECKOUT / name, folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            shutil.copy2(source, target)
    raw = yaml.safe_load((CHECKOUT / "params.yaml").read_text())
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    load_params(folder / "params.yaml")  # a bad --set fails here
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "loop demo"]):
        subprocess.run(command, cwd=folder, env=git, check=True, capture_output=True)
    return folder


def base_env(home: Path) -> dict[str, str]:
    """Every child's environment: this interpreter's tools first, the copy's own stores."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # run() points it at the copy's own store
    env.pop("PREFECT_API_URL", None)
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "loop demo",
        "GIT_COMMITTER_NAME": "loop demo",
        "GIT_AUTHOR_EMAIL": "demo@trackflow.invalid",
        "GIT_COMMITTER_EMAIL": "demo@trackflow.invalid",
    }
    return env


def step(argv: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float) -> None:
    """Run a command to its end, its output in ``log``; a failure stops the demo, naming it."""
    with log.open("w") as out:
        code = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout).returncode  # fmt: skip
    if code:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"`{' '.join(argv)}` failed with exit status {code}:\n{tail}")


@contextmanager
def background(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[Any]:
    """A long-running process, its output in ``log``, terminated (then killed) at the end."""
    with log.open("w") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def prefect_server(home: Path, env: dict[str, str], logs: Path) -> Iterator[str]:
    """``prefect server start`` on a free loopback port; its API URL, at once.

    Its triggers and actions services run the automation; :func:`wait_for_api` waits for it.
    """
    port = free_port()
    argv = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server_env = env | {"PREFECT_SERVER_UI_ENABLED": "true"}
    with background(argv, CHECKOUT, server_env, logs / "prefect-server.log"):
        yield f"http://127.0.0.1:{port}/api"


def wait_for_api(api_url: str, timeout: float) -> str:
    """``api_url`` once the server answers its health check."""
    import httpx

    def healthy() -> bool:
        try:
            return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout, "the Prefect server")
    return api_url


def deploy(workdir: Path, project: Path, name: str, env: dict[str, str], cooldown: int | None):
    """``prefect deploy`` of prefect.yaml's ``retrain`` deployment, on the copy and its model.

    The work pool ``trackflow`` is created first; ``cooldown`` replaces the trigger's ``within``.
    """
    from trackflow.pipeline.schedule import RETRAIN_DEPLOYMENT, model_resource_id

    spec = yaml.safe_load((CHECKOUT / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == RETRAIN_DEPLOYMENT]
    deployment["parameters"]["repo"] = str(project)
    for trigger in deployment["triggers"]:
        trigger["match"]["prefect.resource.id"] = model_resource_id(name)
        if cooldown is not None:
            trigger["within"] = cooldown
    spec["deployments"] = [deployment]
    prefect_file = workdir / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    pool = ["prefect", "work-pool", "create", "trackflow", "--type", "process", "--overwrite"]
    subprocess.run(pool, env=env, check=True, capture_output=True, cwd=CHECKOUT)
    command = ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    result = subprocess.run(command, cwd=CHECKOUT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"prefect deploy failed:\n{result.stdout}{result.stderr}")


# --- the service ---------------------------------------------------------------------------------


@dataclass
class Service:
    """``trackflow serve`` on the copy's champion, and what it answered on the held-out rows."""

    url: str
    name: str
    max_rows: int

    def predict(self, rows: list[dict[str, Any]], session: Any = None) -> Any:
        """POST ``rows`` for predictions; the response."""
        import requests

        post = (session or requests).post
        return post(f"{self.url}/models/{self.name}/predictions", json={"rows": rows}, timeout=60)

    def accuracy(self, holdout: Path) -> dict[str, Any]:
        """Share of the held-out rows whose label the service answers right, and its version."""
        import pandas as pd

        rows = pd.read_csv(holdout)
        labels = rows.pop("target").to_numpy()
        right, versions = 0, set()
        for start in range(0, len(rows), self.max_rows):
            chunk = rows.iloc[start : start + self.max_rows]
            response = self.predict(chunk.to_dict(orient="records"))
            response.raise_for_status()
            versions.add(response.headers.get("X-Model-Version"))
            answered = [p["label"] for p in response.json()["predictions"]]
            right += sum(int(a) == int(b) for a, b in zip(answered, labels[start:], strict=False))
        return {"accuracy": right / len(rows), "rows": len(rows), "versions": sorted(versions)}


@contextmanager
def service(project: Path, env: dict[str, str], log: Path, timeout: float) -> Iterator[Service]:
    """``trackflow serve`` of the copy's champion (alias read every second), once ready."""
    import requests

    from trackflow.config import load_params

    params = load_params(project / "params.yaml")
    port = free_port()
    argv = ["trackflow", "serve", "--params", str(project / "params.yaml"), "--port", str(port)]
    argv += ["--host", "127.0.0.1", "--poll-interval", "1"]
    served = Service(f"http://127.0.0.1:{port}", params.model.name, params.serve.max_rows)
    with background(argv, project, env, log) as process:

        def ready() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"trackflow serve exited:\n{log.read_text()[-3000:]}")
            try:
                return requests.get(f"{served.url}/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout, "trackflow serve")
        yield served


@contextmanager
def streaming(served: Service, holdout: Path, answers: Answers) -> Iterator[None]:
    """Four clients asking for predictions of 1-3 held-out rows, one request after another."""
    import pandas as pd
    import requests

    rows = pd.read_csv(holdout).drop(columns="target").to_dict(orient="records")
    stop = threading.Event()

    def client(offset: int) -> None:
        session, count = requests.Session(), 0
        while not stop.is_set():
            start = (offset + count) % (len(rows) - 3)
            try:
                response = served.predict(rows[start : start + 1 + count % 3], session)
                status, version = str(response.status_code), response.headers.get("X-Model-Version")
            except requests.RequestException as exc:
                status, version = type(exc).__name__, None
            answers.records.append((time.time(), status, version))
            count += 1
            time.sleep(0.2)  # ~20 requests/s in all: traffic, not a load test beside training

    threads = [threading.Thread(target=client, args=(n * 7,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


# --- the loop's steps ----------------------------------------------------------------------------


def shifted_data(folder: Path, project: Path, env: dict[str, str], args: argparse.Namespace):
    """Three shifted tables of the target classes (``trackflow shifted-digits``), by name.

    ``labelled``: rows to add; ``early`` and ``stream``: rows to score before and after the labels
    come (no label); ``holdout``: labelled rows to measure on. Each has its own seed.
    """
    from trackflow.config import load_params

    folder.mkdir(exist_ok=True)
    classes = [str(c) for c in load_params(project / "params.yaml").data.target_classes or ()]
    tables = {
        "labelled": (args.add_rows, 11, []),
        "early": (args.stream_rows, 14, ["--no-label"]),
        "stream": (args.stream_rows, 12, ["--no-label"]),
        "holdout": (args.holdout_rows, 13, []),
    }
    paths = {}
    for name, (rows, seed, extra) in tables.items():
        path = folder / f"{name}.csv"
        argv = ["trackflow", "shifted-digits", str(path), "--rows", str(rows), "--seed", str(seed)]
        step([*argv, "--classes", *classes, *extra], project, env, folder / f"{name}.log", 300)
        paths[name] = path
    return paths


def score(stream: Path, project: Path, env: dict[str, str], log: Path, timeout: float):
    """``python -m flows.scoring`` of the stream (drift -> the event); its drift report."""
    argv = [sys.executable, "-m", "flows.scoring", str(stream)]
    step([*argv, "--params", str(project / "params.yaml")], CHECKOUT, env, log, timeout)
    return json.loads(stream.with_name(f"{stream.stem}.drift.json").read_text())


def retrain_without_labels(
    env: dict[str, str], tracking: Any, name: str, args: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    """The run the first drift event started, before any label: it must stop, registering nothing.

    Returns what it said, when it was created and ended, and the trigger's cool-down.
    """
    from prefect.client.orchestration import SyncPrefectClient

    before = versions(tracking, name)
    run, _, _ = wait_for_retrain(env, tracking, name, before[-1], args, logs, set())
    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        report = retrain_report(client, run.id)
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        (automation,) = client.read_automations_by_name(TRIGGER_NAME)
        if automation.actions[0].deployment_id != deployment.id:
            raise SystemExit(f"automation {TRIGGER_NAME} does not run {DEPLOYMENT}")
        cooldown = automation.trigger.within.total_seconds()
    after = versions(tracking, name)
    if "no new rows" not in report or after != before:
        raise SystemExit(f"the retrain run without new labels did not stop cleanly:\n{report}")
    message = next(line for line in report.splitlines() if line.startswith("no new labelled rows"))
    return {
        "flow_run": run.name,
        "flow_run_id": str(run.id),
        "state": run.state_name,
        "drifted_batch": run.parameters.get("drifted_batch"),
        "message": message,
        "versions_before": before,
        "versions_after": after,
        "created": run.created.timestamp(),
        "ended": run.end_time.timestamp(),
        "cooldown_s": cooldown,
    }


def wait_for_retrain(
    env: dict[str, str],
    tracking: Any,
    name: str,
    first: str,
    args: argparse.Namespace,
    logs: Path,
    known: set[str],
) -> tuple[Any, str | None, float | None]:
    """The retrain run the drift event's automation created, once it has finished.

    Also the version that became champion meanwhile (None if none) and when the alias moved
    (polled while the run runs).
    """
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))

        def triggered() -> Any:
            runs = client.read_flow_runs(deployment_filter=only_this)
            started = [r for r in runs if r.parameters.get("drift_event_id")]
            return next((r for r in started if str(r.id) not in known), None)

        found = wait_until(triggered, 120, "a retrain run started by the drift event")
        promoted: list[tuple[str, float]] = []

        def finished() -> Any:
            if not promoted and (now := champion(tracking, name)) not in (None, first):
                promoted.append((now, time.time()))
            run = client.read_flow_run(found.id)
            return run if run.state and run.state.is_final() else None

        run = wait_until(finished, args.timeout, "the retrain run to finish")
    if not promoted and (now := champion(tracking, name)) not in (None, first):
        promoted.append((now, time.time()))
    if not run.state.is_completed():
        worker = "\n".join((logs / "worker.log").read_text().splitlines()[-40:])
        raise SystemExit(f"the retrain run ended {run.state_name}:\n{worker}")
    version, at = promoted[0] if promoted else (None, None)
    return run, version, at


def retrain_report(client: Any, flow_run_id: Any) -> str:
    """The ``trackflow-retrain`` report the flow run published."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    from flows.retrain import ARTIFACT_KEY

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            key=ArtifactFilterKey(any_=[ARTIFACT_KEY]),
        )
    )
    return "\n".join(str(a.data) for a in found)


# --- the registry --------------------------------------------------------------------------------


def project_tracking(project: Path) -> tuple[Any, str]:
    """The copy's MLflow store and its registered model's name."""
    from trackflow.config import load_params
    from trackflow.pipeline.driver import repo_tracking_config
    from trackflow.tracking import setup_tracking

    params = load_params(project / "params.yaml")
    return setup_tracking(repo_tracking_config(project, params)), params.model.name


def champion(tracking: Any, name: str) -> str | None:
    """The version the ``champion`` alias names; None if none."""
    from mlflow.exceptions import MlflowException

    try:
        return str(tracking.client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def versions(tracking: Any, name: str) -> list[str]:
    """Every registered version of ``name``."""
    found = tracking.client.search_model_versions(f"name = '{name}'")
    return sorted((str(v.version) for v in found), key=int)


def gate_decision(project: Path) -> str:
    """What the register stage wrote about the last candidate."""
    path = project / "models" / "registered.json"
    return path.read_text() if path.is_file() else "(no models/registered.json)"


# --- small helpers -------------------------------------------------------------------------------


def wait_until(condition: Any, timeout: float, what: str = "the step") -> Any:
    """``condition()``'s first truthy value, or time.time() if it is True; fails after timeout."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.25)
    return time.time() if value is True else value


@contextmanager
def prefect_settings(env: dict[str, str]) -> Iterator[None]:
    """This process's Prefect client pointed at the demo's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(result: dict[str, Any]) -> None:
    """The timeline and the figures, as a person reads them."""
    print("\n# Online-learning loop\n")
    print("| step | at (s) | detail |\n|---|---|---|")
    for s in result["steps"]:
        print(f"| {s['step']} | {s['seconds']:.1f} | {s['detail']} |")
    before, after = result["accuracy_shifted"]["before"], result["accuracy_shifted"]["after"]
    print(f"\nAccuracy on {before['rows']} held-out shifted rows (the service's answers): "
          f"{before['accuracy']:.3f} (version {', '.join(before['versions'])}) -> "
          f"{after['accuracy']:.3f} (version {', '.join(after['versions'])})")  # fmt: skip
    if result["drift_to_served_s"] is not None:
        print(f"Drift detected -> new version answering: {result['drift_to_served_s']:.1f} s")
    print(
        f"Requests during the loop: {result['answers']}, failed: {len(result['failed_requests'])}"
    )
    workdir = result["workdir"]
    print(f"Everything is kept in {workdir}; to look at it:\n"
          f"  mlflow ui --backend-store-uri sqlite:///{workdir}/project/mlruns/mlflow.db\n"
          f"  PREFECT_SERVER_DATABASE_CONNECTION_URL=sqlite+aiosqlite:///{workdir}/prefect/"
          "prefect.db prefect server start")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
