"""The sweep's search space (``sweep.space``, validated in :mod:`trackflow.config`) for Optuna.

Optuna's categorical distributions hold scalars only, so a choice among lists (``model.widths:
{choice: [[256, 128], [512, 256]]}``) is offered as the lists' JSON text and decoded back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

Space = Mapping[str, Mapping[str, Any]]


def distributions(space: Space) -> dict[str, BaseDistribution]:
    """One Optuna distribution per searched key."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    found: dict[str, BaseDistribution] = {}
    for key, spec in space.items():
        step = spec.get("step")
        if "choice" in spec:
            found[key] = CategoricalDistribution(_encoded_choices(spec["choice"]))
        elif "int" in spec:
            low, high = spec["int"]
            found[key] = IntDistribution(low, high, step=step or 1)
        else:
            kind = "log_uniform" if "log_uniform" in spec else "uniform"
            low, high = spec[kind]
            found[key] = FloatDistribution(
                float(low), float(high), log=kind == "log_uniform", step=step
            )
    return found


def grid(space: Space) -> dict[str, list[Any]]:
    """Every value of each key, for Optuna's grid sampler (choice and int distributions only)."""
    values: dict[str, list[Any]] = {}
    for key, spec in space.items():
        if "choice" in spec:
            values[key] = _encoded_choices(spec["choice"])
        else:
            low, high = spec["int"]
            values[key] = list(range(low, high + 1, spec.get("step") or 1))
    return values


def suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """Draw the trial's values: dotted params keys to plain values (lists decoded)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    drawn: dict[str, Any] = {}
    for key, found in distributions(space).items():
        if isinstance(found, CategoricalDistribution):
            drawn[key] = trial.suggest_categorical(key, found.choices)
        elif isinstance(found, IntDistribution):
            drawn[key] = trial.suggest_int(key, found.low, found.high, step=found.step)
        else:
            drawn[key] = trial.suggest_float(
                key, found.low, found.high, log=found.log, step=found.step
            )
    return decode(drawn, space)


def decode(values: Mapping[str, Any], space: Space) -> dict[str, Any]:
    """Values as Optuna stores them (a trial's ``params``) back as params values."""
    return {
        key: json.loads(value) if _is_encoded(space.get(key, {})) else value
        for key, value in values.items()
    }


def _encoded_choices(choices: list[Any]) -> tuple[Any, ...]:
    if any(isinstance(value, list | dict) for value in choices):
        return tuple(json.dumps(value) for value in choices)
    return tuple(choices)


def _is_encoded(spec: Mapping[str, Any]) -> bool:
    return "choice" in spec and any(isinstance(v, list | dict) for v in spec["choice"])
