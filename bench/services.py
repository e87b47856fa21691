"""What the team services cost: tracking on a server vs a SQLite file, sweeps and the registry lock.

Needs the services of this checkout (``make services``); reads their client environment itself.
Each figure is measured on the SQLite file store (the default set-up, the reference) and on the
tracking server on PostgreSQL (through basic-auth and the artifact proxy) in the same run:

- **per step**: one ``log_batch`` of an epoch's metrics (what the trainer sends per epoch);
- **per run**: a run as the train stage records it (create, ~250 params, 20 epochs of metrics, a
  100 kB artifact, end);
- **train stage**: the train stage itself on the digits with fast settings (wall time);
- **promotion lock**: two processes taking and releasing one model's lock ``--locks`` times each
  (the registry race: every cycle is a create-or-wait on the store's unique model name);
- **sweep**: ``trackflow sweep`` of ``--trials`` trials with 1 and 2 worker processes, the study on
  ``optuna.db`` (SQLite) vs on the services' PostgreSQL.

Medians over ``--repeat`` rounds; ratios are server / SQLite (a time above 1, or trials per
minute below 1: the server is slower).

    python bench/services.py --repeat 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from common import REPO, run, scratch

EPOCH_METRICS = ["train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_s"]


def services_env() -> dict[str, str]:
    """The client environment of this checkout's services; exits with how to start them."""
    from trackflow.services.stack import DIR_ENV, Stack

    stack = Stack(os.environ.get(DIR_ENV) or REPO / ".services")
    if not (stack.folder / "stack.json").is_file() or not all(s.running for s in stack.status()):
        sys.exit("the services are not running: `make services` first")
    return stack.client_env()


def tracking(uri: str, experiment: str):
    """A tracking set-up on ``uri`` (also the URI stages run in this process use)."""
    from trackflow.config import MlflowConfig
    from trackflow.tracking import setup_tracking

    os.environ["MLFLOW_TRACKING_URI"] = uri
    return setup_tracking(MlflowConfig(tracking_uri=uri, experiment_name=experiment))


def per_step_ms(track, steps: int = 100) -> float:
    """Median milliseconds of one epoch's ``log_batch``."""
    from mlflow.entities import Metric

    run_id = track.client.create_run(track.experiment_id).info.run_id
    times = []
    for step in range(steps):
        metrics = [Metric(k, 0.5, int(time.time() * 1000), step) for k in EPOCH_METRICS]
        start = time.perf_counter()
        track.client.log_batch(run_id, metrics=metrics)
        times.append(time.perf_counter() - start)
    track.client.set_terminated(run_id)
    return statistics.median(times) * 1000


def per_run_s(track, folder: Path) -> float:
    """Seconds to record one run as the train stage does."""
    from trackflow.config import flatten_params, load_params
    from trackflow.tracking import log_metrics, log_params, tracked_run

    params = flatten_params(load_params(REPO / "params.yaml"))
    artifact = folder / "model.pt"
    artifact.write_bytes(os.urandom(100_000))
    start = time.perf_counter()
    with tracked_run(track, "bench-run", {}) as run_id:
        log_params(track, run_id, params)
        for epoch in range(20):
            log_metrics(track, run_id, dict.fromkeys(EPOCH_METRICS, 0.5), step=epoch)
        track.client.log_artifact(run_id, str(artifact))
    return time.perf_counter() - start


def _locker(uri: str, env: dict[str, str], name: str, cycles: int) -> None:
    os.environ.update(env)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from mlflow import MlflowClient

    from trackflow.registry.promotion import promotion_lock

    client = MlflowClient(uri)
    for _ in range(cycles):
        with promotion_lock(client, name, timeout_s=120):
            pass


def lock_cycle_ms(uri: str, env: dict[str, str], cycles: int) -> float:
    """Milliseconds per lock cycle with two processes racing for the same model's lock."""
    name = f"bench-lock-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("spawn")
    racers = [context.Process(target=_locker, args=(uri, env, name, cycles)) for _ in range(2)]
    start = time.perf_counter()
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
        if racer.exitcode != 0:
            sys.exit(f"a lock racer failed (exit {racer.exitcode})")
    return (time.perf_counter() - start) / (2 * cycles) * 1000


def sweep_s(env: dict[str, str], study: str, trials: int, parallel: int) -> float:
    """Wall seconds of one ``trackflow sweep`` run of a new study."""
    argv = ["--study", study, "--n-trials", str(trials), "--parallel", str(parallel)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trackflow.cli", "sweep", *argv], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--locks", type=int, default=20, help="lock cycles per racing process")
    parser.add_argument("--trials", type=int, default=8, help="trials per sweep")
    args = parser.parse_args()
    server = services_env()
    fast = {
        "train.max_epochs": 5,
        "pretrain.max_epochs": 3,
        "train.ensemble.size": 1,
        "base.mlflow.experiment_name": "bench-services",  # not the pipeline's own experiment
        "model.name": "bench-services",
    }
    rows: dict[str, dict[str, list[float]]] = {}

    def record(what: str, store: str, value: float) -> None:
        rows.setdefault(what, {}).setdefault(store, []).append(value)

    with scratch(fast) as folder:
        run("ingest", "split", "preprocess", "pretrain")
        sqlite_uri = f"sqlite:///{folder}/mlflow.db"
        stores = {"sqlite": (sqlite_uri, {}), "server": (server["MLFLOW_TRACKING_URI"], server)}
        for round_ in range(args.repeat):
            for store, (uri, env) in stores.items():
                os.environ.update(env)
                track = tracking(uri, f"bench-{store}-{uuid.uuid4().hex[:6]}")
                record("log_batch per epoch (ms)", store, per_step_ms(track))
                record("one tracked run (s)", store, per_run_s(track, folder))
                record("train stage, fast (s)", store, run("train"))
                record("promotion lock cycle, 2 racing (ms)", store,
                       lock_cycle_ms(uri, env, args.locks))  # fmt: skip
                for name in env:
                    os.environ.pop(name, None)
            print(f"round {round_ + 1}/{args.repeat} done", file=sys.stderr, flush=True)
        sweep_envs = {
            "sqlite": {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri},
            "server": {**os.environ, **server},
        }
        sweep_envs["sqlite"].pop("TRACKFLOW_SWEEP_STORAGE", None)  # optuna.db beside mlflow.db
        for store, env in sweep_envs.items():
            for parallel in (1, 2):
                study = f"bench-{store}-{parallel}-{uuid.uuid4().hex[:6]}"
                seconds = sweep_s(env, study, args.trials, parallel)
                record(f"sweep, {parallel} worker(s) (trials/min)", store,
                       args.trials / seconds * 60)  # fmt: skip

    print(f"\nmedians of {args.repeat} rounds (sweeps: one run each, {args.trials} trials)")
    print(f"  {'':<38} {'SQLite file':>12} {'server+PG':>12} {'server/SQLite':>14}")
    for what, by_store in rows.items():
        sqlite, served = (statistics.median(by_store[s]) for s in ("sqlite", "server"))
        print(f"  {what:<38} {sqlite:>12.2f} {served:>12.2f} {served / sqlite:>13.2f}x")


if __name__ == "__main__":
    main()
