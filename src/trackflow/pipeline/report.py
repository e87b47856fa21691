"""What a training flow run produced, read from the pipeline's outputs, and its markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from trackflow.config import flatten

#: The outputs the report reads, found in ``dvc.yaml`` (the one place their paths are written)
#: as (stage, ``outs`` or ``metrics``, how the file's name ends). One that is not declared, or not
#: there yet, is simply not reported.
TRAIN_RUN = ("train", "outs", "_run.json")
EVALUATE_METRICS = ("evaluate", "metrics", ".json")
ANOMALY_METRICS = ("anomaly", "metrics", ".json")
REGISTERED = ("register", "outs", ".json")
REGISTER_METRICS = ("register", "metrics", ".json")


def declared_output(root: Path, stage: str, section: str, ending: str) -> Path | None:
    """The first file of ``stage``'s ``section`` in ``root/dvc.yaml`` whose name ends so."""
    dvc_yaml = root / "dvc.yaml"
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") if dvc_yaml.exists() else {}
    for entry in ((stages or {}).get(stage) or {}).get(section) or []:
        path = str(next(iter(entry)) if isinstance(entry, dict) else entry)  # {path: {cache: ..}}
        if path.endswith(ending):
            return root / path
    return None


def _read(root: Path, output: tuple[str, str, str]) -> dict[str, Any] | None:
    path = declared_output(root, *output)
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def pipeline_results(root: Path) -> dict[str, Any]:
    """The key results the pipeline's outputs hold now: run, metrics, registration.

    Returns:
        ``{"mlflow_run_id", "experiment_id", "metrics": {...}, "registered": {...} | None}``;
        metrics are the numbers of the DVC metrics files: ``test/accuracy``, ``test/macro_f1``,
        the saved detector's ``anomaly/auroc`` (all held-out anomalies), ``anomaly/auroc_real``
        and ``anomaly/auroc_worst_corruption``, and the gate's headline under ``register/``.
    """
    run = _read(root, TRAIN_RUN) or {}
    metrics: dict[str, float] = {}
    if evaluation := _read(root, EVALUATE_METRICS):
        test = evaluation.get("test", {})
        metrics |= {f"test/{k}": test[k] for k in ("accuracy", "macro_f1") if k in test}
    if anomaly := _read(root, ANOMALY_METRICS):
        metrics |= {f"anomaly/{k}": v for k, v in _flat(anomaly).items()}
    if gate := _read(root, REGISTER_METRICS):
        metrics |= {f"register/{k}": v for k, v in _flat(gate).items()}
    return {
        "mlflow_run_id": run.get("run_id"),
        "experiment_id": run.get("experiment_id"),
        "metrics": metrics,
        "registered": _read(root, REGISTERED),
    }


def _flat(data: dict[str, Any]) -> dict[str, float]:
    """The numbers of nested metrics as ``a/b`` keys (flags, texts and nulls left out)."""
    flat = flatten(data, "/")
    return {k: v for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def render_markdown(summary: dict[str, Any]) -> str:
    """The flow run's report: stages, key metrics, promotion decision, MLflow run and version."""
    lines = [f"# trackflow training: {summary['state']}", ""]
    if summary.get("overrides"):
        lines += ["Overrides: " + ", ".join(f"`{k}={v}`" for k, v in summary["overrides"].items())]
        lines.append("")
    lines += [
        "| stage | result | why | step s | command s | attempts |",
        "|---|---|---|---|---|---|",
    ]
    for stage in summary["stages"]:
        why = stage["reason"].replace("|", "/")
        lines.append(
            f"| {stage['stage']} | {stage['status']} | {why} | {stage['seconds']:.1f} | "
            f"{stage['command_seconds']:.1f} | {stage['attempts']} |"
        )
    lines += ["", f"Flow wall time: {summary['seconds']:.1f} s", "", "## Metrics", ""]
    metrics = summary["metrics"]
    lines += [f"- `{k}`: {v:.4g}" for k, v in metrics.items()] or ["- none yet"]
    lines += ["", "## Model", ""]
    if run := summary.get("mlflow_run_id"):
        lines.append(f"- MLflow run: `{run}` (experiment {summary.get('experiment_id')})")
    lines += _registration_lines(summary)
    return "\n".join(lines) + "\n"


def _registration_lines(summary: dict[str, Any]) -> list[str]:
    registered = summary.get("registered")
    if not registered:
        return ["- Registered version: none (no register stage output)"]
    produced = "this run" if summary.get("registered_by_this_run") else "an earlier run"
    decision = "promoted to champion" if registered.get("promoted") else "not promoted"
    return [
        f"- Registered: `{registered.get('name')}` version {registered.get('version')} "
        f"(`{registered.get('model_uri')}`), registered by {produced}",
        f"- Promotion: **{decision}**: {registered.get('decision')}, {registered.get('reason')}",
        f"- Champion now: {_version(registered.get('champion'))}",
    ]


def render_batch_markdown(summary: dict[str, Any]) -> str:
    """A scored batch's report: counts, anomaly rate, drift verdict and its rules, top features."""
    counts, drift = summary["counts"], summary["drift"]
    fired = drift.get("rules_fired", [])
    verdict = f"**DRIFT DETECTED** by {', '.join(fired)}" if drift["detected"] else "no drift"
    lines = [
        f"# trackflow batch scoring: {counts['n_rows']} rows",
        "",
        f"- Model: `{summary['model_uri']}` (version {summary['model_version']})",
        f"- Anomalies: {counts['n_anomalies']} ({counts['anomaly_rate']:.1%})",
        "- Predicted labels: " + ", ".join(f"{k}: {v}" for k, v in counts["labels"].items()),
        f"- Drift: {verdict}: {len(drift['drifted_features'])} of {drift['n_features']} "
        f"features above PSI {drift['psi_threshold']}, largest PSI {drift['max_psi']:.3g}",
        f"- Outputs: {', '.join(f'`{p}`' for p in summary['outputs'])}",
        f"- MLflow run: `{summary['mlflow_run_id']}`",
        "",
        "| drift rule | fired | measured | limit | why |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {'**yes**' if r['fired'] else 'no'} | {r['value']:.3g} | "
        f"{r['limit']:.3g} | {r['reason'].replace('|', '/')} |"
        for r in drift.get("rules", [])
    ]
    lines += [
        "",
        "| feature | PSI | KS | training mean | batch mean |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {f['feature']} | {f['psi']:.3f} | {f['ks']:.3f} | {f['train_mean']:.3g} | "
        f"{f['batch_mean']:.3g} |"
        for f in summary["top_features"]
    ]
    return "\n".join(lines) + "\n"


def _version(version: Any) -> str:
    return "none" if version is None else f"version {version}"
