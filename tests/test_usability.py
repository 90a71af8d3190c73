"""Issue 15's numbered points, one section each: what a new user met, and what happens now.

1. a ``targets`` entry that matches nothing; 2. a new classification head; 3. the config
schema (tests/docs/test_config_doc.py); 4. one vocabulary for Python and YAML; 5. defaults
that follow the model; 6. ``bench`` output; 7. noise. The docs' own tests run the complete
examples (images, causal LM, local files) and the quickstart.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from peftjax import data as data_lib
from peftjax.bench.report import table
from peftjax.config import DataConfig, ExperimentConfig, apply_overrides, load_config
from peftjax.methods.base import config_from_dict
from peftjax.models import PRESETS, from_config, from_pretrained
from peftjax.rank_search.report import _setup_lines
from peftjax.train import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAD = ("classifier.kernel", "classifier.bias")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A bare bert-tiny encoder checkpoint: a classifier built on it has a new head."""
    return peftjax.models.save_pretrained(from_config("bert-tiny"), tmp_path_factory.mktemp("encoder"))


# 1. Every entry of a targets list must match a module. ---------------------------------------


def test_a_targets_entry_that_matches_nothing_is_an_error_naming_it(toy, unchanged):
    check = unchanged(toy)
    with pytest.raises(peftjax.PeftError, match=r"\['ouput'\] match no module.*Did you mean \['output'\]"):
        peftjax.apply(toy, peftjax.IA3Config(targets=["key", "ouput"], feedforward=["key"]))
    check()  # nothing was wrapped
    with pytest.raises(peftjax.PeftError,
                       match=r"BitFitConfig.targets: \['layers.0.nrom'\] match no module.*Did you mean \[.*'layers.0.norm'"):
        peftjax.apply(toy, peftjax.BitFitConfig(targets=["layers.0.nrom", "head"]))
    peftjax.apply(toy, peftjax.IA3Config(targets=["key", "output"], feedforward=["output"]))
    assert len(list(peftjax.iter_wrappers(toy))) == 4  # both names in both layers


# 2. A head the checkpoint lacks trains by default. -------------------------------------------


def test_the_new_head_trains_by_default_and_freeze_new_head_opts_out(encoder):
    model = from_pretrained(encoder, task="classification", num_labels=2)
    peftjax.apply(model, peftjax.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    labels = peftjax.make_optimizer(model, optax.adam(1e-3)).labels
    assert all(labels[path] == "new_head" for path in HEAD)
    assert peftjax.count_params(model, labels).trainable == 2048 + 66  # LoRA and the 32 x 2 head
    assert "new head (not in the checkpoint, trains): classifier.bias, classifier.kernel (66 params" in (
        peftjax.summary(model, labels))
    frozen = from_pretrained(encoder, task="classification", num_labels=2, freeze_new_head=True)
    peftjax.apply(frozen, peftjax.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    assert all(peftjax.param_labels(frozen)[path] == "frozen" for path in HEAD)
    assert "new head (not in the checkpoint, frozen)" in peftjax.summary(frozen)


def test_loading_an_adapter_fills_the_head_without_the_new_weights_warning(encoder, tmp_path, caplog):
    model = from_pretrained(encoder, task="classification", num_labels=2, seed=1)
    peftjax.apply(model, peftjax.LoraConfig(rank=2, targets=["query"]))
    peftjax.save_adapter(model, tmp_path / "adapter")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        restored = from_pretrained(encoder, task="classification", num_labels=2, adapter=tmp_path / "adapter")
    assert "newly initialised" not in caplog.text
    np.testing.assert_array_equal(restored.classifier.kernel[...], model.classifier.kernel[...])
    # An adapter trained with a task head does not fit the bare encoder: the error says so.
    with pytest.raises(peftjax.PeftError, match="trained on another model, or on this one with a task head"):
        peftjax.load_adapter(from_pretrained(encoder), tmp_path / "adapter")
    # One trained with the head frozen does not hold it: the error says how to load it.
    frozen = from_pretrained(encoder, task="classification", num_labels=2, freeze_new_head=True)
    peftjax.apply(frozen, peftjax.LoraConfig(rank=2, targets=["query"]))
    peftjax.save_adapter(frozen, tmp_path / "frozen_head")
    with pytest.raises(peftjax.PeftError, match="freeze_new_head=True"):
        peftjax.load_adapter(from_pretrained(encoder, task="classification", num_labels=2), tmp_path / "frozen_head")


def test_hf_peft_format_holds_the_new_head_and_hf_peft_loads_it(encoder, tmp_path):
    torch, peft, transformers = (pytest.importorskip(m) for m in ("torch", "peft", "transformers"))
    model = from_pretrained(encoder, task="classification", num_labels=2, seed=3)
    peftjax.apply(model, peftjax.LoraConfig(rank=2, targets=["query"]))
    peftjax.save_adapter(model, tmp_path / "hf", format="peft")
    assert json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    ids = np.array([[5, 17, 300, 2], [9, 40, 2, 0]])
    mask = (ids > 0).astype(np.int64)
    theirs = transformers.BertForSequenceClassification.from_pretrained(encoder, num_labels=2)
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "hf").eval()
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(model(ids, mask).logits, expected, atol=1e-5)  # torch's own head would differ


def test_the_sst2_example_config_trains_its_head(encoder):
    """The config's own model and methods, on the bare bert-tiny encoder in place of MiniLM (a bare
    encoder too: docs/quickstart.md shows MiniLM's new head training)."""
    config = load_config(ROOT / "experiments" / "configs" / "sst2_minilm_lora.yaml", [f"model.path={encoder}"])
    assert config.model.name == "minilm" and not config.model.freeze_new_head
    model = runner.apply_methods(runner.build_model(config, num_labels=2), config)
    labels = peftjax.param_labels(model)
    assert [labels[path] for path in HEAD] == ["new_head", "new_head"]
    frozen = apply_overrides(config, ["model.freeze_new_head=true"])
    assert peftjax.param_labels(runner.build_model(frozen, num_labels=2))[HEAD[0]] == "frozen"


# 4. One vocabulary: model names, task names, dropout mode, merge. ----------------------------


def test_model_and_task_names_are_the_same_everywhere(caplog):
    # from_pretrained("minilm", task="classification", ...) is docs/quickstart.md's first line (tests/docs).
    with pytest.raises(peftjax.models.CheckpointNotFoundError, match=r"preset.*from_config\('bert-tiny'\)"):
        from_pretrained("bert-tiny")
    with pytest.raises(peftjax.models.UnsupportedModelError, match=r"from_pretrained\('minilm'\)"):
        from_config("minilm")
    with caplog.at_level(logging.WARNING):
        model = from_config("llama-tiny", task="causal-lm", abstract=True)  # the old spelling still works
    assert type(model).__name__ == "LlamaForCausalLM" and "'causal-lm' is spelled 'causal_lm' now" in caplog.text
    with pytest.raises(peftjax.models.UnsupportedModelError, match="Did you mean 'causal_lm'"):
        from_config("llama-tiny", task="causal_llm", abstract=True)


def test_from_config_and_from_pretrained_both_return_eval_mode(encoder):
    for model in (from_config("bert-tiny", num_labels=2), from_pretrained(encoder, num_labels=2)):
        assert all(m.deterministic for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout))


