"""Continued training (``train.mode: continue``): which rows the champion's network trains on.

The champion keeps training on the target training rows it did not see (new labelled batches),
mixed with a replay sample of those it did see, so that it learns the new rows without forgetting
the old ones. Rows are told apart by content digest (:func:`trackflow.registry.gate.row_digests`)
against the champion's record of its rows (:class:`~trackflow.registry.gate.SeenRows`), not by row
id: ids are renumbered when the data changes, contents are not.

Pure pandas and numpy: the loop asks :func:`unseen_training_rows` whether there is anything new
to learn before it starts a training run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from trackflow.errors import ConfigError

if TYPE_CHECKING:
    from trackflow.registry.gate import SeenRows
    from trackflow.tracking import Tracking


class NoNewRows(ConfigError):
    """``train.mode: continue`` found no training row the champion has not seen already."""


@dataclass(frozen=True)
class ContinueRows:
    """The training rows of a continued fit, as row ids of the target training part.

    Attributes:
        new: Rows the champion did not see.
        replayed: The replay sample of the rows it did see (stratified by class, seeded).
        seen: How many of the training rows it saw (what ``replayed`` was drawn from).
    """

    new: pd.Index
    replayed: pd.Index
    seen: int

    @property
    def ids(self) -> pd.Index:
        """Every row trained on: new and replayed, in row-id order."""
        return self.new.append(self.replayed).sort_values()

    def tags(self) -> dict[str, str]:
        """``rows_new``, ``rows_replayed`` and ``rows_seen`` as run tags."""
        return {
            "rows_new": str(len(self.new)),
            "rows_replayed": str(len(self.replayed)),
            "rows_seen": str(self.seen),
        }


def is_unseen(digests: pd.Series | np.ndarray, seen: SeenRows) -> np.ndarray:
    """Whether each row digest is outside the record ``seen``, shape (n_rows,)."""
    values = np.asarray(digests, dtype=object)
    return np.fromiter((d not in seen.digests for d in values), bool, len(values))


def unseen_training_rows(rows: pd.DataFrame, seen: SeenRows) -> pd.DataFrame:
    """The rows of ``rows`` a model with the record ``seen`` did not see (compared by content).

    Args:
        rows: Raw rows holding at least the model's columns (``seen.columns``), e.g. the split's
            ``target_train.parquet``; other columns (the label) are ignored.
        seen: The model's record of its training and validation rows.

    Returns:
        The unseen rows, as they are in ``rows``; empty when there is nothing new to learn.

    Raises:
        ConfigError: ``rows`` lacks some of the model's columns.
    """
    from trackflow.registry.gate import row_digests

    missing = [c for c in seen.columns if c not in rows.columns]
    if missing:
        raise ConfigError(
            f"the rows lack {len(missing)} of the model's columns (e.g. {missing[0]!r}): they "
            "come from other data; retrain with train.mode: scratch"
        )
    return rows[is_unseen(row_digests(rows, seen.columns), seen)]


def continue_rows(
    digests: pd.Series, labels: pd.Series, seen: SeenRows, replay_fraction: float, seed: int
) -> ContinueRows:
    """The rows a continued fit trains on: every unseen row plus a replay of the seen ones.

    Args:
        digests: Raw content digest of each training row, indexed by row id.
        labels: Class of each training row, indexed like ``digests``.
        seen: The champion's record of its rows.
        replay_fraction: Share of the seen training rows replayed, per class (rounded).
        seed: Seed of the replay sample.

    Raises:
        NoNewRows: The champion saw every training row.
    """
    unseen = is_unseen(digests, seen)
    new = digests.index[unseen]
    if not len(new):
        raise NoNewRows(
            f"train.mode continue: the champion saw all {len(digests)} target training rows, "
            "so there is nothing new to learn; add labelled rows first (trackflow add-batch FILE)"
        )
    old = labels[~unseen]
    replayed = old.groupby(old, sort=True).sample(frac=replay_fraction, random_state=seed).index
    return ContinueRows(new, replayed.sort_values(), int((~unseen).sum()))


def champion_seen_rows(tracking: Tracking, name: str) -> tuple[str, SeenRows]:
    """The champion's version of registered model ``name`` and its record of the rows it saw.

    Raises:
        ConfigError: There is no champion, or it recorded no rows.
    """
    from trackflow.registry.promotion import read_seen_rows

    version = champion_version(tracking, name)
    run_id = tracking.client.get_model_version(name, version).run_id
    seen = read_seen_rows(tracking, run_id)
    if seen is None:
        raise ConfigError(
            f"continue: the champion of {name!r} (version {version}) recorded no training rows "
            "(registered before trackflow recorded them), so the new rows cannot be told apart; "
            "run the pipeline with train.mode finetune or scratch once"
        )
    return version, seen


def champion_version(tracking: Tracking, name: str) -> str:
    """The version the ``champion`` alias of ``name`` points at.

    Raises:
        ConfigError: The registry has no model ``name`` or it has no champion.
    """
    from mlflow.exceptions import MlflowException

    from trackflow.registry.promotion import alias_version

    try:
        version = alias_version(tracking.client, name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        version = None
    if version is None:
        raise ConfigError(
            f"continue needs a champion ({name!r} has none in {tracking.tracking_uri}): run the "
            "pipeline with train.mode finetune or scratch first"
        )
    return version
