"""from_pretrained / save_pretrained: layouts, reports, modes and clear errors.

Checkpoints here are written by peftjax's own ``save_pretrained`` from tiny
presets (transformers reading them is proven in the parity tests), then
altered to produce each failure the loader must explain.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from peftjax import models

import tiny_checkpoints  # tests/models helper (see its docstring)

IDS = jnp.asarray([[4, 8, 15, 16, 23, 42], [7, 12, 40, 3, 0, 0]])
MASK = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


@nnx.jit
def forward(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return tiny_checkpoints.checkpoint_factory(tmp_path_factory)


def rbg_key(seed: int) -> jax.Array:
    """RBG keys: same statistics as the default, far quicker to compile on CPU."""
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def bert_folder(tiny_checkpoint, tmp_path_factory):
    """A BERT sequence classifier (3 labels), re-saved by peftjax."""
    model = models.from_pretrained(tiny_checkpoint("bert-tiny", "classification"))
    return models.save_pretrained(model, tmp_path_factory.mktemp("bert-seq"))


@pytest.fixture(scope="module")
def llama_folder(tiny_checkpoint, tmp_path_factory):
    """A tied-embedding Llama causal LM, re-saved by peftjax."""
    model = models.from_pretrained(tiny_checkpoint("llama-tiny", "causal_lm"))
    return models.save_pretrained(model, tmp_path_factory.mktemp("llama"))


def copy_of(folder, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ------------------------------------------------------------------ layouts


def test_saved_layout_is_transformers_layout(bert_folder):
    tensors = load_file(str(bert_folder / "model.safetensors"))
    config = json.loads((bert_folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    # torch Linear weights are (out, in); the classifier maps 32 -> 3.
    assert tensors["classifier.weight"].shape == (3, 32)
    assert tensors["bert.encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)
    assert tensors["bert.embeddings.LayerNorm.weight"].shape == (32,)


def test_save_load_round_trip_is_exact(bert_folder):
    model = models.from_pretrained(bert_folder)
    reloaded = models.from_pretrained(models.save_pretrained(model, bert_folder.parent / "again"))
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(reloaded, nnx.Param)),
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_head_checkpoint_loads_into_base_model_and_back(bert_folder):
    base, report = models.from_pretrained(bert_folder, task="base", output_loading_info=True)
    assert isinstance(base, models.BertModel)
    assert report.missing_keys == ()
    assert set(report.unexpected_keys) == {"classifier.weight", "classifier.bias"}
    full = models.from_pretrained(bert_folder)
    np.testing.assert_array_equal(
        base.encoder.layer[1].output.dense.kernel[...],
        full.bert.encoder.layer[1].output.dense.kernel[...],
    )


def test_sharded_checkpoint_with_index(llama_folder, tmp_path):
    folder = copy_of(llama_folder, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    sharded = models.from_pretrained(folder)
    single = models.from_pretrained(llama_folder)
    np.testing.assert_array_equal(
        forward(sharded, IDS, MASK).logits, forward(single, IDS, MASK).logits
    )


def test_legacy_gamma_beta_names_and_buffers(bert_folder, tmp_path):
    folder = copy_of(bert_folder, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    legacy = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    renamed = {}
    for key, value in tensors.items():
        for new, old in legacy.items():
            key = key.replace(new, old)
        renamed[key] = value
    renamed["bert.embeddings.position_ids"] = np.arange(128)[None]
    save_file(renamed, str(folder / "model.safetensors"))
    _, report = models.from_pretrained(folder, output_loading_info=True)
    assert report.missing_keys == () and report.unexpected_keys == ()


def test_hub_ids_go_through_snapshot_download(bert_folder, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(bert_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = models.from_pretrained("someone/tiny-bert", revision="main")
    assert isinstance(model, models.BertForSequenceClassification)
    assert calls[0][:2] == ("someone/tiny-bert", "main")
    assert "*.safetensors" in calls[0][2]


# --------------------------------------------------------- modes and dtypes


def test_from_config_initialises_like_transformers():
    model = models.from_config("bert-tiny", seed=rbg_key(0))
    assert model.embeddings.dropout.deterministic  # eval mode, as from_pretrained returns a model
    kernel = np.asarray(model.encoder.layer[0].attention.self.query.kernel[...])
    assert abs(kernel.std() - 0.02) < 0.004  # N(0, initializer_range)
    np.testing.assert_array_equal(model.embeddings.word_embeddings.embedding[0], 0.0)  # padding
    np.testing.assert_array_equal(model.encoder.layer[1].output.LayerNorm.scale[...], 1.0)


def test_loaded_model_is_in_eval_mode_and_train_enables_dropout(bert_folder):
    """Dropout is off after loading, on after ``train()``, with fresh masks per call.

    Built with remat, whose per-layer transform must carry the dropout RNG
    counters out, or every call would reuse the same masks.
    """
    model = models.from_pretrained(
        bert_folder,
        seed=rbg_key(0),
        config_overrides={"hidden_dropout_prob": 0.3, "remat": True},
    )
    first = forward(model, IDS, MASK).logits
    np.testing.assert_array_equal(first, forward(model, IDS, MASK).logits)
    model.train()
    noisy_a = forward(model, IDS, MASK).logits
    noisy_b = forward(model, IDS, MASK).logits
    assert not np.allclose(noisy_a, first) and not np.allclose(noisy_a, noisy_b)
    model.eval()
    np.testing.assert_array_equal(first, forward(model, IDS, MASK).logits)


def test_remat_changes_memory_not_results(llama_folder):
    """Same loss and gradients; the backward program recomputes each layer."""
    one_layer = {"num_hidden_layers": 1}  # a cheaper program to compile, twice
    plain = models.from_pretrained(llama_folder, config_overrides=one_layer)
    remat = models.from_pretrained(llama_folder, config_overrides={**one_layer, "remat": True})
    assert remat.config.remat

    def loss(model):
        return jnp.mean(model(IDS, MASK).logits ** 2)

    def loss_and_grads(model):
        return nnx.value_and_grad(loss)(model)

    def backward_program(model) -> str:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        grad = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))
        return str(jax.make_jaxpr(grad)(params))

    assert "remat" in backward_program(remat) and "remat" not in backward_program(plain)
    (loss_a, grads_a), (loss_b, grads_b) = (
        nnx.jit(loss_and_grads)(plain),
        nnx.jit(loss_and_grads)(remat),
    )
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_parameters_and_compute(llama_folder):
    model = models.from_pretrained(llama_folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    kernel = model.model.layers[0].mlp.down_proj.kernel
    assert kernel.dtype == jnp.bfloat16
    out = forward(model, IDS, MASK)
    assert out.logits.dtype == jnp.bfloat16
    reference = forward(models.from_pretrained(llama_folder), IDS, MASK).logits
    np.testing.assert_allclose(out.logits.astype(jnp.float32), reference, atol=5e-2)


# ------------------------------------------------------------- bad inputs


def test_folder_without_config(bert_folder, tmp_path):
    folder = copy_of(bert_folder, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(models.CheckpointNotFoundError, match=r"No config\.json in .*ckpt") as error:
        models.from_pretrained(folder)
    assert isinstance(error.value, FileNotFoundError)
    assert "save_pretrained" in str(error.value)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.from_pretrained(tmp_path / "nowhere")


def test_unsupported_model_type_lists_supported_ones(bert_folder, tmp_path):
    folder = copy_of(bert_folder, tmp_path)
    edit_config(folder, model_type="gpt2")
    with pytest.raises(models.ModelLoadError, match="'gpt2'") as error:
        models.from_pretrained(folder)
    message = str(error.value)
    assert "config.json" in message
    assert all(name in message for name in ("bert", "roberta", "llama", "mistral", "qwen2", "vit"))


def test_pickle_only_checkpoint_says_how_to_convert(bert_folder, tmp_path):
    folder = copy_of(bert_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(models.ModelLoadError, match="pytorch_model.bin") as error:
        models.from_pretrained(folder)
    message = str(error.value)
    assert "safetensors" in message
    assert "BertForSequenceClassification.from_pretrained(DIR).save_pretrained(DIR)" in message


def test_shape_mismatch_names_key_and_both_shapes(bert_folder, tmp_path):
    folder = copy_of(bert_folder, tmp_path)
    edit_config(folder, intermediate_size=80)
    with pytest.raises(models.ModelLoadError) as error:
        models.from_pretrained(folder)
    message = str(error.value)
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    assert f"{key}: checkpoint (64, 32) vs model (80, 32)" in message


def test_new_label_count_needs_consent(bert_folder):
    with pytest.raises(models.ModelLoadError, match="ignore_mismatched_sizes=True"):
        models.from_pretrained(bert_folder, num_labels=5)
    model, report = models.from_pretrained(
        bert_folder,
        num_labels=5,
        ignore_mismatched_sizes=True,
        seed=rbg_key(0),
        output_loading_info=True,
    )
    assert model.classifier.kernel.shape == (32, 5)
    assert {key: shapes for key, *shapes in report.mismatched_keys} == {
        "classifier.weight": [(3, 32), (5, 32)],
        "classifier.bias": [(3,), (5,)],
    }


def test_truncated_safetensors_names_the_file(bert_folder, tmp_path):
    folder = copy_of(bert_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(models.ModelLoadError, match=r"model\.safetensors.* truncated or corrupt"):
        models.from_pretrained(folder)


def test_strict_refuses_missing_weights(bert_folder):
    with pytest.raises(models.ModelLoadError, match="missing .*classifier.out_proj"):
        models.from_pretrained(bert_folder, strict=True, config_overrides={"model_type": "roberta"})
    with pytest.raises(models.ModelLoadError, match="unexpected .*classifier.weight"):
        models.from_pretrained(bert_folder, task="base", strict=True)
