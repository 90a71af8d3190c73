"""The insertion-point contract of ``peftjax.points``, on every reference model.

Test-local point subclasses stand in for methods: a recorder (identity that
logs what it sees), a prompt-like ``InputEmbeddings`` point that prepends
positions, and ``AttentionKeyValue`` points that prepend keys/values. The
strongest checks compare against an independent computation: prepending the
embeddings of real tokens must equal running on the longer sequence, and
prepending a layer's own earlier keys/values must equal a KV cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import models
from peftjax.points import AttentionKeyValue, BranchOutput, InputEmbeddings, InsertionPoint

import tiny_checkpoints  # tests/models helper (see its docstring)

TOL = 1e-5  # float32 rounding between two evaluation orders of the same math


class Log(list):
    """A call log kept as static module data: hashed by identity, so ``nnx.jit``
    hands the traced module this very object and trace-time appends land here."""

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


class RecordingBranch(BranchOutput):
    def __init__(self, log: Log):
        self.log = log

    def __call__(self, out_btd, residual_btd, norm):
        self.log.append(("branch", out_btd.shape, residual_btd.shape))
        return super().__call__(out_btd, residual_btd, norm)


class RecordingKeyValue(AttentionKeyValue):
    """Logs shapes at trace time and keeps the last keys/values as state."""

    def __init__(self, log: Log, kv_shape: tuple[int, ...] = (0,)):
        self.log = log
        self.k = nnx.Variable(jnp.zeros(kv_shape))
        self.v = nnx.Variable(jnp.zeros(kv_shape))

    def __call__(self, k_bsnh, v_bsnh, mask_bs):
        self.log.append(("kv", k_bsnh.shape, v_bsnh.shape, mask_bs.shape, mask_bs.dtype))
        if self.k.shape == k_bsnh.shape:
            self.k[...], self.v[...] = k_bsnh, v_bsnh
        return super().__call__(k_bsnh, v_bsnh, mask_bs)


class RecordingEmbeddings(InputEmbeddings):
    def __init__(self, log: Log):
        self.log = log

    def __call__(self, x_btd, mask_bt):
        self.log.append(("embed", x_btd.shape, mask_bt.shape))
        return super().__call__(x_btd, mask_bt)


class PrependEmbeddings(InputEmbeddings):
    """Prompt-tuning-like: puts fixed vectors in front, with their own mask."""

    def __init__(self, prefix_bnd: jax.Array, visible: bool = True):
        self.prefix = nnx.Param(prefix_bnd)
        self.visible = visible

    def __call__(self, x_btd, mask_bt):
        batch = x_btd.shape[0]
        prefix_bnd = jnp.broadcast_to(self.prefix[...], (batch, *self.prefix.shape[1:]))
        prefix_mask = jnp.full(prefix_bnd.shape[:2], self.visible)
        return (
            jnp.concatenate([prefix_bnd.astype(x_btd.dtype), x_btd], axis=1),
            jnp.concatenate([prefix_mask, mask_bt], axis=1),
        )


class PrependKeyValue(AttentionKeyValue):
    """Prefix-tuning-like: puts fixed keys/values in front, with their own mask."""

    def __init__(self, k_bnmh: jax.Array, v_bnmh: jax.Array, visible: bool):
        self.k_prefix = nnx.Variable(k_bnmh)
        self.v_prefix = nnx.Variable(v_bnmh)
        self.visible = visible

    def __call__(self, k_bsmh, v_bsmh, mask_bs):
        k_prefix, v_prefix = self.k_prefix[...], self.v_prefix[...]
        prefix_mask = jnp.full(k_prefix.shape[:2], self.visible)
        return (
            jnp.concatenate([k_prefix, k_bsmh], axis=1),
            jnp.concatenate([v_prefix, v_bsmh], axis=1),
            jnp.concatenate([prefix_mask, mask_bs], axis=1),
        )


def replace_points(model: nnx.Module, make: dict[type, object]) -> list[tuple]:
    """Swaps every point of a given type for ``make[type](path)``; returns the paths."""
    replaced = []
    for path, module in list(nnx.iter_modules(model)):
        for point_type, factory in make.items():
            if type(module) is point_type:
                parent = model
                for part in path[:-1]:
                    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
                setattr(parent, path[-1], factory(path))
                replaced.append(path)
    return replaced


def points_of(model: nnx.Module) -> dict[type, list[str]]:
    found: dict[type, list[str]] = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, InsertionPoint):
            found.setdefault(type(module), []).append(".".join(map(str, path)))
    return found


TEXT_IDS = np.array([[5, 17, 9, 33, 2, 8], [7, 12, 40, 3, 0, 0]])
TEXT_MASK = (np.arange(6) < np.array([[6], [4]])).astype(np.int32)


def text_inputs(model: nnx.Module) -> dict[str, jax.Array]:
    pad = model.config.pad_token_id or 0
    ids = np.where(TEXT_MASK == 1, TEXT_IDS, pad)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(TEXT_MASK)}


@nnx.jit
def run(model: nnx.Module, inputs: dict) -> models.ModelOutput:
    return model(**inputs)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return tiny_checkpoints.checkpoint_factory(tmp_path_factory)


@pytest.fixture
def build(tiny_checkpoint):
    """Returns a fresh eval-mode model per call, loaded from a tiny checkpoint."""

    def load(name: str, task: str) -> nnx.Module:
        return models.from_pretrained(tiny_checkpoint(name, task))

    return load


# ----------------------------------------------------------------- placement


@pytest.mark.parametrize(
    "name, task, expected",
    [
        ("bert-tiny", "classification", {
            "bert.embeddings.input_embeddings",
            "bert.encoder.layer.1.after_attention",
            "bert.encoder.layer.1.after_mlp",
            "bert.encoder.layer.1.attention.self.attention_kv",
        }),
        ("roberta-tiny", "token_classification", {
            "roberta.embeddings.input_embeddings",
            "roberta.encoder.layer.0.attention.self.attention_kv",
        }),
        ("llama-tiny", "causal_lm", {
            "model.input_embeddings",
            "model.layers.1.after_attention",
            "model.layers.1.after_mlp",
            "model.layers.0.self_attn.attention_kv",
        }),
        ("vit-tiny", "image_classification", {
            "vit.embeddings.input_embeddings",
            "vit.encoder.layer.1.after_mlp",
            "vit.encoder.layer.0.attention.attention.attention_kv",
        }),
    ],
)
def test_every_layer_has_its_points(name, task, expected):
    model = models.from_config(name, task=task, abstract=True)
    found = points_of(model)
    layers = model.config.num_hidden_layers
    assert len(found[BranchOutput]) == 2 * layers
    assert len(found[AttentionKeyValue]) == layers
    assert len(found[InputEmbeddings]) == 1
    assert expected <= {path for paths in found.values() for path in paths}


# ------------------------------------------------------------------ identity


@pytest.mark.parametrize(
    "name, task",
    [("bert-tiny", "classification"), ("llama-tiny", "causal_lm"),
     ("vit-tiny", "image_classification")],
)
def test_identity_points_change_nothing_and_see_the_contract_shapes(build, name, task):
    model = build(name, task)
    inputs = (
        {"pixel_values": jnp.ones((2, 3, 32, 32))} if name.startswith("vit") else text_inputs(model)
    )
    before = run(model, inputs)
    log = Log()
    replace_points(model, {
        BranchOutput: lambda path: RecordingBranch(log),
        AttentionKeyValue: lambda path: RecordingKeyValue(log),
        InputEmbeddings: lambda path: RecordingEmbeddings(log),
    })
    after = run(model, inputs)
    np.testing.assert_array_equal(np.asarray(after.logits), np.asarray(before.logits))

    config = model.config
    seq = 17 if name.startswith("vit") else 6
    heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = config.hidden_size // config.num_attention_heads
    hidden = (2, seq, config.hidden_size)
    assert log.count(("embed", hidden, (2, seq))) == 1
    assert log.count(("branch", hidden, hidden)) == 2 * config.num_hidden_layers
    kv_shape = (2, seq, heads, head_dim)
    kv_calls = [entry for entry in log if entry[0] == "kv"]
    assert kv_calls == [("kv", kv_shape, kv_shape, (2, seq), jnp.dtype(bool))] * len(kv_calls)
    assert len(kv_calls) == config.num_hidden_layers


# -------------------------------------------------- prepended input positions


@pytest.mark.parametrize(
    "name, task",
    [
        ("bert-tiny", "classification"),
        ("roberta-tiny", "token_classification"),
        ("llama-tiny", "classification"),
    ],
)
def test_prepended_token_embeddings_equal_a_longer_input(build, name, task):
    """Prepending the embeddings of real tokens is running on the longer sequence.

    Token-level outputs drop the prepended positions, so they stay aligned
    with the caller's tokens. The sequence classifiers read what they read on
    the longer input: BERT position 0 (a prepended token, as transformers
    pools HF PEFT's prompted inputs), Llama the caller's last real token.
    """
    prefix_ids = jnp.asarray([[11, 22, 44]])
    model = build(name, task)
    inputs = text_inputs(model)
    long_inputs = {
        "input_ids": jnp.concatenate([jnp.repeat(prefix_ids, 2, 0), inputs["input_ids"]], 1),
        "attention_mask": jnp.concatenate(
            [jnp.ones((2, 3), jnp.int32), inputs["attention_mask"]], 1
        ),
    }
    long = run(model, long_inputs)
    prefix_bnd = model.get_input_embeddings()(prefix_ids)
    replace_points(model, {InputEmbeddings: lambda path: PrependEmbeddings(prefix_bnd)})
    short = run(model, inputs)

    hidden_size = model.config.hidden_size
    assert short.last_hidden_state.shape == (*inputs["input_ids"].shape, hidden_size)
    np.testing.assert_allclose(
        short.last_hidden_state, long.last_hidden_state[:, 3:], atol=TOL, rtol=0
    )
    if task == "token_classification":
        assert short.logits.shape == (2, 6, 3)
        np.testing.assert_allclose(short.logits, long.logits[:, 3:], atol=TOL, rtol=0)
    else:  # BERT: position 0 of the long run; Llama: the last real token, in both runs
        np.testing.assert_allclose(short.logits, long.logits, atol=TOL, rtol=0)


def test_vit_hidden_prefix_is_invisible_and_cls_is_pooled(build):
    """A masked-out prefix before [CLS] changes nothing: the classifier still
    reads the image's [CLS] state, which the output keeps at index 0."""
    model = build("vit-tiny", "image_classification")
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.normal(size=(2, 3, 32, 32)), jnp.float32)
    before = run(model, {"pixel_values": pixels})
    prefix = jnp.asarray(rng.normal(size=(1, 4, 32)), jnp.float32)
    replace_points(model, {InputEmbeddings: lambda path: PrependEmbeddings(prefix, False)})
    hidden = run(model, {"pixel_values": pixels})
    assert hidden.last_hidden_state.shape == (2, 17, 32)
    np.testing.assert_allclose(hidden.last_hidden_state, before.last_hidden_state, atol=TOL, rtol=0)
    np.testing.assert_allclose(hidden.logits, before.logits, atol=TOL, rtol=0)


