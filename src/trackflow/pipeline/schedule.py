"""When the training flow runs by itself: on a schedule, and on drift (the online-learning loop).

``prefect.yaml`` (YAML, read by ``prefect deploy``) cannot import this, so a test checks that its
deployments' cron, event name and cool-down equal these constants.
"""

from __future__ import annotations

#: The training flow's default schedule: every day at 03:00 UTC.
DEFAULT_CRON = "0 3 * * *"
#: The deployment ``trackflow schedule`` serves (``prefect.yaml``'s is ``nightly``).
DEPLOYMENT_NAME = "served"

#: The Prefect event batch scoring emits when a batch drifted (``flows/scoring.py``); the
#: ``retrain`` deployment of ``prefect.yaml`` is triggered by it.
DRIFT_EVENT = "trackflow.batch.drifted"
#: The deployment of the retrain flow (``flows/retrain.py``) that the drift event triggers.
RETRAIN_DEPLOYMENT = "retrain"
#: Seconds after a drift event starts a retraining during which further drift events of the same
#: model start none: a burst of drifted batches starts one retraining (the trigger's ``within``).
RETRAIN_COOLDOWN_S = 600
#: Params overrides of a retraining started by drift: keep training the champion on the new rows.
RETRAIN_OVERRIDES = {"train.mode": "continue"}


def model_resource_id(model_name: str) -> str:
    """The Prefect resource id of a registered model: what drift events name and triggers match."""
    return f"trackflow.model.{model_name}"


def model_resource(model_name: str) -> dict[str, str]:
    """The resource of a drift event about registered model ``model_name``."""
    return {
        "prefect.resource.id": model_resource_id(model_name),
        "prefect.resource.name": model_name,
    }