def test_merge_takes_an_adapter_name(toy):
    peftjax.apply(toy, peftjax.LoraConfig(rank=2, targets=["query"]), adapter_name="a")
    peftjax.apply(toy, peftjax.LoraConfig(rank=2, targets=["value"]), adapter_name="b")
    peftjax.merge(toy, "a")
    assert {w.adapter_name: w.merged for _, w in peftjax.iter_wrappers(toy)} == {"a": True, "b": False}
    peftjax.unmerge(toy, "a")
    peftjax.set_active_adapters(toy, ["a"])
    with pytest.raises(peftjax.PeftError, match="'b' is inactive"):
        peftjax.merge(toy, "b")
    with pytest.raises(peftjax.PeftError, match=r"no adapter named \['c'\]"):
        peftjax.merge(toy, "c")
    peftjax.merge(toy)  # the active ones: a alone
    assert {w.adapter_name: w.merged for _, w in peftjax.iter_wrappers(toy)} == {"a": True, "b": False}


# 5. Defaults that follow the model. -----------------------------------------------------------


@pytest.mark.parametrize("preset", ["bert-tiny", "roberta-tiny", "llama-tiny"])
def test_tiny_presets_have_a_packaged_tokenizer_that_fits_them(preset):
    tokenizer = data_lib.load_tokenizer(preset)
    config = PRESETS[preset]
    assert len(tokenizer) == config.vocab_size == 1000
    assert tokenizer.pad_token_id == config.pad_token_id
    ids = tokenizer(["a fine film"])["input_ids"][0]
    if preset != "bert-tiny":  # BERT's [CLS] has no config id; the decoders' texts start with their bos
        assert ids[0] == config.bos_token_id
    assert ExperimentConfig.from_dict({"model": {"name": preset}, "data": {"source": "x"}, "train": {"steps": 1}}
                                      ).model.tokenizer_dir() is not None


def test_text_columns_follow_the_task():
    assert DataConfig(source="x").text_columns == ("sentence",)
    assert DataConfig(source="x", task="causal_lm").text_columns == ("text",)
    config = ExperimentConfig.from_dict({"model": {"name": "llama-tiny"}, "data": {"source": "x"}, "train": {"steps": 1}})
    assert apply_overrides(config, ["data.task=causal_lm"]).data.text_columns == ("text",)


