"""Driving the DVC pipeline one stage at a time, without Prefect: what the training flow wires.

DVC is the only judge of what is stale. :func:`stage_status` asks it (``dvc status`` through its
Python API) whether a stage is up to date and why not; :func:`reproduce_stage` runs
``dvc repro --single-item <stage>``, the same code path as ``dvc repro``, in a subprocess with
its output captured, and classifies a failure as transient (worth retrying) or deterministic.
:func:`applied_params` puts a run's params into the workspace's ``params.yaml`` for the run's
duration and restores the file's bytes afterwards.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from trackflow.config import MlflowConfig, Params, set_dotted
from trackflow.errors import ConfigError, TrackflowError, TrackingUnavailable
from trackflow.registry.lineage import FLOW_RUN_ENV
from trackflow.tracking import is_transient

PARAMS_FILE = "params.yaml"  # what dvc.yaml's stages read and DVC tracks

_EXIT_KINDS = {2: "params", 3: "data"}
_EXITED = re.compile(r"exited with (-?\d+)")


@dataclass(frozen=True)
class StageOutcome:
    """What happened to one stage in one flow run.

    Attributes:
        stage: The stage's name in ``dvc.yaml``.
        status: ``ran``, ``restored`` (from DVC's run cache), ``skipped`` or ``failed``.
        reason: Why DVC ran it (what changed), or why it did not.
        seconds: Wall time of the whole step, DVC included.
        command_seconds: Wall time of the stage's command alone (0 when it did not run).
        attempts: How many times it was tried.
    """

    stage: str
    status: str
    reason: str
    seconds: float
    command_seconds: float = 0.0
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON."""
        return asdict(self)


class StageFailed(TrackflowError):
    """A stage's command (or DVC around it) failed.

    Attributes:
        stage: The stage's name.
        exit_code: The stage command's exit status, or DVC's when the command never ran.
        kind: ``transient``, ``params``, ``data``, ``error`` (another user-caused error) or
            ``crash`` (a bug: a traceback).
        detail: The last lines of the output.
        seconds: Wall time of the failed attempt.
        attempts: Which attempt this was (set by the caller that retries).
    """

    def __init__(self, stage: str, exit_code: int, kind: str, detail: str, seconds: float):
        self.stage, self.kind, self.detail, self.seconds = stage, kind, detail, seconds
        self.exit_code = exit_code
        self.attempts = 1
        super().__init__(f"stage {stage!r} failed ({kind}, exit status {exit_code}): {detail}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the extra arguments
        args = (self.stage, self.exit_code, self.kind, self.detail, self.seconds)
        return (type(self), args, self.__dict__)

    @property
    def transient(self) -> bool:
        """Whether trying again may succeed."""
        return self.kind == "transient"


def classify_failure(exit_code: int, output: str) -> str:
    """The kind of a failed stage from its exit status and output (see :class:`StageFailed`).

    The exit status decides first: 75 (:class:`~trackflow.errors.TrackingUnavailable`) is
    transient, 2 and 3 are bad params and bad data whatever else the output says (a library may
    have logged a connection it retried). Any other failure is transient if its output bears a
    sign of a passing fault (a locked store met mid-stage), else a crash or an error.
    """
    if exit_code == TrackingUnavailable.exit_code:
        return "transient"
    if exit_code in _EXIT_KINDS:
        return _EXIT_KINDS[exit_code]
    if is_transient(output):
        return "transient"
    return "crash" if "Traceback (most recent call last)" in output else "error"


def stage_order(root: Path, until: str | None = None) -> list[str]:
    """The stages ``dvc repro [until]`` would visit, in the order it would visit them.

    Raises:
        ConfigError: ``until`` names no stage of ``dvc.yaml``.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro
    from dvc.stage import PipelineStage

    try:
        repo = Repo(str(root))
    except DvcException as exc:
        raise ConfigError(f"{root} is not a DVC repository with a pipeline: {exc}") from None
    with repo:
        try:
            targets = collect_stages(repo, [_target(root, until)])
        except DvcException as exc:
            names = ", ".join(stage.name for stage in repo.index.stages)
            raise ConfigError(f"no stage {until!r} in dvc.yaml ({exc}); stages: {names}") from None
        stages = plan_repro(get_active_graph(repo.index.graph), targets)
        return [s.name for s in stages if isinstance(s, PipelineStage)]  # not a batch's .dvc


def stage_status(root: Path, stage: str) -> str | None:
    """Why DVC would rerun ``stage`` now (``None``: it is up to date, DVC would skip it)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = repo.status(targets=[_target(root, stage)])
    changes = next(iter(found.values()), None)  # keyed by a path relative to the caller's cwd
    if not changes:
        return None
    lock = root / "dvc.lock"
    locked = yaml.safe_load(lock.read_text()) if lock.exists() else None
    if stage not in ((locked or {}).get("stages") or {}):
        return "never run (no entry in dvc.lock)"
    return describe_changes(changes)


def _target(root: Path, stage: str | None) -> str:
    """A stage of ``root``'s ``dvc.yaml`` as DVC's Python API takes it, from any working folder."""
    project = str(root / "dvc.yaml")
    return f"{project}:{stage}" if stage else project


def describe_changes(changes: list[Any]) -> str:
    """``dvc status`` entries of one stage as one line.

    ``[{"changed deps": {"params.yaml": {"train": "modified"}}}, "changed command"]`` becomes
    ``changed deps: params.yaml (train: modified); changed command``.
    """
    parts = []
    for change in changes:
        if not isinstance(change, dict):
            parts.append(str(change))
            continue
        for what, items in change.items():
            listed = [
                f"{path} ({_inline(state)})" if state else str(path)
                for path, state in items.items()
            ]
            parts.append(f"{what}: {', '.join(listed)}")
    return "; ".join(parts)


def _inline(state: Any) -> str:
    if isinstance(state, dict):
        return ", ".join(f"{key}: {value}" for key, value in state.items())
    return str(state)


def reproduce_stage(
    root: Path,
    stage: str,
    reason: str,
    env: Mapping[str, str],
    on_line: Callable[[str], None] = lambda line: None,
) -> StageOutcome:
    """Run ``dvc repro --single-item <stage>`` in ``root``; stream and time its output.

    Args:
        root: The DVC repository.
        stage: The stage to reproduce (its upstream stages are assumed reproduced already).
        reason: Why it is stale, from :func:`stage_status`.
        env: Environment of the DVC process and so of the stage's command.
        on_line: Called with each output line as it arrives.

    Raises:
        StageFailed: DVC or the stage's command failed.
    """
    start = time.perf_counter()
    command_start = command_end = None
    lines: list[str] = []
    dvc = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    with subprocess.Popen(
        dvc,
        cwd=root,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as process:
        try:
            for line in process.stdout:  # type: ignore[union-attr]
                now = time.perf_counter()
                line = line.rstrip("\n")
                if command_start is None and line.startswith("> "):
                    command_start = now  # DVC prints the command just before starting it
                elif command_start and not command_end and line.startswith("Updating lock file"):
                    command_end = now  # ... and updates dvc.lock right after it ended
                lines.append(line)
                on_line(line)
        except BaseException:  # e.g. KeyboardInterrupt: Popen's exit would not stop dvc
            process.kill()
            raise
        code = process.wait()
    end = time.perf_counter()
    output = "\n".join(lines)
    command_seconds = ((command_end or end) - command_start) if command_start else 0.0
    if code != 0:
        stage_codes = _EXITED.findall(output)  # the last one: DVC's own final line
        exit_code = int(stage_codes[-1]) if stage_codes else code
        kind = classify_failure(exit_code, output)
        raise StageFailed(stage, exit_code, kind, _failure_detail(lines), end - start)
    if f"Stage '{stage}' is cached" in output:
        status, reason = "restored", f"{reason}; outputs restored from DVC's run cache"
    elif f"Running stage '{stage}'" in output:
        status = "ran"
    else:  # another process reproduced it between the status check and now
        status, reason = "skipped", "up to date (reproduced meanwhile by another DVC process)"
    return StageOutcome(stage, status, reason, end - start, command_seconds)


def _failure_detail(lines: list[str], keep: int = 3) -> str:
    """The lines that say what went wrong: the stage's ``error:`` line, else the last ones."""
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error: ")
    meaningful = [line for line in lines if line.strip() and not line.startswith("ERROR: failed")]
    return " | ".join(meaningful[-keep:]) or "no output"


def stage_env(flow_run_id: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The stages' environment: this one, this interpreter's folder first on ``PATH``, the run id.

    The folder first on ``PATH`` makes ``python -m trackflow.stages.<name>`` in ``dvc.yaml`` run
    with the interpreter that runs the flow, whatever the caller's ``PATH``.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # output lines arrive when written: stage timing stays true
    if flow_run_id:
        env[FLOW_RUN_ENV] = flow_run_id
    return env | dict(extra or {})


def effective_params(params: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The raw params a run uses: ``params`` with ``overrides`` (dotted keys) set on top."""
    raw = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return raw


@contextmanager
def applied_params(root: Path, params: Path, overrides: Mapping[str, Any]) -> Iterator[bool]:
    """Give the workspace's ``params.yaml`` a run's params, then restore its exact bytes.

    The stages read ``params.yaml`` and DVC tracks it, so the run's values go there: DVC then
    sees them as changed params and records them in ``dvc.lock``, exactly as after an edit; the
    next run without them sees them change back. The committed file is never touched. A copy of
    the original waits in ``.dvc/tmp`` while the run lasts; if a killed run leaves it behind, the
    next run refuses to start until someone decides which file is right.

    Yields:
        Whether ``params.yaml`` was changed for the run.
    """
    target = root / PARAMS_FILE
    backup = root / ".dvc" / "tmp" / "trackflow-params.yaml.orig"
    if backup.exists():
        raise ConfigError(
            f"{backup} exists: an earlier flow run was interrupted while {target} held its "
            f"overrides. Keep the params you want (`mv {backup} {target}` restores the original) "
            f"and delete {backup}"
        )
    if params.resolve() == target.resolve() and not overrides:
        yield False
        return
    original = target.read_bytes()
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_bytes(original)
    try:
        target.write_text(
            "# Written by the trackflow flow for one run; restored when it ends.\n"
            + yaml.safe_dump(effective_params(params, overrides), sort_keys=False),
            encoding="utf-8",
        )
        yield True
    finally:
        target.write_bytes(original)
        backup.unlink()


@contextmanager
def exclusive_repo(root: Path) -> Iterator[None]:
    """Hold the repository for one flow run: a second run at the same time fails at once.

    Two flows in one repository would run two ``dvc`` processes at once (which fails on DVC's
    lock) and fight over ``params.yaml``.
    """
    path = root / ".dvc" / "tmp" / "trackflow-flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise TrackflowError(
                f"another trackflow flow run is using {root} ({holder}); wait for it to end"
            ) from None
        handle.truncate(0)
        handle.write(json.dumps({"pid": os.getpid()}))
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def repo_tracking_config(root: Path, params: Params) -> MlflowConfig:
    """The params' MLflow settings with local paths made absolute against ``root``.

    The stages run inside the repository; a flow may run anywhere.
    """
    config = params.base.mlflow
    uri, artifacts = config.tracking_uri, config.artifact_location
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{root / uri.removeprefix('sqlite:///')}"
    if "://" not in artifacts and not Path(artifacts).is_absolute():
        artifacts = str(root / artifacts)
    return config.model_copy(update={"tracking_uri": uri, "artifact_location": artifacts})


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as overrides, values read as YAML (``8`` is an int, ``null`` None)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: write KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides
