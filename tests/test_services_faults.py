"""The services of ``make services`` for real: their lifecycle, and faults of their servers.

One private stack (PostgreSQL, an MLflow tracking server, a Prefect server; no workers) on free
ports, started once for the module in ``.services/test-<uuid>`` and stopped after: the shared dev
services are never touched. Faults are real: server processes killed, PostgreSQL stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    FAST_TRAINING,
    REPO_ROOT,
    free_port,
    services_missing,
    train_argv,
    write_project_params,
)
from trackflow.errors import ConfigError
from trackflow.services import postgres
from trackflow.services.stack import SECRETS, Stack

pytestmark = [pytest.mark.services, pytest.mark.slow]

EXPERIMENT = "trackflow"  # params.yaml's base.mlflow.experiment_name
SMALL_NETWORK: dict[str, Any] = {
    **FAST_TRAINING,
    "train.mode": "scratch",
    "model.widths": [16],
    "train.early_stopping_patience": 1000,
}


@pytest.fixture(scope="module")
def private_stack() -> Iterator[Stack]:
    """A whole stack of its own on free ports, up for the module, then down and removed.

    Its folder is under the checkout's ``.services`` (git-ignored): as root, PostgreSQL runs as
    the ``postgres`` user, who cannot enter pytest's private temporary folders.
    """
    try:
        postgres.find_binaries(install=False)
    except ConfigError as exc:
        services_missing(f"needs PostgreSQL's server for a private stack: {exc}")
    folder = REPO_ROOT / ".services" / f"test-{uuid.uuid4().hex[:12]}"
    stack = Stack(
        folder,
        postgres_port=free_port(),
        mlflow_port=free_port(),
        prefect_port=free_port(),
        workers=0,
    )
    try:
        stack.up()
        yield stack
    finally:
        Stack(folder).down()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def client_env(private_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The private stack's client environment, set in this process too; returned for children."""
    env = private_stack.client_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}


# --- helpers --------------------------------------------------------------------------------------


