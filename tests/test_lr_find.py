"""``trackflow lr-find`` (the learning-rate range test) and ``params_file.update_params_file``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from trackflow.cli import main
from trackflow.config import load_params
from trackflow.errors import ConfigError, TrackflowError
from trackflow.learn.lr_find import steepest_fall
from trackflow.params_file import update_params_file

SCRATCH = {"train.mode": "scratch", "model.widths": [32]}


def commented_params(path: Path, values: dict) -> Path:
    """The repository's params.yaml, comments and all, with ``values`` set."""
    path.write_text((REPO_ROOT / "params.yaml").read_text())
    update_params_file(path, values)
    return path


def lr_find(params: Path, data: Path, *more: str) -> int:
    return main(["lr-find", "--params", str(params), "--data", str(data), *more])


def lr_find_runs() -> list:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("trackflow")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_range_test_logs_one_run_with_its_curve_and_suggestion(processed, fast_params, capsys):
    from mlflow import MlflowClient

    params = fast_params(SCRATCH)
    before = params.read_text()
    assert lr_find(params, processed, "--num-training", "40") == 0
    out = capsys.readouterr().out
    (run,) = lr_find_runs()
    suggestion = run.data.metrics["lr_find/suggestion"]
    assert f"set in {params}:  train.lr: {suggestion:g}" in out
    assert run.info.run_name.startswith("lr-find-train-") and run.info.status == "FINISHED"
    assert run.data.tags["trackflow.mode"] == "scratch"
    assert run.data.params["lr_find.num_training"] == "40"
    assert run.data.params["train.mode"] == "scratch"  # the params, as every run logs them
    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "lr_find")}
    assert artifacts == {"lr_find/lr_find.png", "lr_find/curve.json"}
    curve = json.loads(
        Path(client.download_artifacts(run.info.run_id, "lr_find/curve.json")).read_text()
    )
    assert len(curve["lr"]) == len(curve["loss"]) == 40 and curve["suggestion"] == suggestion
    assert 1e-6 <= suggestion <= 1
    assert params.read_text() == before  # without --apply the file is left alone


def test_pretrain_stage_tests_the_source_task(processed, fast_params, capsys):
    assert lr_find(fast_params(), processed, "--stage", "pretrain", "--num-training", "30") == 0
    assert "pretrain.lr: " in capsys.readouterr().out
    (run,) = lr_find_runs()
    assert run.info.run_name.startswith("lr-find-pretrain-")


def test_apply_writes_the_suggestion_and_keeps_comments(processed, tmp_path, capsys):
    params = commented_params(tmp_path / "params.yaml", {**SCRATCH, "train.max_epochs": 2})
    comment = "# int = components, float in (0, 1) = variance kept, null = off"
    assert comment in params.read_text()
    assert lr_find(params, processed, "--num-training", "30", "--apply") == 0
    suggestion = lr_find_runs()[0].data.metrics["lr_find/suggestion"]
    assert f"wrote train.lr: {suggestion:g} to {params}" in capsys.readouterr().out
    text = params.read_text()
    assert comment in text and "widths: [32]" in text
    assert load_params(params).train.lr == pytest.approx(suggestion)


def test_without_preprocessed_data_one_line_error(fast_params, capsys):
    assert lr_find(fast_params(SCRATCH), Path("nowhere")) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the preprocess stage first" in err
    assert lr_find_runs() == []


def test_bad_options_are_one_line_errors(processed, fast_params, capsys):
    params = fast_params()
    assert lr_find(params, processed, "--backbone", "last.ckpt") == 2
    assert "is a Lightning checkpoint" in capsys.readouterr().err
    assert lr_find(params, processed, "--min-lr", "1", "--max-lr", "0.1") == 2
    assert "need 0 < min-lr < max-lr" in capsys.readouterr().err
    assert lr_find(params, processed, "--backbone", "missing.pt") == 3  # finetune needs it
    assert "run the pretrain stage first" in capsys.readouterr().err


def test_suggestion_is_the_steepest_fall_per_decade():
    lrs = [10 ** (-6 + 6 * i / 49) for i in range(50)]
    # Flat, a steep fall around 1e-3, then divergence; noise at the smallest rates.
    losses = [
        2.0 - math.tanh(4 * (math.log10(lr) + 3)) + (0.01 if i % 2 else 0)
        for i, lr in enumerate(lrs)
    ]
    losses[-5:] = [5.0, 8.0, math.nan, math.inf, 9.0]
    index = steepest_fall(lrs, losses)
    assert 10**-3.5 < lrs[index] < 10**-2.5
    with pytest.raises(TrackflowError, match="too few"):
        steepest_fall(lrs[:12], losses[:12])


def test_update_params_file_changes_only_the_values_it_sets(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO_ROOT / "params.yaml").read_text())
    before = path.read_text().splitlines(keepends=True)
    values = {"train.lr": 0.0023, "model.widths": [512, 256], "pretrain.schedule.gamma": 0.25}
    update_params_file(path, values | {"pretrain.schedule.kind": "step"})
    after = path.read_text().splitlines(keepends=True)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [b.split("#")[0].strip() for _, b in changed] == [
        "widths: [512, 256]",
        "schedule: {kind: step, step_size: 10, gamma: 0.25, decay_rate: 0.1}",
        "lr: 0.0023",
    ]
    for a, b in changed:  # a comment after the value stays, in its column
        assert a.split("#", 1)[1:] == b.split("#", 1)[1:] and a.find("#") == b.find("#")


def test_update_params_file_rewrites_a_value_of_several_lines_keeping_comments(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# my params\nmodel:\n  widths:   # hidden layers\n    - 64\n    - 32\n")
    update_params_file(path, {"model.widths": [16], "train.lr": 0.01})
    text = path.read_text()
    assert "# my params" in text and "# hidden layers" in text
    params = load_params(path)
    assert params.model.widths == (16,) and params.train.lr == 0.01


def test_update_params_file_refuses_a_bad_value_and_leaves_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO_ROOT / "params.yaml").read_text())
    before = path.read_text()
    with pytest.raises(ConfigError, match=r"train\.lr"):
        update_params_file(path, {"train.lr": -1})
    with pytest.raises(ConfigError, match=r"unknown key 'train\.learning_rate'"):
        update_params_file(path, {"train.learning_rate": 0.1})
    with pytest.raises(ConfigError, match="'seed' is a value"):
        update_params_file(path, {"base.seed.x": 1})
    assert path.read_text() == before
    with pytest.raises(ConfigError, match="does not exist"):
        update_params_file(tmp_path / "missing.yaml", {"train.lr": 0.1})


@pytest.mark.parametrize("lr", [9.1e-06, 1e-05, 0.0035])
def test_update_params_file_writes_rates_yaml_reads_back_as_floats(tmp_path, lr):
    path = tmp_path / "params.yaml"
    path.write_text((REPO_ROOT / "params.yaml").read_text())
    update_params_file(path, {"train.lr": lr})
    assert load_params(path).train.lr == lr
