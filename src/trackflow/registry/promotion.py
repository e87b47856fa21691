"""Promotion in the MLflow model registry: aliases behind a gate, a lock, and a ledger.

- Every candidate becomes a new version with the alias ``challenger``.
- :func:`promote_if_better` re-scores the challenger and the current ``champion`` on the same
  pinned rows (:mod:`trackflow.registry.gate`) and moves ``champion`` only if the gate says so.
- Every alias move and gate decision is appended to a **ledger** kept in the registry itself, as
  registered-model tags ``trackflow.ledger.<seq>`` holding one JSON entry each (who, what, when,
  why: versions, run id, metrics, git commit). Entries are only ever added. :func:`rollback` moves
  ``champion`` back to the version it replaced, and records that too.
- Changes are serialised by a lock that also lives in the registry (a registered model named
  ``<name>.promotion-lock``, whose creation is atomic in every MLflow store), so two promotions
  racing for the same model leave exactly one champion and a consistent ledger.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trackflow.errors import TrackflowError, why
from trackflow.tracking import TAG_PREFIX

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from trackflow.config import PromotionConfig
    from trackflow.registry.gate import Decision, Evaluation, GateSet, SeenRows
    from trackflow.tracking import Tracking

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
LEDGER_TAG = TAG_PREFIX + "ledger."
LOCK_SUFFIX = ".promotion-lock"
#: A lock older than this is taken to be left by a promotion that died (one takes seconds).
STALE_LOCK_S = 600.0


#: The version's run artifact recording its training and validation rows (:class:`SeenRows`).
SEEN_ROWS_ARTIFACT = "gate/seen_rows.json"
#: The version tag of the DVC split it was trained on (``dvc.lock``'s md5 of ``data/split``).
SPLIT_TAG = TAG_PREFIX + "dvc.data/split"


class PromotionError(TrackflowError):
    """A promotion or rollback cannot be done as asked; nothing in the registry changed."""


@dataclass(frozen=True)
class Contender:
    """A version the gate scores: how it predicts, the raw columns it takes, the rows it saw.

    Attributes:
        name: Its registered model.
        version: Its version number.
        role: ``"challenger"`` or ``"champion"``.
        predict: Raw rows in, ``label`` and ``anomaly_score`` (at least) out.
        columns: Its raw feature columns.
        seen: Its training and validation rows; None when it recorded none.
    """

    name: str
    version: str
    role: str
    predict: Callable[[pd.DataFrame], pd.DataFrame] = field(repr=False)
    columns: list[str] = field(repr=False)
    seen: SeenRows | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``champion version 3``: how messages name it."""
        return f"{self.role} version {self.version}"

    def held_out(self, gate_set: GateSet) -> GateSet:
        """The gate rows it did not see (all of them when it recorded none).

        Raises:
            PromotionError: The rows lack some of its columns.
        """
        from trackflow.errors import preview

        missing = [c for c in self.columns if c not in set(gate_set.rows.columns)]
        if missing:
            raise PromotionError(
                f"{self.name} {self.label} cannot score the test rows: they lack its columns "
                f"{preview(missing, 3)}"
            )
        return gate_set if self.seen is None else gate_set.subset(gate_set.unseen_by(self.seen))

    def evaluate(self, gate_set: GateSet) -> Evaluation:
        """Its scores on ``gate_set``.

        Raises:
            PromotionError: It cannot score the rows (one line naming the version and the error).
        """
        from trackflow.registry.gate import evaluate

        try:
            return evaluate(self.predict, gate_set)
        except Exception as exc:  # any failure of the model's own code: say which and why
            raise PromotionError(
                f"{self.name} {self.label} cannot score the test rows: {why(exc)}"
            ) from None