def services_cli(stack: Stack, action: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``trackflow services ACTION`` on the private stack, with its folder and ports."""
    settings = stack.settings
    argv = [sys.executable, "-m", "trackflow.cli", "services", action, "--dir", str(stack.folder)]
    argv += ["--postgres-port", str(settings.postgres_port), "--workers", "0"]
    argv += ["--mlflow-port", str(settings.mlflow_port)]
    argv += ["--prefect-port", str(settings.prefect_port)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def cluster_of(stack: Stack) -> postgres.Cluster:
    return stack.cluster()


def postmaster_pid(stack: Stack) -> int | None:
    path = stack.folder / "postgres" / "data" / "postmaster.pid"
    return int(path.read_text().split()[0]) if path.is_file() else None


def stack_pids(stack: Stack) -> dict[str, int]:
    """The pids of the stack's servers (PostgreSQL's postmaster included)."""
    found = {name: stack.pid(name) for name in ("mlflow", "prefect")}
    found["postgres"] = postmaster_pid(stack)
    return {name: pid for name, pid in found.items() if pid is not None}


def process_trees(pids: list[int]) -> set[int]:
    """The pids and all their descendants."""
    import psutil

    found = set(pids)
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            found |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
    return found


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def secret_values(stack: Stack) -> list[str]:
    return [value for value in stack.secrets().values() if value]


def kill_mlflow(stack: Stack) -> None:
    """Kill the tracking server's process group (the server and its workers), as a crash would."""
    pid = stack.pid("mlflow")
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while listening(stack.settings.mlflow_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listening(stack.settings.mlflow_port)


def wait_for(condition: Any, timeout: float, what: str, process: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"{what}: the process exited ({process.returncode}):\n{output}")
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def server_runs(name_prefix: str) -> list[Any]:
    """The private server's runs whose name starts with ``name_prefix`` (client env set)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return [
        run
        for run in client.search_runs([experiment.experiment_id], max_results=500)
        if (run.info.run_name or "").startswith(name_prefix)
    ]


# --- lifecycle ------------------------------------------------------------------------------------


def test_up_down_and_up_again_through_the_command_line(
    private_stack: Stack, client_env: dict[str, str]
) -> None:
    """A second up starts nothing; down stops exactly what up started and keeps the data."""
    import psutil
    from mlflow import MlflowClient

    stack = private_stack
    client = MlflowClient()
    experiment = client.get_experiment_by_name("lifecycle") or client.get_experiment(
        client.create_experiment("lifecycle")
    )
    run = client.create_run(experiment.experiment_id, run_name="before-down")
    client.log_metric(run.info.run_id, "kept", 1.0)
    client.set_terminated(run.info.run_id)
    outputs = []

    before = stack_pids(stack)
    assert set(before) == {"mlflow", "prefect", "postgres"}
    again = services_cli(stack, "up", client_env)
    outputs.append(again.stdout + again.stderr)
    assert again.returncode == 0, outputs[-1]
    service_lines = [line for line in again.stdout.splitlines() if line.startswith("services: ")]
    for name in ("PostgreSQL", "MLflow", "Prefect"):
        (line,) = [line for line in service_lines if line.startswith(f"services: {name} ")]
        assert " running " in line, line
    assert stack_pids(stack) == before
    status = services_cli(stack, "status", client_env)
    outputs.append(status.stdout + status.stderr)
    assert status.returncode == 0, outputs[-1]

    started = process_trees(list(before.values()))
    command_lines = " ".join(" ".join(psutil.Process(pid).cmdline()) for pid in started)
    assert not [value for value in secret_values(stack) if value in command_lines]  # env only
    down = services_cli(stack, "down", client_env)
    outputs.append(down.stdout + down.stderr)
    assert down.returncode == 0, outputs[-1]
    assert [pid for pid in started if alive(pid)] == []
    ports = (stack.settings.postgres_port, stack.settings.mlflow_port, stack.settings.prefect_port)
    assert [port for port in ports if listening(port)] == []
    status = services_cli(stack, "status", client_env)
    outputs.append(status.stdout + status.stderr)
    assert status.returncode == 1, outputs[-1]

    with socket.socket() as squatter:  # another program on the tracking server's port
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        squatter.bind(("127.0.0.1", stack.settings.mlflow_port))
        squatter.listen()
        refused = services_cli(stack, "up", client_env)
        outputs.append(refused.stdout + refused.stderr)
        assert refused.returncode == 2, outputs[-1]
        (line,) = refused.stderr.strip().splitlines()
        assert str(stack.settings.mlflow_port) in line and "--mlflow-port" in line, line
        assert stack_pids(stack) == {}
        assert not listening(stack.settings.postgres_port)

    up = services_cli(stack, "up", client_env)
    outputs.append(up.stdout + up.stderr)
    assert up.returncode == 0, outputs[-1]
    assert set(stack_pids(stack)) == {"mlflow", "prefect", "postgres"}
    kept = MlflowClient().get_run(run.info.run_id)
    assert kept.data.metrics == {"kept": 1.0}

    shown = "\n".join(outputs)
    assert not [value for value in secret_values(stack) if value in shown]
    assert not [name for name in SECRETS if name in shown]
    for name in ("credentials.env", "env.sh"):
        assert (stack.folder / name).stat().st_mode & 0o777 == 0o600, name


# --- the tracking server restarted under a client -------------------------------------------------


def test_training_survives_a_restart_of_the_tracking_server(
    private_stack: Stack, client_env: dict[str, str], processed: Path, tmp_path: Path
) -> None:
    """MLflow's client retries refused connections: the run ends FINISHED with every epoch."""
    epochs = 20
    params = write_project_params(
        tmp_path / "params.yaml", {**SMALL_NETWORK, "train.max_epochs": epochs}
    )
    argv = [sys.executable, "-m", "trackflow.stages.train"]
    log = tmp_path / "train.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*argv, *train_argv(params, processed, "none.pt")],
            cwd=tmp_path,
            env=client_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        running = wait_for(
            lambda: [r for r in server_runs("train") if r.info.status == "RUNNING"],
            120,
            "the train run RUNNING on the server",
        )
        (run,) = running
        kill_mlflow(private_stack)
        time.sleep(3)
        assert process.poll() is None, log.read_text()
        private_stack.up()
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert code == 0, output
    from mlflow import MlflowClient

    client = MlflowClient()
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert sorted({m.step for m in history}) == list(range(epochs)), output


def test_training_fails_in_one_line_when_the_tracking_server_stays_away(
    private_stack: Stack, client_env: dict[str, str], processed: Path, tmp_path: Path
) -> None:
    """Once MLflow's client gives up (here at once), the stage exits 75 with one line."""
    params = write_project_params(
        tmp_path / "params.yaml", {**SMALL_NETWORK, "train.max_epochs": 20}
    )
    stage = [sys.executable, "-m", "trackflow.stages.train"]
    process = subprocess.Popen(
        [*stage, *train_argv(params, processed, "none.pt")],
        cwd=tmp_path,
        env=client_env | IMPATIENT_CLIENT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: [r for r in server_runs("train") if r.info.status == "RUNNING"],
            120,
            "the train run RUNNING on the server",
        )
        kill_mlflow(private_stack)
        _, errors = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
        private_stack.up()
    assert process.returncode == 75, errors
    assert "Traceback" not in errors, errors
    (line,) = [line for line in errors.splitlines() if line.startswith("error:")]
    assert "tracking server went away" in line, line


# --- a sweep and the tracking server --------------------------------------------------------------


def sweep_params(tmp_path: Path, study: str, overrides: dict[str, Any] | None = None) -> Path:
    return write_project_params(
        tmp_path / "params.yaml",
        {
            **SMALL_NETWORK,
            "sweep.study": study,
            "sweep.pruner": "none",
            "sweep.sampler": "random",
            "sweep.space": {"train.lr": {"log_uniform": [0.001, 0.01]}},
            **(overrides or {}),
        },
    )


def sweep_command(params: Path, processed: Path) -> list[str]:
    argv = [sys.executable, "-m", "trackflow.cli", "sweep", "--params", str(params)]
    return [*argv, "--data", str(processed)]


def load_study(env: dict[str, str], name: str) -> Any:
    import optuna

    from trackflow.tuning.study import STORAGE_ENV

    return optuna.load_study(study_name=name, storage=env[STORAGE_ENV])


def trials_in(env: dict[str, str], name: str, state: Any) -> list[Any]:
    """The study's trials in ``state``; none while the study does not exist yet."""
    try:
        return load_study(env, name).get_trials(states=(state,))
    except KeyError:
        return []


#: A client that gives up on an absent tracking server in seconds, not MLflow's two minutes.
IMPATIENT_CLIENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def test_a_sweep_cut_by_the_tracking_server_resumes_after_its_restart(
    private_stack: Stack, client_env: dict[str, str], processed: Path, tmp_path: Path
) -> None:
    """The server dies under a sweep: it stops (75, one line), its trials not burnt; a rerun
    once the server is back finishes the study."""
    from optuna.trial import TrialState

    study = f"faults-{uuid.uuid4().hex[:8]}"
    n_trials = 3
    params = sweep_params(tmp_path, study, {"sweep.n_trials": n_trials, "train.max_epochs": 4})
    process = subprocess.Popen(
        sweep_command(params, processed),
        cwd=tmp_path,
        env=client_env | IMPATIENT_CLIENT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: trials_in(client_env, study, TrialState.COMPLETE), 240, "a trial")
        kill_mlflow(private_stack)
        _, errors = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
        private_stack.up()
    assert process.returncode == 75, errors
    (line,) = [line for line in errors.splitlines() if line.startswith("error:")]  # Optuna's
    assert line == errors.strip().splitlines()[-1]  # warning of the trial it failed comes before
    assert line.startswith("error: sweep stopped") and f"--study {study}" in line, line
    cut = load_study(client_env, study)
    assert len(cut.get_trials(states=(TrialState.COMPLETE,))) < n_trials
    assert all(t.user_attrs["interrupted"] for t in cut.trials if t.state == TrialState.FAIL)

    rerun = subprocess.run(
        sweep_command(params, processed), cwd=tmp_path, env=client_env,
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    finished = load_study(client_env, study)
    assert len(finished.get_trials(states=(TrialState.COMPLETE,))) == n_trials
    assert finished.get_trials(states=(TrialState.RUNNING,)) == []
    runs = server_runs(f"sweep-{study}")
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []


# --- PostgreSQL briefly down ---------------------------------------------------------------------


def test_postgresql_down_a_sweep_fails_at_once_and_history_waits_for_it(
    private_stack: Stack, client_env: dict[str, str], processed: Path, tmp_path: Path
) -> None:
    """The study storage's server named in one line (75); MLflow's client retries the 5xx
    answers of a tracking server whose database is away, so a command outlives a short outage."""
    from mlflow import MlflowClient

    cluster = private_stack.cluster()
    model = f"faults-{uuid.uuid4().hex[:8]}"
    MlflowClient().create_registered_model(model)
    params = sweep_params(tmp_path, f"faults-{uuid.uuid4().hex[:8]}", {"sweep.n_trials": 1})
    history = [sys.executable, "-m", "trackflow.cli", "history", model, "--params", str(params)]
    postgres.stop(cluster)
    try:
        started = time.monotonic()
        sweep = subprocess.run(
            sweep_command(params, processed), cwd=tmp_path, env=client_env,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        sweep_s = time.monotonic() - started
        waiting = subprocess.Popen(
            history, cwd=tmp_path, env=client_env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(5)
        assert waiting.poll() is None, waiting.communicate()
    finally:
        postgres.start(cluster)
    output, errors = waiting.communicate(timeout=300)
    history_s = time.monotonic() - started - sweep_s
    print(f"sweep failed in {sweep_s:.1f} s; history took {history_s:.1f} s")

    assert sweep.returncode == 75, sweep.stderr
    (line,) = sweep.stderr.strip().splitlines()
    assert f"127.0.0.1:{cluster.port}" in line and "trackflow:***@" in line, line
    assert cluster.password not in sweep.stdout + sweep.stderr
    assert sweep_s < 60
    assert waiting.returncode == 0, errors
    assert f"{model}: no ledger entries" in output

    wrong = cluster.url("optuna", password="not-the-password")
    refused = subprocess.run(
        sweep_command(params, processed), cwd=tmp_path,
        env=client_env | {"TRACKFLOW_SWEEP_STORAGE": wrong},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "trackflow:***@" in line and "not-the-password" not in line, line