# ------------------------------------------------------- prepended keys/values


@pytest.mark.parametrize("name", ["bert-tiny", "llama-tiny", "vit-tiny"])
def test_masked_out_key_value_prefix_changes_nothing(build, name):
    task = {"bert-tiny": "classification", "llama-tiny": "causal_lm"}.get(name)
    model = build(name, task or "image_classification")
    inputs = (
        {"pixel_values": jnp.ones((2, 3, 32, 32))} if name.startswith("vit") else text_inputs(model)
    )
    before = run(model, inputs)
    config = model.config
    heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    shape = (2, 5, heads, config.hidden_size // config.num_attention_heads)
    keys = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
    replace_points(model, {
        AttentionKeyValue: lambda path: PrependKeyValue(keys, -keys, visible=False)
    })
    after = run(model, inputs)
    np.testing.assert_allclose(after.logits, before.logits, atol=TOL, rtol=0)


def test_llama_key_value_prefix_is_a_visible_causal_prefix(build):
    """Feeding a layer its own earlier keys/values is a KV cache.

    Run the whole sequence once and record each layer's keys/values; then
    run only the last tokens (at their true positions) with the recorded
    first keys/values prepended. Identical logits show the prefix is visible
    to every query and the causal mask is offset by kv_len - q_len.
    """
    model = build("llama-tiny", "causal_lm")
    ids = jnp.asarray([[5, 17, 9, 33, 2, 8, 21, 4]])
    log = Log()
    recorders = {}

    def recorder(path):
        recorders[path] = RecordingKeyValue(log, kv_shape=(1, 8, 2, 16))
        return recorders[path]

    replace_points(model, {AttentionKeyValue: recorder})
    full = run(model, {"input_ids": ids})
    split = 5
    replace_points(model, {
        RecordingKeyValue: lambda path: PrependKeyValue(
            recorders[path].k[...][:, :split], recorders[path].v[...][:, :split], visible=True
        )
    })
    tail = run(model, {"input_ids": ids[:, split:], "position_ids": jnp.arange(split, 8)[None]})
    np.testing.assert_allclose(tail.logits, full.logits[:, split:], atol=TOL, rtol=0)


def test_points_with_parameters_are_skipped_by_save_pretrained(build, tmp_path, caplog):
    model = build("llama-tiny", "causal_lm")
    prefix = jnp.zeros((1, 2, 64))
    replace_points(model, {InputEmbeddings: lambda path: PrependEmbeddings(prefix)})
    with caplog.at_level("WARNING", logger="peftjax.models"):
        models.save_pretrained(model, tmp_path)
    assert "model.input_embeddings.prefix" in caplog.text
    reloaded, report = models.from_pretrained(tmp_path, output_loading_info=True)
    assert report.missing_keys == () and report.unexpected_keys == ()
