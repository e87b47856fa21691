"""Shared fixtures: every test runs in its own folder with its own MLflow store.

Plain helpers (paths, argv builders, the REST service's client) are in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    FAST_TRAINING,
    OPEN_MODEL,
    POLL_S,
    REPO_ROOT,
    TOKEN,
    Candidate,
    Registry,
    Server,
    broken_copy,
    candidate_store_uri,
    imputing_preprocessor,
    make_toy_repo,
    packaged_model,
    run_data_stages,
    running_server,
    services_missing,
    train_argv,
    write_project_params,
)

# Fixtures that start a server (or Prefect's API): a test using one is slow and must say so.
SERVER_FIXTURES = {
    "prefect_api": "Prefect's test server",
    "open_server": "a trackflow serve process",
    "guarded_server": "a trackflow serve process",
    "prefect_server": "a prefect server process",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a test that starts a server through a fixture without the ``slow`` marker, or
    that uses the services (``make services``) without the ``services`` one."""
    unmarked = [
        f"{item.nodeid} (uses {name}: {SERVER_FIXTURES[name]})"
        for item in items
        if item.get_closest_marker("slow") is None
        for name in sorted(SERVER_FIXTURES.keys() & set(getattr(item, "fixturenames", ())))
    ]
    unmarked += [
        f"{item.nodeid} (uses the services without @pytest.mark.services)"
        for item in items
        if "services" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("services") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that start a server must be marked @pytest.mark.slow, those that use the "
            "services @pytest.mark.services:\n  " + "\n  ".join(unmarked)
        )


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    """The client environment of the services ``make services`` runs for this checkout.

    Skips the test when they do not run, saying how to start them; fails instead under
    ``TRACKFLOW_REQUIRE_SERVICES=1`` (.ci/run), where a skip would hide that CI tested nothing.
    """
    from trackflow.services.stack import DIR_ENV, Stack

    stack = Stack(os.environ.get(DIR_ENV) or REPO_ROOT / ".services")
    if not (stack.folder / "stack.json").is_file():
        down = "never started"
    else:
        down = ", ".join(s.name for s in stack.status() if not s.running)
    if down:
        message = (
            f"needs the services of {stack.folder} ({down}: not running): run "
            "`make services` first, then `make test` (CI does)"
        )
        services_missing(message)
    return stack.client_env()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``tmp_path`` with a fresh SQLite MLflow store there: nothing touches the checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for variable in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(variable, "trackflow tests")
    for variable in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(variable, "tests@trackflow.invalid")
    return tmp_path


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """Write the repository's ``params.yaml`` with dotted overrides applied; return its path."""

    def write(overrides: dict[str, Any] | None = None, name: str = "params.yaml") -> Path:
        return write_project_params(tmp_path / name, overrides)

    return write


@pytest.fixture
def fast_params(write_params: Callable[..., Path]) -> Callable[..., Path]:
    """``write_params`` with the fast training settings (``FAST_TRAINING``) under the overrides.

    For every test that trains through a stage: the wiring, not the accuracy.
    """

    def write(overrides: dict[str, Any] | None = None, name: str = "params.yaml") -> Path:
        return write_params({**FAST_TRAINING, **(overrides or {})}, name)

    return write


@pytest.fixture
def trained_model(processed: Path, fast_params: Callable[..., Path]) -> Path:
    """A small network trained from scratch by the train stage in the working folder.

    Leaves ``model.pt``, ``train_run.json`` and ``train_history.csv`` there; returns the params.
    """
    from trackflow.stages.train import main as train

    params = fast_params({"train.mode": "scratch", "model.widths": [32]})
    assert train(train_argv(params, processed, "none.pt")) == 0
    return params