def load_contender(tracking: Tracking, name: str, version: str, role: str) -> Contender:
    """Load a registered version for the gate, with the columns and rows it was trained on.

    Raises:
        PromotionError: Its files cannot be loaded, or it is not a trackflow model.
    """
    from trackflow.registry.loading import NotPackagedModel, UnloadableVersion, load_version
    from trackflow.registry.uris import model_uri

    label = f"{name} {role} version {version}"
    try:
        loaded = load_version(tracking, model_uri(name, version=version))
    except UnloadableVersion as exc:
        problem = f"cannot be loaded from {exc.source} ({exc.problem})"
        raise PromotionError(f"{label} {problem}") from None
    except NotPackagedModel as exc:
        raise PromotionError(
            f"{label} is not a trackflow model (no scorer of raw rows in {exc.registered.source});"
            " only versions registered by the register stage can be gated"
        ) from None
    seen = read_seen_rows(tracking, loaded.registered.run_id)
    return Contender(name, str(version), role, loaded.model.predict, loaded.scorer.columns, seen)


def read_seen_rows(tracking: Tracking, run_id: str | None) -> SeenRows | None:
    """The training and validation rows recorded on a run, or None if it recorded none.

    Raises:
        PromotionError: The record is there but cannot be read.
    """
    import tempfile

    from mlflow.exceptions import MlflowException

    from trackflow.registry.gate import SeenRows

    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = tracking.client.download_artifacts(run_id, SEEN_ROWS_ARTIFACT, folder)
        except (MlflowException, OSError):
            return None
        try:
            return SeenRows.from_json(json.loads(Path(path).read_text()))
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise PromotionError(
                f"run {run_id} has a {SEEN_ROWS_ARTIFACT} this trackflow cannot read ({why(exc)})"
            ) from None


def record_seen_rows(tracking: Tracking, run_id: str, seen: SeenRows) -> None:
    """Log a version's training and validation rows to its run (:data:`SEEN_ROWS_ARTIFACT`)."""
    tracking.client.log_dict(run_id, seen.to_json(), SEEN_ROWS_ARTIFACT)


def borrow_split_record(
    tracking: Tracking, name: str, champion: Contender, challenger: Contender
) -> Contender:
    """The champion, lent the challenger's record of its rows if it has none and they share a split.

    A version registered before trackflow recorded its rows still carries the DVC hash of the
    split it was trained on (:data:`SPLIT_TAG`): the same split means the same training and
    validation rows.
    """
    from dataclasses import replace

    if champion.seen is not None or challenger.seen is None:
        return champion
    splits = [
        tracking.client.get_model_version(name, c.version).tags.get(SPLIT_TAG)
        for c in (champion, challenger)
    ]
    same = splits[0] is not None and splits[0] == splits[1]
    return replace(champion, seen=challenger.seen) if same else champion


@dataclass(frozen=True)
class LedgerEntry:
    """One alias move or gate decision: who, what, when, why."""

    seq: int
    time: str
    action: str  # challenger | promote | reject | rollback
    alias: str
    version: str
    previous: str | None
    run_id: str | None
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    git_commit: str | None = None
    who: str = ""

    def to_tag(self) -> tuple[str, str]:
        """The registered-model tag that stores this entry."""
        return f"{LEDGER_TAG}{self.seq:06d}", json.dumps(asdict(self), sort_keys=True)


def ledger(client: MlflowClient, name: str) -> list[LedgerEntry]:
    """The model's ledger, oldest entry first."""
    tags = client.get_registered_model(name).tags
    entries = [json.loads(v) for k, v in tags.items() if k.startswith(LEDGER_TAG)]
    return [LedgerEntry(**entry) for entry in sorted(entries, key=lambda e: e["seq"])]


def history_table(entries: list[LedgerEntry]) -> pd.DataFrame:
    """The ledger as a table, one row per entry, metrics as columns."""
    import pandas as pd

    rows = [
        {k: v for k, v in asdict(e).items() if k != "metrics"} | dict(e.metrics) for e in entries
    ]
    return pd.DataFrame(rows)


def alias_version(client: MlflowClient, name: str, alias: str = CHAMPION) -> str | None:
    """The version an alias points at, as a string, or None."""
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


