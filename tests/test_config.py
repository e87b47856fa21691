from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
import yaml

from tests.helpers import REPO_ROOT
from trackflow.cli import main as cli
from trackflow.config import Params, flatten_params, load_params, validate_params
from trackflow.errors import ConfigError


def test_params_yaml_spells_out_every_key() -> None:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert _dotted_keys(raw) == flatten_params(Params()).keys()


def test_params_yaml_values_are_the_defaults() -> None:
    """One set of defaults: a key left out of params.yaml runs with the value params.yaml states."""
    stated = flatten_params(load_params(REPO_ROOT / "params.yaml"))
    defaults = flatten_params(Params())
    disagree = [
        f"{key}: params.yaml {stated[key]!r}, config.py {defaults[key]!r}"
        for key in defaults
        if (type(stated[key]), stated[key]) != (type(defaults[key]), defaults[key])
    ]
    assert not disagree, "defaults in config.py differ from params.yaml:\n" + "\n".join(disagree)


def test_schema_advertises_the_values_params_yaml_runs_with(capsys) -> None:
    assert cli(["params", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    for key, value in flatten_params(load_params(REPO_ROOT / "params.yaml")).items():
        assert _schema_default(schema, key) == value, key


def _dotted_keys(raw: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        nested = isinstance(value, dict) and dotted != "sweep.space"  # its keys are dotted keys
        keys |= _dotted_keys(value, f"{dotted}.") if nested else {dotted}
    return keys


def _schema_default(schema: dict[str, Any], key: str) -> Any:
    """A key's advertised default: a section's own default (`augment: {noise: 0.2373}` on the
    train field) wins over the defaults of the section's model."""
    node = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node.get("default"), dict):
            value = node["default"]
            for rest in parts[i:]:
                value = value[rest]
            return value
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        node = node["properties"][part]
    return node["default"]


def test_params_are_frozen() -> None:
    params = Params()
    with pytest.raises(pydantic.ValidationError):
        params.base.seed = 7  # type: ignore[misc]


def test_unknown_key_is_named_with_a_suggestion_and_the_allowed_keys() -> None:
    with pytest.raises(ConfigError) as error:
        validate_params({"preprocess": {"pca": {"n_componets": 8}}})
    message = str(error.value)
    assert "unknown key 'preprocess.pca.n_componets'" in message
    assert "(did you mean 'n_components'?)" in message
    assert "allowed keys in preprocess.pca: n_components, whiten" in message


def test_unknown_section_lists_the_sections() -> None:
    with pytest.raises(ConfigError) as error:
        validate_params({"trian": {}})
    sections = ", ".join(sorted(Params.model_fields))
    assert "unknown key 'trian' (did you mean 'train'?)" in str(error.value)
    assert f"allowed keys in the top level: {sections}" in str(error.value)
    assert "pretrain" in sections and "anomaly" in sections


def test_bad_choice_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as error:
        validate_params({"preprocess": {"scaler": "std"}})
    message = str(error.value)
    assert "preprocess.scaler" in message
    assert "'standard', 'minmax' or 'none'" in message
    assert "'std'" in message


@pytest.mark.parametrize(("value", "kind"), [(16, int), (0.9, float), (None, type(None))])
def test_pca_components_accept_int_fraction_or_null(value: object, kind: type) -> None:
    raw = {"preprocess": {"pca": {"n_components": value}}, "model": {"backbone": "mlp"}}
    n_components = validate_params(raw).preprocess
    assert type(n_components.pca.n_components) is kind


@pytest.mark.parametrize("value", [0, -3, 1.0, 1.5, "many", True])
def test_pca_components_refuse_other_values(value: object) -> None:
    with pytest.raises(ConfigError, match=r"preprocess\.pca\.n_components"):
        validate_params(
            {"preprocess": {"pca": {"n_components": value}}, "model": {"backbone": "mlp"}}
        )


def test_classes_in_both_tasks_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"classes \['4'\] are in both"):
        validate_params({"data": {"source_classes": [0, 4], "target_classes": [4, 5]}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source_classes": [0, 1, "2"], "target_classes": [2, 3]}, r"classes \['2'\] are in both"),
        ({"source_classes": [0, 0]}, "source_classes lists a class twice"),
        ({"target_classes": [7]}, "target_classes needs at least two classes"),
        ({"source_classes": []}, "source_classes needs at least two classes"),
    ],
)
def test_task_classes_are_checked(data, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_params({"data": data})


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_must_be_usable_by_every_library(seed) -> None:
    with pytest.raises(ConfigError, match=r"base\.seed"):
        validate_params({"base": {"seed": seed}})


def test_whitening_needs_pca() -> None:
    with pytest.raises(ConfigError, match="whiten: true needs PCA"):
        validate_params({"preprocess": {"pca": {"n_components": None, "whiten": True}}})


def test_split_fractions_must_leave_training_rows() -> None:
    with pytest.raises(ConfigError, match="leaves no training rows"):
        validate_params({"split": {"val_fraction": 0.5, "test_fraction": 0.5}})


@pytest.mark.parametrize("source", ["sklearn:mnist", "data/raw/table.xlsx"])
def test_unknown_source_kind_is_refused(source: str) -> None:
    with pytest.raises(ConfigError, match=r"^params is invalid:\n  data: "):
        validate_params({"data": {"source": source}})


def test_missing_and_malformed_files_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_params(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("base: {seed: 1}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_params(latin)


def test_overrides_apply_before_validation(write_params) -> None:
    path = write_params()
    overrides = {"preprocess.pca.n_components": 8, "model.backbone": "mlp", "base.seed": 1}
    params = load_params(path, overrides)
    assert params.preprocess.pca.n_components == 8
    assert params.base.seed == 1
    with pytest.raises(ConfigError, match=r"unknown key 'preprocess\.pca\.whitening'"):
        load_params(path, {"preprocess.pca.whitening": True})


def test_flattened_params_use_dotted_keys() -> None:
    flat = flatten_params(Params())
    assert flat["preprocess.pca.whiten"] is False
    assert flat["base.mlflow.experiment_name"] == "trackflow"
    assert flat["data.source_classes"] == [0, 1, 2, 3, 4]


def test_cli_prints_the_schema(capsys) -> None:
    assert cli(["params", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == set(Params.model_fields)
    assert schema["$defs"]["PcaConfig"]["additionalProperties"] is False
    assert schema["additionalProperties"] is False


def test_cli_reports_a_bad_params_file_with_exit_code_2(write_params, capsys) -> None:
    path = write_params({"split.test_fraction": "a lot"})
    assert cli(["params", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "split.test_fraction" in err
    assert "Traceback" not in err


def test_cli_lists_the_stage_commands(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("ingest", "split", "preprocess", "params", "example-data"):
        assert f"    {command}" in out


def test_cnn_needs_image_shaped_features() -> None:
    with pytest.raises(ConfigError, match="PCA components are not pixels"):
        validate_params({"model": {"backbone": "cnn"}})
    validate_params({"model": {"backbone": "cnn"}, "preprocess": {"pca": {"n_components": None}}})


def test_saved_detector_must_be_one_that_is_fitted() -> None:
    with pytest.raises(ConfigError, match="detector 'knn' is not among detectors"):
        validate_params({"anomaly": {"detectors": ["mahalanobis"], "detector": "knn"}})


def test_cli_check_says_the_file_is_valid(write_params, capsys) -> None:
    path = write_params()
    assert cli(["params", "--check", "--params", str(path)]) == 0
    assert capsys.readouterr().out == f"{path} is valid\n"


def test_cli_check_refuses_a_misspelt_section_with_exit_code_2(write_params, capsys) -> None:
    path = write_params({"trian.lr": 0.01})  # a typo of `train:` beside the real section
    assert cli(["params", "--check", "--params", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {path} is invalid:\n  unknown key 'trian'")
    assert "(did you mean 'train'?)" in captured.err


def test_new_data_params_have_their_choices(write_params) -> None:
    params = load_params(write_params({"data.separator": "\t", "data.index_column": "keep"}))
    assert (params.data.separator, params.data.index_column) == ("\t", "keep")
    with pytest.raises(ConfigError, match=r"data\.separator"):
        validate_params({"data": {"separator": ":"}})
    with pytest.raises(ConfigError, match=r"data\.index_column"):
        validate_params({"data": {"index_column": "refuse"}})


def test_a_bound_yaml_read_as_text_says_how_to_write_it() -> None:
    raw = yaml.safe_load("sweep: {space: {train.weight_decay: {log_uniform: [1e-6, 0.01]}}}")
    with pytest.raises(ConfigError, match=r"YAML reads 1e-6 as text: write it with a dot"):
        validate_params(raw)
