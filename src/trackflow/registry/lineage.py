"""Lineage: which code, params, data and backbone a model came from, and where it went since.

Training runs are tagged when they start (:func:`run_tags`, :func:`log_datasets`, and
:func:`batches_tag`: the labelled batches added to the data it trained on); the register stage
adds the DVC hashes of what the candidate consumed (:func:`dvc_hashes`). :func:`trace` walks back
from a registered version: data (and batches) -> preprocessing -> backbone -> training run ->
model version -> alias history.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trackflow.tracking import TAG_PREFIX

if TYPE_CHECKING:
    import pandas as pd

    from trackflow.config import Params
    from trackflow.tracking import Tracking

#: Environment variable through which an orchestrator passes its run id to the stages.
FLOW_RUN_ENV = "TRACKFLOW_FLOW_RUN_ID"
#: Tag (unprefixed) naming the added batches a run's data held: ``name:digest:rows``, ``;``-joined.
BATCHES_TAG = "data_batches"


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    """The commit checked out in ``cwd`` and whether tracked files differ from it."""
    try:
        commit = _git(cwd, "rev-parse", "HEAD")
        dirty = bool(_git(cwd, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown (not a git repository)", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def _git(cwd: str | Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def params_hash(params: Params) -> str:
    """Digest of the effective (validated, defaults filled in) params."""
    text = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_tags(params: Params) -> dict[str, str]:
    """Tags every candidate run gets: git state, params digest, orchestrator run id if any."""
    tags = git_state() | {"params_hash": params_hash(params)}
    if flow_run := os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = flow_run
    return {TAG_PREFIX + k: v for k, v in tags.items()}


def batches_tag(batches: list[dict[str, Any]]) -> dict[str, str]:
    """The :data:`BATCHES_TAG` tag of a run whose data held ``batches`` (the split's summary's).

    Args:
        batches: ``{"name", "digest", "rows"}`` of each added batch, in the order added; empty:
            the original data only (tagged ``none``).
    """
    value = ";".join(f"{b['name']}:{b['digest']}:{b['rows']}" for b in batches) or "none"
    return {TAG_PREFIX + BATCHES_TAG: value}


def read_batches_tag(value: str | None) -> list[dict[str, Any]] | None:
    """The batches a :data:`BATCHES_TAG` value names; None for a run without the tag."""
    if value is None:
        return None
    if value == "none":
        return []
    entries = (entry.rsplit(":", 2) for entry in value.split(";"))
    return [{"name": n, "digest": d, "rows": int(r)} for n, d, r in entries]


def training_lineage(tracking: Tracking, run_id: str, params: Params) -> dict[str, str]:
    """The lineage tags a training run got when it started (:func:`run_tags`, data, batches).

    For a run trained before those tags existed, the tags of ``params`` and the current commit.
    """
    tags = tracking.client.get_run(run_id).data.tags
    keys = [*run_tags(params), TAG_PREFIX + "data_digest", TAG_PREFIX + BATCHES_TAG]
    found = {key: tags[key] for key in keys if key in tags}
    return found if TAG_PREFIX + "git_commit" in found else run_tags(params) | found


def dvc_hashes(lock_file: str | Path, skip_stage: str = "register") -> dict[str, str]:
    """``trackflow.dvc.<path>`` tags: what ``dvc.lock`` records for the pipeline's data and models.

    Every dependency and output of every stage but ``skip_stage``, except code (in the git commit)
    and metrics and figures.

    Returns one tag saying why when there is no lock file (the stages ran outside ``dvc repro``).
    """
    import yaml

    path = Path(lock_file)
    if not path.is_file():
        return {TAG_PREFIX + "dvc": f"unavailable: no {path} (stages not run by dvc repro)"}
    lock = yaml.safe_load(path.read_text()) or {}
    tags = {}
    for name, stage in (lock.get("stages") or {}).items():
        if name == skip_stage:
            continue  # the stage asking: its entry is the previous run's
        for entry in [*stage.get("deps", []), *stage.get("outs", [])]:
            where = entry["path"]
            if where.endswith(".py") or where.startswith(("metrics/", "plots/")):
                continue  # code is in the git commit; metrics and figures are not consumed
            if "md5" in entry:
                tags[f"{TAG_PREFIX}dvc.{where}"] = str(entry["md5"])
    return tags


def log_datasets(
    tracking: Tracking, run_id: str, tables: dict[str, pd.DataFrame], digest: str, source: str
) -> None:
    """Record tables as the run's MLflow dataset inputs, by context (``training``, ...).

    Args:
        tracking: The tracking store.
        run_id: The run the datasets are inputs of.
        tables: Tables by context; each is logged as ``<context>`` with its own content digest.
        digest: Digest of the dataset they were split from, in each dataset's name.
        source: Where they were read from (a folder of the pipeline).
    """
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    from trackflow.data.ingest import table_digest

    with warnings.catch_warnings():  # MLflow's hint that int columns cannot hold NaN
        warnings.simplefilter("ignore", UserWarning)
        datasets = {
            context: from_pandas(
                table, source=source, name=f"{context}-{digest}", digest=table_digest(table)
            )._to_mlflow_entity()
            for context, table in tables.items()
        }
    inputs = [
        DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        for context, dataset in datasets.items()
    ]
    tracking.client.log_inputs(run_id, datasets=inputs)


def trace(tracking: Tracking, name: str, ref: str) -> dict[str, Any]:
    """The chain behind ``name`` at an alias or version, as nested mappings.

    Args:
        tracking: The tracking store holding the registry.
        name: Registered model name.
        ref: An alias (``champion``) or a version number.
    """
    from trackflow.registry.promotion import ledger

    client = tracking.client
    version = (
        client.get_model_version(name, ref)
        if ref.isdigit()
        else client.get_model_version_by_alias(name, ref)
    )
    run = client.get_run(version.run_id)
    tags = {k.removeprefix(TAG_PREFIX): v for k, v in run.data.tags.items()}
    params = run.data.params
    preprocess = _preprocess_run(tracking, tags.get("preprocess_run_id"))
    aliases = [
        a
        for a, v in client.get_registered_model(name).aliases.items()
        if str(v) == str(version.version)
    ]
    return {
        "data": {
            "source": params.get("data.source"),
            "digest": tags.get("data_digest"),
            "batches": read_batches_tag(tags.get(BATCHES_TAG)),
            "dvc": {k.removeprefix("dvc."): v for k, v in tags.items() if k.startswith("dvc.")},
            "datasets": [
                {"name": d.dataset.name, "digest": d.dataset.digest}
                for d in (run.inputs.dataset_inputs if run.inputs else [])
            ],
        },
        "preprocessing": preprocess,
        "backbone": {
            "source": tags.get("backbone_source"),
            "run_id": tags.get("backbone_run_id"),
            "version": tags.get("backbone_version"),
        },
        "training": {
            "run_id": run.info.run_id,
            "mode": tags.get("mode"),
            "status": run.info.status,
            "git_commit": tags.get("git_commit"),
            "git_dirty": tags.get("git_dirty"),
            "params_hash": tags.get("params_hash"),
            "prefect_flow_run_id": tags.get("prefect_flow_run_id"),
        },
        "model": {
            "name": name,
            "version": version.version,
            "source": version.source,
            "aliases": aliases,
            "gate": version.tags.get(TAG_PREFIX + "gate.reason"),
        },
        "history": [
            {"seq": e.seq, "time": e.time, "action": e.action, "alias": e.alias, "reason": e.reason}
            for e in ledger(client, name)
            if str(version.version) in (e.version, e.previous)
        ],
    }


def _preprocess_run(tracking: Tracking, run_id: str | None) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    if not run_id or run_id == "None":
        return {"run_id": None}
    try:
        run = tracking.client.get_run(run_id)
    except MlflowException:
        return {"run_id": run_id, "params": "run not found in this tracking store"}
    keep = ("preprocess.scaler", "preprocess.pca.n_components", "preprocess.fit_on")
    return {
        "run_id": run_id,
        "params": {k: run.data.params.get(k) for k in keep},
        "n_components": run.data.metrics.get("preprocess/n_components"),
        "explained_variance": run.data.metrics.get("preprocess/explained_variance"),
    }


def format_trace(chain: dict[str, Any]) -> str:
    """The chain as lines a person reads top to bottom."""
    data, pre, bb = chain["data"], chain["preprocessing"], chain["backbone"]
    train, model = chain["training"], chain["model"]
    kept = pre.get("n_components")
    variance = pre.get("explained_variance")
    backbone = " ".join(
        f"{label} {value}"
        for label, value in (("", bb["source"]), ("run", bb["run_id"]), ("version", bb["version"]))
        if value not in (None, "None")
    )
    lines = [
        f"data           {data['source']}  digest {data['digest']}",
        *_batch_lines(data.get("batches")),
        *(f"  dvc          {path}  {md5}" for path, md5 in data["dvc"].items()),
        *(f"  dataset      {d['name']}  digest {d['digest']}" for d in data["datasets"]),
        f"preprocessing  run {pre['run_id']}  {pre.get('params', {})}"
        + (f"  -> {kept:g} components, {variance:.1%} of variance" if kept and variance else ""),
        f"backbone      {backbone}",
        f"training run   {train['run_id']} ({train['status']})  mode {train['mode']}  "
        f"params {train['params_hash']}  git {train['git_commit']} (dirty: {train['git_dirty']})"
        + (f"  flow run {train['prefect_flow_run_id']}" if train["prefect_flow_run_id"] else ""),
        f"model version  {model['name']} v{model['version']}  {model['source']}  "
        f"aliases {', '.join(model['aliases']) or 'none'}",
        f"  gate         {model['gate']}",
        "alias history",
        *(
            f"  #{h['seq']} {h['time']} {h['action']} ({h['alias']}): {h['reason']}"
            for h in chain["history"]
        ),
    ]
    return "\n".join(lines)


def _batch_lines(batches: list[dict[str, Any]] | None) -> list[str]:
    """The added batches a model's data held, one line each (none recorded: no line)."""
    if batches is None:
        return []
    if not batches:
        return ["  batches      none (the original data only)"]
    return [f"  batch        {b['name']}  {b['rows']} rows  digest {b['digest']}" for b in batches]