@contextmanager
def promotion_lock(client: MlflowClient, name: str, timeout_s: float) -> Iterator[None]:
    """Hold the model's promotion lock for the block; wait up to ``timeout_s`` for it.

    The lock is a registered model whose ``holder`` tag names its holder with a unique token; it
    is released only by that holder, and broken by a waiter only once it is older than
    :data:`STALE_LOCK_S` (its holder died) and still held by the same token.

    Raises:
        PromotionError: Another promotion held the lock for longer than ``timeout_s``.
    """
    from trackflow.registry.uris import create_registered_model

    lock = name + LOCK_SUFFIX
    holder = f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex}"
    deadline = time.monotonic() + timeout_s
    fields = {"tags": {"holder": holder}, "description": f"trackflow: promotion of {name} running"}
    waiting = False
    while not create_registered_model(client, lock, **fields):
        if not waiting:  # once: a promotion that seems to hang says what it waits for
            log.info("waiting for the lock %s held by %s", lock, _holder(client, lock)[0])
            waiting = True
        _break_if_stale(client, lock)
        if time.monotonic() > deadline:
            raise PromotionError(
                f"another promotion of {name!r} holds the lock {lock!r} (waited {timeout_s:g} s, "
                "promotion.lock_timeout_s); if none is running, delete that registered model"
            )
        time.sleep(0.1 + random.random() * 0.2)
    try:
        yield
    finally:
        _release(client, lock, holder)


def _holder(client: MlflowClient, lock: str) -> tuple[str | None, float]:
    """Who holds ``lock`` and for how many seconds; (None, 0) when nobody does."""
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return None, 0.0
    return held.tags.get("holder"), time.time() - held.creation_timestamp / 1000


def _release(client: MlflowClient, lock: str, holder: str) -> None:
    from mlflow.exceptions import MlflowException

    if _holder(client, lock)[0] == holder:  # not a lock another process took after a break
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def _break_if_stale(client: MlflowClient, lock: str) -> None:
    holder, age = _holder(client, lock)
    if holder is not None and age > STALE_LOCK_S:
        log.warning("breaking lock %s held by %s for %.0f s", lock, holder, age)
        _release(client, lock, holder)


def append_entry(
    client: MlflowClient, name: str, git_commit: str | None = None, **fields: Any
) -> LedgerEntry:
    """Append an entry to the ledger; call it holding :func:`promotion_lock`."""
    entries = ledger(client, name)
    entry = LedgerEntry(
        seq=(entries[-1].seq if entries else 0) + 1,
        time=datetime.now(UTC).isoformat(timespec="seconds"),
        git_commit=git_commit,
        who=f"{getpass.getuser()}@{socket.gethostname()}",
        **fields,
    )
    client.set_registered_model_tag(name, *entry.to_tag())
    return entry


def register_candidate(
    tracking: Tracking,
    name: str,
    model_uri: str,
    run_id: str,
    model_id: str | None,
    tags: dict[str, str],
    timeout_s: float,
) -> str:
    """Register a logged model as a new version of ``name`` with the alias ``challenger``.

    Returns:
        The new version number.
    """
    from trackflow.registry.uris import create_registered_model
    from trackflow.tracking import fluent_tracking

    client = tracking.client
    create_registered_model(client, name, description="trackflow classifier of raw rows")
    # MLflow resolves a models:/m-<id> source through the process-wide tracking URI.
    with promotion_lock(client, name, timeout_s), fluent_tracking(tracking):
        version = str(
            client.create_model_version(
                name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id
            ).version
        )
        previous = alias_version(client, name, CHALLENGER)
        client.set_registered_model_alias(name, CHALLENGER, version)
        append_entry(
            client,
            name,
            tags.get(TAG_PREFIX + "git_commit"),
            action="challenger",
            alias=CHALLENGER,
            version=version,
            previous=previous,
            run_id=run_id,
            reason=f"registered from run {run_id}",
        )
    return version


