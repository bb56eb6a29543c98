"""Tests for spinflow.config (the params schema) and the `spinflow validate` command."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from spinflow import cli
from spinflow.config import (
    Params,
    default_params_dict,
    describe_schema,
    load_params,
    validate_params,
)
from spinflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
REPO_PARAMS = REPO / "params.yaml"


def _with(path: str, value) -> dict:
    """The defaults with one dotted key set to ``value``."""
    raw = default_params_dict()
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def _nested(path: str, value) -> dict:
    """A params mapping holding only ``value`` at the dotted ``path``."""
    raw: dict = {}
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        validate_params(raw)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith("params.yaml: "), message
    return message


def _leaf_paths(node: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path != "spin.per_iteration":
            paths |= _leaf_paths(value, f"{path}.")
        else:
            paths.add(path)
    return paths


# ---------------------------------------------------------------------------------------------
# The repository's params.yaml and the defaults


def test_repo_params_validate():
    params = load_params(REPO_PARAMS)
    assert isinstance(params, Params)
    assert params.spin.iterations >= 1
    assert params.spin.loss in ("sigmoid", "hinge")
    assert params.prompt.max_prompt_length < params.prompt.max_length


def test_repo_params_list_every_schema_key():
    # DVC reads params.yaml itself: a key that a stage lists but the file omits stops `dvc repro`
    raw = yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))
    schema_keys = {key for key, _, _ in describe_schema()}
    assert _leaf_paths(raw) == schema_keys


def test_defaults_round_trip_through_yaml(tmp_path):
    defaults = default_params_dict()
    assert validate_params(defaults) == Params()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(defaults, sort_keys=False), encoding="utf-8")
    loaded = load_params(path)
    assert loaded == Params()
    assert loaded.model_dump(mode="json") == defaults


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "---\n"])
def test_an_empty_file_is_an_error_not_the_defaults(tmp_path, text):
    # DVC reads the keys the stages list from the file itself: an empty file cannot run
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"{path}: no parameters (the file is empty)")
    assert "spinflow params --defaults --yaml > params.yaml" in message
    assert "\n" not in message


def test_the_defaults_as_yaml_are_a_complete_valid_params_file(tmp_path, capsys):
    assert cli.main(["params", "--defaults", "--yaml"]) == 0
    path = tmp_path / "params.yaml"
    path.write_text(capsys.readouterr().out, encoding="utf-8")
    assert load_params(path) == Params()
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == default_params_dict()


def test_paper_defaults():
    params = Params()
    assert params.spin.beta == 0.1
    assert params.spin.loss == "sigmoid"
    assert params.spin.mix_previous == 1
    assert params.spin.train.optimizer == "rmsprop"
    assert params.spin.per_iteration == {}
    assert params.prompt.max_prompt_length < params.prompt.max_length


def test_every_schema_key_is_described():
    rows = describe_schema()
    assert len(rows) == len({key for key, _, _ in rows})
    assert [key for key, _, description in rows if not description] == []
    defaults = {key: default for key, default, _ in rows}
    assert defaults["spin.train.learning_rate"] == Params().spin.train.learning_rate
    assert defaults["sft.learning_rate"] == Params().sft.learning_rate


def test_partial_top_level_sections_keep_their_other_defaults():
    params = validate_params({"spin": {"iterations": 2}, "generate": {"top_p": 0.9}})
    assert params.spin.iterations == 2
    assert params.spin.beta == 0.1
    assert params.spin.train == Params().spin.train
    assert params.generate.top_p == 0.9
    assert params.generate.max_new_tokens == Params().generate.max_new_tokens


@pytest.mark.parametrize("section", ["spin.train", "sft"])
def test_partial_nested_sections_keep_the_documented_defaults(section):
    params = validate_params(_nested(section, {"batch_size": 4}))
    expected = Params().spin.train if section == "spin.train" else Params().sft
    got = params.spin.train if section == "spin.train" else params.sft
    assert got.batch_size == 4
    assert got.model_copy(update={"batch_size": expected.batch_size}) == expected


# ---------------------------------------------------------------------------------------------
# One-line errors that name the key path, the value and what is allowed


def test_unknown_key():
    message = _error(_with("spin.train.lr", 1e-5))
    assert "unknown key 'spin.train.lr'" in message
    assert "learning_rate" in message and "batch_size" in message


def test_a_removed_key_says_so_and_why():
    message = _error(_with("eval.num_samples", 16))
    assert message.startswith("params.yaml: 'eval.num_samples' was removed: it changed nothing")
    assert message.endswith("delete it") and "\n" not in message


def test_unknown_top_level_section():
    message = _error({"trainig": {}})
    assert "unknown key 'trainig'" in message
    for section in ("data", "eval", "generate", "model", "prompt", "sft", "spin"):
        assert section in message


@pytest.mark.parametrize(
    ("path", "value", "allowed"),
    [
        ("spin.train.learning_rate", "fast", "valid number"),
        ("spin.train.epochs", 1.5, "valid integer"),
        ("spin.iterations", "three", "valid integer"),
        ("seed", [1], "valid integer"),
        ("spin.train.optimizer", "adam", "'adamw', 'rmsprop' or 'sgd'"),
        ("spin.loss", "ipo", "'sigmoid' or 'hinge'"),
        ("model.dtype", "int8", "'float32', 'bfloat16' or 'float16'"),
        ("spin.train.bf16", "fast", "must be auto, true or false"),
        ("sft.bf16", 1, "must be auto, true or false"),
        ("sft.bf16", None, "must be auto, true or false"),
    ],
)
def test_wrong_type(path, value, allowed):
    message = _error(_with(path, value))
    assert f"'{path}' = {value!r}" in message
    assert allowed in message


@pytest.mark.parametrize(
    ("path", "value", "allowed"),
    [
        ("spin.train.learning_rate", -1e-5, "greater than 0"),
        ("spin.train.learning_rate", 0.0, "greater than 0"),
        ("spin.iterations", 0, "greater than 0"),
        ("generate.top_p", 1.5, "less than or equal to 1"),
        ("generate.temperature", -0.5, "greater than or equal to 0"),
        ("sft.lora.dropout", 2, "less than or equal to 1"),
        ("spin.train.warmup_ratio", 1.1, "less than or equal to 1"),
        ("data.num_pool", 0, "greater than 0"),
    ],
)
def test_out_of_range(path, value, allowed):
    message = _error(_with(path, value))
    assert f"'{path}' = {value!r}" in message
    assert allowed in message


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN"])
@pytest.mark.parametrize("path", ["spin.beta", "spin.train.learning_rate", "generate.top_p"])
def test_non_finite_numbers_are_refused(tmp_path, path, value):
    params = tmp_path / "params.yaml"
    section, *rest = path.split(".")
    text = yaml.safe_dump(default_params_dict(), sort_keys=False)
    raw = yaml.safe_load(text)
    node = raw
    for part in [section, *rest][:-1]:
        node = node[part]
    node[path.split(".")[-1]] = "PLACEHOLDER"
    params.write_text(
        yaml.safe_dump(raw, sort_keys=False).replace("PLACEHOLDER", value), encoding="utf-8"
    )
    with pytest.raises(ConfigError) as info:
        load_params(params)
    message = str(info.value)
    assert f"'{path}' = " in message and "finite number" in message, message
    assert "\n" not in message


def test_a_duplicated_key_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "spin:\n  beta: 0.1\n  loss: sigmoid\n  beta: 0.5\n", encoding="utf-8"
    )  # YAML would keep 0.5 and ignore 0.1 without a word
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value) == (
        f"{path}: line 4, column 3: invalid YAML: duplicate key 'beta' (first given on line 2; "
        "YAML would keep only the last one)"
    )


def test_a_duplicated_section_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("spin:\n  beta: 0.1\neval:\n  batch_size: 4\nspin:\n  loss: hinge\n")
    with pytest.raises(ConfigError, match="line 5, column 1: invalid YAML: duplicate key 'spin'"):
        load_params(path)


def test_the_same_key_in_two_sections_is_fine(tmp_path):
    path = tmp_path / "params.yaml"
    raw = default_params_dict()  # learning_rate, batch_size, ... under sft and spin.train
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    assert load_params(path) == Params()


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        ("seed", 1180591620717411303424, "must be in 0..9223372036854775807"),
        ("seed", -1, "torch takes 64-bit seeds"),
        ("data.seed", 2**63, "torch takes 64-bit seeds"),
        ("generate.max_new_tokens", 1_000_000_000, "at most 32768 tokens: the continuous engine"),
        ("eval.max_new_tokens", 32769, "at most 32768 tokens"),
        ("autoif.max_new_tokens", 10**6, "at most 32768 tokens"),
        ("autoif.supervisor_max_new_tokens", 10**6, "at most 32768 tokens"),
        ("spin.train.lora.target_modules", [], "must name the modules that get adapters"),
        ("sft.lora.target_modules", [" "], "must name the modules that get adapters"),
        ("tracking.registered_model", "a/b:c", "MLflow refuses / and :"),
        ("tracking.registered_model", " ", "MLflow refuses an empty registered model name"),
        ("tracking.registered_model", "..", "MLflow refuses a name that reads as another"),
        ("tracking.experiment", "", "MLflow refuses an empty experiment name"),
        ("tracking.experiment", "x" * 501, "MLflow takes at most 500 characters"),
    ],
)
def test_values_that_fail_later_are_refused_up_front(path, value, says):
    message = _error(_with(path, value))
    assert f"'{path}' = {value!r}: " in message and says in message, message


def test_the_bounds_themselves_are_valid():
    params = validate_params(_with("seed", 2**63 - 1))
    assert params.seed == 2**63 - 1
    assert validate_params(_with("generate.max_new_tokens", 32768)).generate.max_new_tokens == 32768
    lora = {"enabled": True, "target_modules": ["q_proj"]}
    assert validate_params(_with("sft.lora", lora)).sft.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize(
    "name",
    ["spinflow-spin", "my model", "a/b:c", "a:b", "", " ", ".", "..", "..x", "x..", "x" * 501],
)
def test_tracking_names_follow_mlflows_own_rules(name):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name, _validate_model_name

    for key, check in (
        ("tracking.experiment", _validate_experiment_name),
        ("tracking.registered_model", _validate_model_name),
    ):
        try:
            check(name)
            mlflow_takes = True
        except MlflowException:
            mlflow_takes = False
        try:
            validate_params(_with(key, name))
            we_take = True
        except ConfigError:
            we_take = False
        assert we_take == mlflow_takes, (key, name)


def test_builtin_data_sizes_are_bounded():
    message = _error(_with("data.num_sft", 1_000_000_000))
    assert "'data': data.num_sft (1000000000) + data.num_val (16) + data.num_test (48)" in message
    assert "data.source: builtin makes at most 100000" in message
    assert message.endswith("lower data.num_sft")
    disjoint = _error(_nested("data", {"pool": "disjoint", "num_pool": 100_000}))
    assert "data.num_pool (100000)" in disjoint and disjoint.endswith("lower data.num_pool")
    validate_params(_nested("data", {"num_sft": 90_000, "num_val": 9_000, "num_test": 1_000}))
    # a file or a dataset: its reader counts what it holds
    validate_params(_nested("data", {"source": "chat.jsonl", "num_sft": 1_000_000_000}))


def test_boolean_is_not_an_integer():
    message = _error(_with("spin.iterations", True))
    assert "'spin.iterations' = True" in message


def test_bad_per_iteration_key():
    message = _error(_with("spin.per_iteration", {"iter_x": {"learning_rate": 1e-6}}))
    assert "'spin.per_iteration'" in message
    assert "'iter_x'" in message
    assert "iter_<k>" in message


def test_per_iteration_beyond_the_last_iteration():
    raw = _with("spin.per_iteration", {"iter_3": {"learning_rate": 1e-6}})
    raw["spin"]["iterations"] = 3
    message = _error(raw)
    assert "per_iteration.iter_3" in message
    assert "spin.iterations is 3" in message
    assert "0..2" in message


def test_bad_per_iteration_value():
    message = _error(_with("spin.per_iteration", {"iter_1": {"learning_rate": 0}}))
    assert "'spin.per_iteration.iter_1.learning_rate' = 0" in message
    assert "greater than 0" in message


def test_unknown_per_iteration_key_lists_the_allowed_ones():
    message = _error(_with("spin.per_iteration", {"iter_1": {"lr": 1e-6}}))
    assert "unknown key 'spin.per_iteration.iter_1.lr'" in message
    assert "beta, epochs, learning_rate" in message


def test_prompt_must_fit_in_max_length():
    message = _error(_with("prompt.max_prompt_length", 300))
    assert "prompt.max_prompt_length (300)" in message
    assert "prompt.max_length (256)" in message


def test_several_errors_stay_on_one_line():
    raw = _with("spin.train.learning_rate", -1)
    raw["generate"]["top_p"] = 2
    message = _error(raw)
    assert "and 1 more" in message
    assert "spin.train.learning_rate" in message and "generate.top_p" in message


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping.*got list"):
        load_params(path)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: file not found"):
        load_params(tmp_path / "missing.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nspin:\n  beta: [1, 2\n  loss: sigmoid\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line 4, column 7: invalid YAML")


def test_bad_indentation_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nspin:\n  beta: 0.1\n loss: hinge\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 4, column 2: invalid YAML"):
        load_params(path)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("spin:\n  beta: -1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value) == f"{path}: 'spin.beta' = -1: Input should be greater than 0"


def test_assignment_is_validated():
    params = Params()
    with pytest.raises(ValueError):
        params.spin.train.learning_rate = -1.0


# ---------------------------------------------------------------------------------------------
# train_for


def test_train_for_applies_overrides():
    raw = default_params_dict()
    raw["spin"]["iterations"] = 4
    raw["spin"]["per_iteration"] = {
        "iter_2": {"learning_rate": 1e-7},
        "iter_3": {"learning_rate": 2e-7, "epochs": 5, "beta": 0.3},
    }
    params = validate_params(raw)
    untouched = copy.deepcopy(params.spin.train)

    for k in (0, 1):
        train, beta = params.train_for(k)
        assert train == untouched
        assert beta == 0.1
    train, beta = params.train_for(2)
    assert train.learning_rate == 1e-7
    assert train.epochs == untouched.epochs
    assert beta == 0.1
    train, beta = params.train_for(3)
    assert (train.learning_rate, train.epochs, beta) == (2e-7, 5, 0.3)
    assert train.optimizer == untouched.optimizer
    assert train.batch_size == untouched.batch_size
    assert params.spin.train == untouched


@pytest.mark.parametrize("k", [-1, 3])
def test_train_for_rejects_unknown_iterations(k):
    params = validate_params({"spin": {"iterations": 3}})
    with pytest.raises(ConfigError, match=r"iteration -?\d is outside 0\.\.2 \(spin.iterations\)"):
        params.train_for(k)


# ---------------------------------------------------------------------------------------------
# `spinflow validate`


def test_validate_cli_accepts_the_repo_params(capsys):
    assert cli.main(["--params", str(REPO_PARAMS), "validate"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{REPO_PARAMS}: valid"
    assert err == ""


def test_validate_cli_rejects_a_bad_file(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("spin:\n  train:\n    learning_rate: -0.1\n", encoding="utf-8")
    assert cli.main(["--params", str(path), "validate"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == (
        f"error: {path}: 'spin.train.learning_rate' = -0.1: Input should be greater than 0"
    )


def test_validate_cli_reports_invalid_yaml(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("spin: [\n", encoding="utf-8")
    assert cli.main(["--params", str(path), "validate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: line ")
    assert "invalid YAML" in err


def test_params_cli_lists_every_key(capsys):
    assert cli.main(["params"]) == 0
    out = capsys.readouterr().out
    for key, _, _ in describe_schema():
        assert key in out
