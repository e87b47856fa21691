"""The one loader of a packaged version: alias resolved first, one clear error per failure.

The service, batch scoring and the gate all load through
:func:`trackflow.registry.loading.load_version`; their own error semantics (a refused version, a
config error, a one-line promotion error) are tested with them.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from trackflow.config import load_params
from trackflow.io import read_json, read_table
from trackflow.registry.loading import NotPackagedModel, UnloadableVersion, load_version
from trackflow.registry.packaging import Scorer, log_packaged_model
from trackflow.registry.uris import create_registered_model, model_uri, resolve
from trackflow.tracking import Tracking, fluent_tracking, setup_tracking

SRC = Path(__file__).resolve().parent.parent / "src"


def register(candidate, name: str) -> tuple[Tracking, str]:
    """Log a trained candidate as a packaged model and register it as a version of ``name``."""
    tracking = setup_tracking(load_params(candidate.folder / "params.yaml").base.mlflow)
    files = candidate.files
    run_id = read_json(files["run"])["run_id"]
    rows = read_table(files["splits"] / "target_train.parquet").drop(columns="target")
    info = log_packaged_model(
        tracking, run_id, files["preprocessor"], files["model"], files["detector"],
        rows.head(5), rows,
    )  # fmt: skip
    create_registered_model(tracking.client, name)
    version = tracking.client.create_model_version(
        name, source=info.model_uri, run_id=run_id, model_id=info.model_id
    ).version
    return tracking, str(version)


@pytest.fixture
def registered(candidates, candidate_store) -> tuple[Tracking, str, str]:
    """The good candidate as version 1 of a model of its own, ``@champion``."""
    tracking, version = register(candidates["good"], candidate_store)
    tracking.client.set_registered_model_alias(candidate_store, "champion", version)
    return tracking, candidate_store, version


def test_an_alias_is_resolved_to_its_version_and_the_model_scores_raw_rows(
    registered, candidates
) -> None:
    tracking, name, version = registered
    loaded = load_version(tracking, model_uri(name, alias="champion"))
    assert (loaded.uri, loaded.version) == (f"models:/{name}@champion", version)
    assert loaded.registered.run_id == read_json(candidates["good"].files["run"])["run_id"]
    assert isinstance(loaded.scorer, Scorer) and loaded.profile is not None
    rows = read_table(candidates["good"].files["splits"] / "target_test.parquet").head(3)
    scored = loaded.model.predict(rows.drop(columns="target"))
    assert scored.index.equals(rows.index) and scored["label"].notna().all()
    by_number = load_version(tracking, model_uri(name, version=version))
    assert by_number.version == version and by_number.uri == f"models:/{name}/{version}"


def test_a_name_or_alias_the_registry_lacks_is_the_registry_s_error(registered) -> None:
    tracking, name, _ = registered
    with pytest.raises(MlflowException):
        load_version(tracking, model_uri(name, alias="nope"))


def test_missing_files_are_an_unloadable_version_carrying_the_error(registered) -> None:
    from mlflow.utils.file_utils import local_file_uri_to_path

    tracking, name, version = registered
    source = tracking.client.get_model_version(name, version).source
    logged = tracking.client.get_logged_model(source.removeprefix("models:/"))
    shutil.rmtree(local_file_uri_to_path(logged.artifact_location))
    with pytest.raises(UnloadableVersion) as caught:
        load_version(tracking, model_uri(name, alias="champion"))
    assert str(caught.value.registered.version) == version and caught.value.source == source
    assert caught.value.problem.startswith("its files are missing: ")
    assert caught.value.error is caught.value.__cause__


def test_a_model_that_is_not_trackflow_s_is_refused_in_one_line(registered, candidates) -> None:
    import mlflow
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    tracking, name, _ = registered
    train = read_table(candidates["good"].files["splits"] / "target_train.parquet")
    plain = LogisticRegression(max_iter=200).fit(train.drop(columns="target"), train["target"])
    run_id = tracking.client.create_run(tracking.experiment_id).info.run_id
    with fluent_tracking(tracking), mlflow.start_run(run_id=run_id):
        info = mlflow.sklearn.log_model(plain, name="plain", pip_requirements=[])
    version = tracking.client.create_model_version(
        name, info.model_uri, run_id=run_id, model_id=info.model_id
    ).version
    with pytest.raises(NotPackagedModel, match=r"is not a trackflow packaged model \(it holds no"):
        load_version(tracking, model_uri(name, version=version))


def test_a_models_uri_resolves_in_the_configured_store_without_the_environment_variable(
    registered, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``train.backbone``/``continue`` under plain ``dvc repro``: params' store, no env variable."""
    tracking, name, version = registered
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # where MLflow's default registry, ./mlflow.db, would be made
    resolved = resolve(tracking, model_uri(name, alias="champion"), tmp_path / "out")
    assert resolved.version == version and resolved.path.is_dir()
    assert not (tmp_path / "mlflow.db").exists()


def test_creating_a_registered_model_twice_creates_it_once(registered) -> None:
    tracking, name, _ = registered
    assert not create_registered_model(tracking.client, name)
    assert create_registered_model(tracking.client, name + "-other")


def test_only_the_loader_calls_pyfunc_load_model() -> None:
    callers = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load_model"
                and "pyfunc" in ast.unparse(node.func.value)
            ):
                callers.add(path.relative_to(SRC).as_posix())
    assert callers == {"trackflow/registry/loading.py"}