def promote_if_better(
    tracking: Tracking,
    name: str,
    version: str,
    gate_set: GateSet,
    config: PromotionConfig,
    seed: int,
    challenger: Contender | None = None,
    force: str | None = None,
) -> Decision:
    """Gate a registered version against the champion; move ``champion`` if it passes.

    Both are scored inside the lock, so a concurrent promotion cannot change the champion between
    the comparison and the move, and only on the gate rows neither trained or early-stopped on
    (:func:`~trackflow.registry.gate.comparable_rows`); with rows of added batches among them, it
    must beat the champion on those and may lose at most ``max_forgetting`` on the original
    data's rows. The decision is recorded on the version
    (tags ``trackflow.gate.*``, its description), on its run (``gate/*`` metrics) and in the ledger.

    Args:
        tracking: The tracking store holding the registry.
        name: Registered model name.
        version: The version to gate (normally the ``challenger``).
        gate_set: The pinned rows both models are scored on.
        config: The gate's floors, metric, test, fewest rows and lock timeout.
        seed: Seed of the bootstrap.
        challenger: The version as already loaded (from the same files); else it is loaded
            from the registry.
        force: A person's reason to promote without comparing with the champion (after looking
            at why the gate could not compare); the floors still apply.

    Raises:
        PromotionError: The version cannot be loaded or cannot score the gate rows; nothing in
            the registry changed.
    """
    from trackflow.registry.gate import Decision

    client = tracking.client
    with promotion_lock(client, name, config.lock_timeout_s):
        model_version = client.get_model_version(name, version)
        current = alias_version(client, name)
        if current == version:
            decision = Decision(False, f"version {version} is already the champion", {})
            log.info("%s", decision.reason)
            return decision
        challenger = challenger or load_contender(tracking, name, version, CHALLENGER)
        champion: Contender | str | None = None
        if current is not None and not force:
            try:
                champion = load_contender(tracking, name, current, CHAMPION)
            except (
                PromotionError
            ) as exc:  # a broken champion blocks, but is no fault of the version
                champion = str(exc)
            else:
                champion = borrow_split_record(tracking, name, champion, challenger)
        decision = judge(gate_set, challenger, champion, config, seed)
        if force and current is not None and decision.promote:
            decision = _forced(decision, current, force)
        _record(tracking, name, model_version, decision, current, gate_set.digest)
    return decision


def judge(
    gate_set: GateSet,
    challenger: Contender,
    champion: Contender | str | None,
    config: PromotionConfig,
    seed: int,
) -> Decision:
    """The gate's decision, on the rows neither model saw.

    Args:
        gate_set: The pinned rows.
        challenger: The version gated.
        champion: The champion; why it cannot be used (a one-line text); or None if there is none.
        config: The gate's settings.
        seed: Seed of the bootstrap.

    Raises:
        PromotionError: The challenger cannot score the rows.
    """
    from trackflow.registry.gate import comparable_rows, decide

    own = challenger.held_out(gate_set)
    problem = champion if isinstance(champion, str) else None
    if isinstance(champion, Contender):
        keep, problem = comparable_rows(
            gate_set,
            {challenger.label: challenger.seen, champion.label: champion.seen},
            {challenger.label: challenger.columns, champion.label: champion.columns},
            config.min_gate_rows,
        )
        if problem is None:
            compared = gate_set.subset(keep)
            try:
                scores = champion.evaluate(compared)
            except PromotionError as exc:
                problem = str(exc)
            else:
                decision = decide(challenger.evaluate(compared), scores, config, seed)
                return _with_rows(decision, gate_set, compared)
    if problem is not None:
        problem += (
            f"; after looking (trackflow lineage), `trackflow promote --version "
            f"{challenger.version} --force --reason ...` promotes it without the comparison"
        )
    decision = decide(challenger.evaluate(own), None, config, seed, problem)
    return _with_rows(decision, gate_set, own, known=challenger.seen is not None)


def _forced(decision: Decision, champion: str, reason: str) -> Decision:
    """A promotion by hand: the floors passed, the champion was not compared."""
    from dataclasses import replace

    scores = ", ".join(f"{k} {v:.4f}" for k, v in decision.challenger.items())
    text = f"promoted by hand, not compared with champion version {champion}: {reason} ({scores})"
    return replace(decision, reason=text)