@pytest.fixture(scope="session")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits, split and preprocessed (16 PCA components) once for the session.

    Returns the ``processed`` folder; ``split`` and ``models/preprocessor.joblib`` sit beside it.
    """
    folder = tmp_path_factory.mktemp("data")
    params = write_project_params(
        folder / "params.yaml", {"preprocess.pca.n_components": 16, "model.backbone": "mlp"}
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
        patch.chdir(folder)
        assert run_data_stages(params) == 0
    return folder / "processed"


@pytest.fixture(scope="session")
def candidates(processed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Candidate]:
    """Two candidates trained once for the session, in the session store (``candidate_store``).

    ``good`` trains 15 epochs (test accuracy ~0.95), ``weak`` one epoch of a narrow network.
    """
    from trackflow.stages.anomaly import main as anomaly
    from trackflow.stages.train import main as train

    root = tmp_path_factory.mktemp("candidates")
    settings = {
        "good": {"train.max_epochs": 15, "model.widths": [64]},
        "weak": {"train.max_epochs": 1, "model.widths": [4], "train.lr": 0.0003},
    }
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", candidate_store_uri(root))
        for name, overrides in settings.items():
            folder = root / name
            folder.mkdir()
            patch.chdir(folder)
            params = write_project_params(
                folder / "params.yaml",
                {**overrides, "train.mode": "scratch", "anomaly.detectors": ["knn"]},
            )
            assert train(train_argv(params, processed, "none.pt")) == 0
            data = processed.parent
            argv = ["--params", str(params), "--splits", str(data / "split")]
            argv += ["--preprocessor", str(data / "models/preprocessor.joblib")]
            argv += ["--model", "model.pt", "--run", "train_run.json"]
            argv += ["--detector-out", "detector.joblib", "--metrics", "anomaly.json"]
            assert anomaly([*argv, "--plots", "plots"]) == 0
            found[name] = Candidate(folder, processed)
    return found


@pytest.fixture
def candidate_store(
    candidates: dict[str, Candidate],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> str:
    """Use the candidates' MLflow store in this test; return a model name no other test uses."""
    root = next(iter(candidates.values())).folder.parent
    monkeypatch.setenv("MLFLOW_TRACKING_URI", candidate_store_uri(root))
    return "m-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    """A four-stage DVC pipeline (``helpers.TOY_STAGES``) that reads the project's params.yaml."""
    return make_toy_repo(tmp_path / "toy")


# --- the REST service: packaged models and two servers, shared by the test_serving_* modules -----


@pytest.fixture(scope="session")
def registry(
    candidates: dict[str, Candidate], tmp_path_factory: pytest.TempPathFactory
) -> Registry:
    """The good and weak candidates as packaged models, the good one with an imputer in front,
    and two broken copies of the good one.

    ``imputing``: the good candidate whose preprocessor imputes missing values. ``unloadable``:
    its network file is not a network, so it fails to load. ``failing``: it loads, but its
    detector is the weak candidate's (fitted on a 4-wide embedding, not the good network's 64),
    so every prediction fails.
    """
    import joblib

    from trackflow.config import load_params
    from trackflow.io import read_table
    from trackflow.tracking import setup_tracking

    uri = candidate_store_uri(next(iter(candidates.values())).folder.parent)
    good = candidates["good"]
    rows = read_table(good.files["splits"] / "target_test.parquet").drop(columns="target")
    folder = tmp_path_factory.mktemp("broken")
    weak_detector = joblib.load(candidates["weak"].files["detector"])
    corruptions = {
        "unloadable": lambda artifacts: (artifacts / "model.pt").write_bytes(b"not a network"),
        "failing": lambda artifacts: joblib.dump(weak_detector, artifacts / "detector.joblib"),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking = setup_tracking(load_params(good.folder / "params.yaml").base.mlflow)
        sources = {
            kind: packaged_model(tracking, candidates[kind], rows) for kind in ("good", "weak")
        }
        imputing = imputing_preprocessor(good, folder)
        sources["imputing"] = packaged_model(tracking, good, rows, imputing)
        for kind, corrupt in corruptions.items():
            sources[kind] = broken_copy(sources["good"], folder / kind, corrupt)
    return Registry(tracking, uri, rows, sources)


@pytest.fixture(scope="session")
def open_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No token, an access log; ``serving-open`` version 1 (good, with lineage tags) is champion.

    Its alias never moves. Started once for the session (each start imports torch and MLflow).
    """
    (version,) = registry.register(OPEN_MODEL, "good")
    client = registry.tracking.client
    client.set_model_version_tag(OPEN_MODEL, version, "trackflow.gate.decision", "promoted")
    client.set_model_version_tag(OPEN_MODEL, version, "reviewer", "not lineage")
    registry.promote(OPEN_MODEL, version)
    folder = tmp_path_factory.mktemp("open")
    with running_server(registry, OPEN_MODEL, folder, None, 30.0, "--access-log") as server:
        server.wait_for(server.is_ready, 120, "ready")
        yield server


@pytest.fixture(scope="session")
def guarded_server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Token required; versions 1 good (champion), 2 weak, 3 unloadable, 4 failing, 5 imputing.

    Its tests move the alias (to good, imputing and broken versions) and put it back.
    """
    name = "serving-guarded"
    versions = registry.register(name, "good", "weak", "unloadable", "failing", "imputing")
    assert versions == ["1", "2", "3", "4", "5"]
    registry.promote(name, "1")
    folder = tmp_path_factory.mktemp("guarded")
    with running_server(registry, name, folder, token=TOKEN, poll_s=POLL_S) as server:
        server.wait_for(server.is_ready, 120, "ready")
        yield server
