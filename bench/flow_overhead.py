"""Wall time of the Prefect training flow next to the sum of its stages' own times, cold and warm.

The committed project (HEAD) goes into a fresh git + DVC repository, where the flow runs twice:
cold (every stage runs), then warm (every stage skipped). A stage's own time is the wall time of
its command, from DVC printing the command to DVC updating dvc.lock after it. Prefect's temporary
server is started (and timed) first, as a deployment finds a server running. For reference, plain
`dvc repro` runs the same cold and warm pipeline in a second fresh copy, timed the same way.

    python bench/flow_overhead.py                  # params.yaml as committed (the default data)
    python bench/flow_overhead.py --set pretrain.max_epochs=2 train.max_epochs=2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import REPO, add_overrides_option, parse_overrides

sys.path.insert(0, str(REPO))  # flows/ lives at the repository root

PROJECT = ("src", "data/raw", ".dvc/config", "dvc.yaml", "params.yaml", ".gitignore")


def fresh_repo(folder: Path, overrides: dict) -> Path:
    """The project as committed (HEAD) in a new git + DVC repository, params overridden."""
    from trackflow.config import set_dotted

    repo = folder / "repo"
    repo.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "HEAD", *PROJECT], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x"], input=archive, cwd=repo, check=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@trackflow.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--force"], cwd=repo, check=True)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=repo, check=True)
    return repo


def timed_flow(repo: Path) -> tuple[float, float, dict]:
    """Run the training flow; its wall time, the sum of its stages' command times, the summary."""
    from flows.training import training_flow

    start = time.perf_counter()
    summary = training_flow(repo=str(repo))
    wall = time.perf_counter() - start
    return wall, sum(stage["command_seconds"] for stage in summary["stages"]), summary


def timed_dvc_repro(repo: Path) -> tuple[float, float]:
    """Run `dvc repro`; its wall time and the sum of its stages' command times (same rule)."""
    from trackflow.pipeline.driver import stage_env

    start = time.perf_counter()
    commands, began = 0.0, None
    with subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=repo,
        env=stage_env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        for line in process.stdout:
            if line.startswith("> "):
                began = time.perf_counter()
            elif began is not None and line.startswith("Updating lock file"):
                commands, began = commands + time.perf_counter() - began, None
        if process.wait():
            sys.exit("dvc repro failed")
    return time.perf_counter() - start, commands


def row(name: str, wall: float, commands: float) -> str:
    overhead = wall - commands
    share = f"{overhead / commands:.1%}" if commands else "n/a (nothing ran)"
    return f"| {name} | {wall:.1f} | {commands:.1f} | {overhead:.1f} | {share} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_overrides_option(parser)
    parser.add_argument("--no-dvc-reference", action="store_true", help="skip plain dvc repro")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each repository's own store, from its params
    from prefect import flow

    import flows  # noqa: F401  (Prefect defaults for this machine)

    @flow
    def warm_up() -> None:
        """Starts Prefect's temporary server."""

    start = time.perf_counter()
    warm_up()
    server = time.perf_counter() - start
    rows, stages = [], []
    with tempfile.TemporaryDirectory() as tmp:
        repo = fresh_repo(Path(tmp) / "flow", overrides)
        cold_wall, cold_commands, cold = timed_flow(repo)
        warm_wall, warm_commands, warm = timed_flow(repo)
        assert {s["status"] for s in cold["stages"]} == {"ran"}, cold["stages"]
        assert {s["status"] for s in warm["stages"]} == {"skipped"}, warm["stages"]
        rows += [row("flow, cold", cold_wall, cold_commands)]
        rows += [row("flow, warm (all skipped)", warm_wall, warm_commands)]
        stages = [
            f"| {s['stage']} | {s['seconds']:.1f} | {s['command_seconds']:.1f} |"
            for s in cold["stages"]
        ]
        if not args.no_dvc_reference:
            reference = fresh_repo(Path(tmp) / "dvc", overrides)
            rows += [row("`dvc repro`, cold", *timed_dvc_repro(reference))]
            rows += [row("`dvc repro`, warm", *timed_dvc_repro(reference))]
    print(f"overrides: {overrides or 'none'}; Prefect temporary server start: {server:.1f} s\n")
    print("| run | wall s | sum of stage commands s | overhead s | overhead |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| stage (flow, cold) | task s | command s |\n|---|---|---|")
    print("\n".join(stages))


if __name__ == "__main__":
    main()