def _with_rows(
    decision: Decision, gate_set: GateSet, used: GateSet, known: bool = True
) -> Decision:
    """The decision with the labelled rows it scored and those left out as seen by a model."""
    from dataclasses import replace

    rows = decision.rows | {"compared": used.n_labelled}
    if known:
        rows["excluded"] = gate_set.n_labelled - used.n_labelled
    reason = decision.reason
    if rows.get("excluded") and not reason.startswith("not compared"):
        reason += (
            f" [on {used.n_labelled} of {gate_set.n_labelled} labelled test rows: "
            f"{rows['excluded']} were training/validation rows]"
        )
    return replace(decision, reason=reason, rows=rows)


def _record(
    tracking: Tracking,
    name: str,
    model_version: Any,
    decision: Decision,
    current: str | None,
    digest: str,
) -> None:
    """Move the alias and append the ledger entry (together, first), then tag version and run."""
    from trackflow.tracking import log_metrics

    client, version, run_id = tracking.client, str(model_version.version), model_version.run_id
    outcome = "promoted" if decision.promote else "rejected"
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    append_entry(
        client,
        name,
        model_version.tags.get(TAG_PREFIX + "git_commit"),
        action="promote" if decision.promote else "reject",
        alias=CHAMPION,
        version=version,
        previous=current,
        run_id=run_id,
        reason=decision.reason,
        metrics=decision.scores() | {f"rows_{k}": v for k, v in decision.rows.items()},
    )
    if decision.promote and alias_version(client, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    tags = {
        "gate.decision": outcome,
        "gate.reason": decision.reason,
        "gate.champion_version": current or "none",
        "gate.test_digest": digest,
    } | {f"gate.{k}": f"{v:.6g}" for k, v in decision.scores().items()}
    tags |= {f"gate.rows_{k}": str(v) for k, v in decision.rows.items()}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, TAG_PREFIX + key, value)
    client.update_model_version(name, version, description=f"Gate: {outcome}. {decision.reason}")
    if run_id:
        log_metrics(tracking, run_id, decision.metrics())
        client.set_tag(run_id, TAG_PREFIX + "gate.decision", outcome)
        client.set_tag(run_id, TAG_PREFIX + "gate.reason", decision.reason)
    log.info("%s version %s %s: %s", name, version, outcome, decision.reason)


def rollback(tracking: Tracking, name: str, reason: str, timeout_s: float) -> LedgerEntry:
    """Move ``champion`` back to the version it replaced, as recorded in the ledger.

    Promotions push a version on the ledger's champion stack and rollbacks pop it, so repeated
    rollbacks walk back through earlier champions.

    Raises:
        PromotionError: There is no earlier champion, or the alias was moved outside trackflow.
    """
    client = tracking.client
    with promotion_lock(client, name, timeout_s):
        stack = champion_stack(ledger(client, name))
        current = alias_version(client, name)
        if not stack or stack[-1] != current:
            raise PromotionError(
                f"{name}@{CHAMPION} is version {current} but the ledger says "
                f"{stack[-1] if stack else 'none'}: the alias was moved outside trackflow; move "
                "it back first"
            )
        if len(stack) < 2:
            raise PromotionError(f"{name} has no earlier champion than version {current}")
        target = stack[-2]
        client.set_registered_model_alias(name, CHAMPION, target)
        run_id = client.get_model_version(name, target).run_id
        entry = append_entry(
            client,
            name,
            action="rollback",
            alias=CHAMPION,
            version=target,
            previous=current,
            run_id=run_id,
            reason=reason,
        )
    log.info("%s@%s rolled back from version %s to %s", name, CHAMPION, current, target)
    return entry


def champion_stack(entries: list[LedgerEntry]) -> list[str]:
    """Champion versions in force, oldest first: promotions push, rollbacks pop."""
    stack: list[str] = []
    for entry in entries:
        if entry.action == "promote":
            stack.append(entry.version)
        elif entry.action == "rollback" and stack:
            stack.pop()
    return stack


@contextmanager
def registry_errors(name: str) -> Iterator[None]:
    """Turn the registry's 'no such model, version or alias' into a one-line error."""
    from mlflow.exceptions import MlflowException

    from trackflow.errors import ConfigError

    try:
        yield
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ConfigError(f"registered model {name!r}: {exc.message}") from None
