"""When the training flow runs by itself: the schedule ``trackflow schedule`` and prefect.yaml use.

``prefect.yaml`` (YAML, read by ``prefect deploy``) cannot import this, so a test checks that its
deployment's cron equals :data:`DEFAULT_CRON`.
"""

#: The training flow's default schedule: every day at 03:00 UTC.
DEFAULT_CRON = "0 3 * * *"
#: The deployment ``trackflow schedule`` serves (``prefect.yaml``'s is ``nightly``).
DEPLOYMENT_NAME = "served"