def test_image_size_and_normalisation_follow_the_model(tmp_path):
    def resolved(name, **model):
        config = ExperimentConfig.from_dict({"model": {"name": name, **model}, "train": {"steps": 1},
                                             "data": {"source": "x", "task": "image_classification"}})
        return runner.with_model_defaults(config).data

    vit = resolved("vit-tiny")
    assert (vit.image_size, vit.image_mean, vit.image_std) == (32, (0.5,) * 3, (0.5,) * 3)
    resnet = resolved("resnet-tiny")
    assert (resnet.image_size, resnet.image_mean) == (224, (0.485, 0.456, 0.406))
    folder = peftjax.models.save_pretrained(from_config("vit-tiny", num_labels=2), tmp_path / "vit")
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.2] * 3}))
    saved = resolved("mine", path=str(folder))
    assert (saved.image_size, saved.image_mean, saved.image_std) == (32, (0.4,) * 3, (0.2,) * 3)


def test_images_of_the_wrong_size_are_refused_before_compiling():
    config = ExperimentConfig.from_dict({"model": {"name": "vit-tiny"}, "train": {"steps": 1},
                                         "data": {"source": "x", "task": "image_classification", "image_size": 48}})
    images = np.zeros((4, 48, 48, 3), np.float32)
    task = data_lib.image_task_from_arrays((images, np.array([0, 1, 0, 1])))
    with pytest.raises(runner.RunError, match=r"48x48 images.*takes 32x32.*leave data.image_size null"):
        runner.check_image_shape(config, from_config("vit-tiny", num_labels=2, abstract=True), task)
    model = from_config("vit-tiny", num_labels=2, abstract=True)
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\).*data.image_size"):
        model.vit.embeddings(np.zeros((1, 3, 48, 48), np.float32))


def test_txt_files_are_causal_lm_data(tmp_path):
    (tmp_path / "train.txt").write_text("the first line of text\n\nand a second one, after a blank line\n" * 40)
    config = DataConfig(source=str(tmp_path), task="causal_lm", train_split="train", max_length=16)
    task = data_lib.load_data(config, data_lib.load_tokenizer("llama-tiny"))
    assert task["train"].is_causal_lm and len(task["train"]) > 4
    with pytest.raises(data_lib.DataError, match="plain text.*causal_lm"):
        data_lib.load_data(DataConfig(source=str(tmp_path), train_split="train.txt"), data_lib.load_tokenizer("bert-tiny"))


# 6. bench: YAML method names, a legend, MFLOP for tiny models. --------------------------------


def test_bench_table_has_a_legend_and_mflop_for_tiny_counts():
    row = {"status": "ok", "method": "bottleneck:variant=pfeiffer", "trainable_params": 10, "trainable_percent": 1.0,
           "adapter_bytes": 40, "step_flops": 3.2e6, "flops_ratio_vs_full": 0.5, "forward_overhead_flops": 2e4,
           "forward_overhead_analytic": None, "merged_overhead_flops": None, "compiled_memory_bytes": 1e6,
           "analytic_floor_bytes": 1e6, "step_time_s": None, "tokens_per_s": None, "model": "bert-tiny",
           "batch": 2, "seq": 8}
    text = table([row])
    assert "step MFLOP" in text and "     3.2 " in text and "fwd +MFLOP" in text
    assert "columns:" in text and "fwd +MFLOP XLA's extra forward" in text
    assert "bottleneck:variant=pfeiffer" in text
    assert "step GFLOP" in table([{**row, "step_flops": 3.2e9}])


# 7. Noise. -------------------------------------------------------------------------------------


def test_overriding_a_method_type_drops_the_old_types_fields_with_a_notice(caplog):
    path = ROOT / "experiments" / "configs" / "sst2_minilm_lora.yaml"
    with caplog.at_level(logging.WARNING):
        config = load_config(path, ["methods.0.type=full"], method_validator=config_from_dict)
    assert config.method_dicts() == [{"type": "full"}]
    assert "fields ['targets', 'rank', 'alpha'] are dropped" in caplog.text and "methods.0.alpha=16" in caplog.text
    kept = load_config(path, ["methods.0.type=dora", "methods.0.rank=4", "methods.0.targets=[query]"],
                       method_validator=config_from_dict)
    assert kept.method_dicts() == [{"type": "dora", "rank": 4, "targets": ["query"]}]


def test_rank_search_report_names_only_the_splits_it_has():
    config = ExperimentConfig.from_dict({"model": {"name": "bert-tiny"}, "train": {"steps": 1},
                                         "methods": [{"type": "lora", "targets": ["query"]}],
                                         "data": {"source": "x", "test_split": "test.tsv"}}).to_dict()
    sweep = {"ranks": [1], "seeds": [0], "learning_rates": None}
    payload = {"config": config, "sweep": sweep, "rows": [], "target_sets": {"qv": None}, "mode": "batched",
               "versions": {}}
    lines = _setup_lines(payload)
    assert "None" not in lines[0] and "test `test.tsv`" in lines[0] and "eval" not in lines[0]
