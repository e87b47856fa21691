"""The pretrain stage registers each backbone with what it was trained on and moves no alias."""

from __future__ import annotations

from mlflow import MlflowClient

from tests.helpers import pretrain_argv
from trackflow.io import read_json
from trackflow.stages.pretrain import main as pretrain

NARROW = {"model.widths": [16]}


def test_pretrain_registers_versions_without_moving_an_alias(
    processed, fast_params, caplog
) -> None:
    """Experiments and run-cache restores cannot leave an alias on a backbone of other features."""
    client = MlflowClient()
    assert pretrain(pretrain_argv(fast_params(NARROW), processed)) == 0
    first = read_json("pretrain_run.json")
    assert first["model_uri"] == "models:/trackflow-backbone/1" and "alias" not in first
    assert client.get_registered_model("trackflow-backbone").aliases == {}
    tags = client.get_model_version("trackflow-backbone", "1").tags
    assert tags["trackflow.backbone.in_features"] == "16"
    assert len(tags["trackflow.backbone.train_digest"]) == 16
    assert (
        tags["trackflow.params_hash"]
        == client.get_run(first["run_id"]).data.tags["trackflow.params_hash"]
    )

    # another experiment (other params) is a new version; still no alias moves
    assert pretrain(pretrain_argv(fast_params(NARROW | {"pretrain.lr": 0.01}), processed)) == 0
    assert read_json("pretrain_run.json")["model_uri"] == "models:/trackflow-backbone/2"
    assert client.get_registered_model("trackflow-backbone").aliases == {}
    second = client.get_model_version("trackflow-backbone", "2").tags
    assert second["trackflow.params_hash"] != tags["trackflow.params_hash"]

    # an alias a person (or an earlier trackflow) set is left alone, and named in a warning
    client.set_registered_model_alias("trackflow-backbone", "champion", "1")
    assert pretrain(pretrain_argv(fast_params(NARROW), processed)) == 0
    assert client.get_registered_model("trackflow-backbone").aliases == {"champion": 1}
    assert (
        "pretrain no longer moves it: this workspace's backbone is models:/trackflow-backbone/3"
        in (caplog.text)
    )
