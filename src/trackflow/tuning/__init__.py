"""Hyper-parameter sweeps: the ``sweep`` params as Optuna studies whose trials are MLflow runs.

``space`` turns the validated search space into Optuna distributions and a trial's params
overrides; ``trials`` trains one trial through the train stage's code; ``study`` runs or resumes a
study in one or several processes; ``report`` shows progress and writes the study's summary to the
parent run; ``runner`` is what ``trackflow sweep`` and ``flows/sweep.py`` call, including writing
the best trial's values into ``params.yaml``. Importable without Prefect.
"""
