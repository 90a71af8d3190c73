"""peftjax against HF PEFT on the real MiniLM-L6 (pretrained weights, a padded batch).

HF PEFT builds its model with ``get_peft_model`` and computes with its own
forward and backward. Its adapter gets values away from the initialisation,
with outliers, which are copied to peftjax; no position, pooling choice or
gradient is passed across. Initial values are compared as distributions:
HF PEFT draws them from torch's generator, so the values cannot match.
Forward passes run on the whole model, gradients on its first two layers
(the real weights of those layers) to keep the compiles short.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: no network in tests

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import peftjax  # noqa: E402
from peftjax.methods.prefix_tuning import PrefixTuning  # noqa: E402
from peftjax.models import from_pretrained  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ATOL = 1e-4  # forward outputs, float32
GRAD_RTOL = 1e-4  # gradients, relative to the largest entry of each array
LAYERS = 2  # of MiniLM's 6, for the gradient tests
TARGETS = ["query", "value", "intermediate.dense", "output.dense"]  # every kernel shape: 384x384, 384x1536, 1536x384


@pytest.fixture(scope="module")
def batch(minilm_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    texts = ["A short one.", "A much longer sentence, so the first one is padded in this batch."]
    encoded = dict(tokenizer(texts, padding=True, return_tensors="np"))
    assert (encoded["attention_mask"] == 0).any(), "the batch must contain padding"
    return encoded


def torch_inputs(batch, **extra):
    return {**{k: torch.from_numpy(v) for k, v in batch.items()}, **extra}


def jax_inputs(batch):
    return [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]


def with_outliers(shape, scale, seed, center=0.0):
    """Normal values with 2% of them 20 times larger."""
    rng = np.random.default_rng(seed)
    values = scale * rng.standard_normal(shape)
    values[rng.random(shape) < 0.02] *= 20
    return (center + values).astype(np.float32)


def uniform_ks(values, bound):
    """Kolmogorov-Smirnov distance of ``values`` from uniform on [-bound, bound]."""
    ordered = np.sort(np.ravel(values)) / bound
    cdf = (ordered + 1) / 2
    n = ordered.size
    return max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))


def within_uniform(values, bound):
    """Inside the bound, reaching close to it, and uniform by KS at the 1% level."""
    values = np.asarray(values)
    return np.abs(values).max() <= bound and np.abs(values).max() > 0.99 * bound and (
        uniform_ks(values, bound) < 1.63 / np.sqrt(values.size)
    )


# --------------------------------------------------------------------- initial values


def test_vera_shared_matrices_are_distributed_as_hf_peft(minilm_path):
    """One A sized to the largest fan-in (1536, the FFN's output.dense) and one
    B to the largest fan-out (1536, intermediate.dense), Kaiming-uniform with
    gain sqrt(2): A on +-sqrt(6 / 1536), B on +-sqrt(6 / r); each layer uses
    the leading slices."""
    rank = 64
    reference = transformers.AutoModel.from_pretrained(minilm_path)
    theirs = peft.get_peft_model(reference, peft.VeraConfig(r=rank, target_modules=TARGETS))
    their_a, their_b = (m["default"].numpy() for m in (theirs.base_model.vera_A, theirs.base_model.vera_B))
    model = from_pretrained(minilm_path)
    peftjax.apply(model, peftjax.VeraConfig(rank=rank, targets=TARGETS))
    wrappers = [w for _, w in peftjax.iter_wrappers(model)]
    a, b = wrappers[0].projection_a, wrappers[0].projection_b
    assert all(w.projection_a is a and w.projection_b is b for w in wrappers)  # one pair, shared
    assert a.shape == their_a.T.shape == (1536, rank) and b.shape == their_b.T.shape == (rank, 1536)
    for ours, their, bound in ((a[...], their_a, np.sqrt(6 / 1536)), (b[...], their_b, np.sqrt(6 / rank))):
        assert within_uniform(their, bound) and within_uniform(ours, bound)
    assert peftjax.VeraConfig(targets=TARGETS).rank == peft.VeraConfig().r  # the default r
    query = model.encoder.layer[0].attention.self.query  # fan-in 384, fan-out 384: the leading slices
    slice_a, slice_b = query.factors(jnp.float32)
    np.testing.assert_array_equal(slice_a, a[...][:384])
    np.testing.assert_array_equal(slice_b, b[...][:, :384])


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_lora_a_is_distributed_as_hf_peft(minilm_path, init):
    """A is uniform on +-1/sqrt(fan_in) (torch's kaiming_uniform_(a=sqrt(5)))
    or normal with std 1/r; B starts at zero."""
    rank = 8
    reference = transformers.AutoModel.from_pretrained(minilm_path, num_hidden_layers=1)
    init_lora_weights = True if init == "kaiming" else "gaussian"
    config = peft.LoraConfig(r=rank, target_modules=TARGETS, init_lora_weights=init_lora_weights)
    theirs = dict(peft.get_peft_model(reference, config).base_model.model.named_modules())
    model = from_pretrained(minilm_path, config_overrides={"num_hidden_layers": 1})
    peftjax.apply(model, peftjax.LoraConfig(rank=rank, targets=TARGETS, init=init))
    for path, wrapper in peftjax.iter_wrappers(model):
        their_a = theirs[path].lora_A["default"].weight.detach().numpy()
        assert wrapper.lora_a.shape == their_a.T.shape and not wrapper.lora_b[...].any()
        if init == "kaiming":
            bound = 1 / np.sqrt(wrapper.layout.fan_in)
            assert within_uniform(their_a, bound) and within_uniform(wrapper.lora_a[...], bound), path
        else:
            for values in (their_a, np.asarray(wrapper.lora_a[...])):
                assert abs(values.mean()) < 5 / rank / np.sqrt(values.size), path
                assert abs(values.std() * rank - 1) < 0.05, path


# --------------------------------------------------------------------- prefix tuning


@pytest.mark.parametrize("given_positions", [False, True], ids=["default-positions", "caller-positions"])
def test_prefix_tuning_matches_hf_peft(minilm_path, batch, given_positions):
    """HF PEFT feeds the prefixes as a KV cache, so the tokens sit at positions
    N..; caller-given position ids are shifted by N. Nothing about positions
    is passed to peftjax."""
    n = 4
    reference = transformers.AutoModel.from_pretrained(minilm_path).eval()
    config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=n)
    theirs = peft.get_peft_model(reference, config)
    model = from_pretrained(minilm_path)
    peftjax.apply(model, peftjax.PrefixTuningConfig(num_virtual_tokens=n))
    model.eval()
    config = model.config
    # HF PEFT's (N, L * 2 * kv_dim) table: layer l's keys, then its values.
    table = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
    table = table.reshape(n, config.num_hidden_layers, 2, config.num_attention_heads, config.head_dim)
    wrappers = [w for _, w in peftjax.iter_wrappers(model) if isinstance(w, PrefixTuning)]
    for layer, wrapper in enumerate(wrappers):
        wrapper.prefix_keys[...] = jnp.asarray(table[:, layer, 0])
        wrapper.prefix_values[...] = jnp.asarray(table[:, layer, 1])

    positions = np.tile(np.arange(batch["input_ids"].shape[1]), (batch["input_ids"].shape[0], 1))
    extra = {"position_ids": torch.from_numpy(positions)} if given_positions else {}
    with torch.no_grad():
        expected = theirs(**torch_inputs(batch, **extra)).last_hidden_state.numpy()
    ours = nnx.jit(lambda m, *a: m(*a).last_hidden_state)(
        model, *jax_inputs(batch), *([jnp.asarray(positions)] if given_positions else [])
    )
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], expected[real], atol=ATOL, rtol=0)


# --------------------------------------------------------------------- prompt tuning


def test_prompt_tuning_classifier_logits_match_hf_peft(minilm_path, batch):
    """Text initialisation gives HF PEFT's prompt, and with the same head the
    logits are HF PEFT's: the pooler reads the first virtual token."""
    n, text = 11, "Classify the sentiment of this review"  # 8 tokens with [CLS], [SEP]: repeated
    torch.manual_seed(0)
    reference = transformers.BertForSequenceClassification.from_pretrained(minilm_path, num_labels=3).eval()
    with torch.no_grad():  # a head of unit scale, so the pooled position shows in the logits
        reference.classifier.weight.normal_()
        reference.classifier.bias.normal_()
    config = peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=n, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=minilm_path,
    )  # fmt: skip
    theirs = peft.get_peft_model(reference, config).eval()
    model = from_pretrained(minilm_path, task="classification", num_labels=3)
    model.classifier.kernel[...] = jnp.asarray(reference.classifier.weight.detach().numpy().T)
    model.classifier.bias[...] = jnp.asarray(reference.classifier.bias.detach().numpy())
    ids = transformers.AutoTokenizer.from_pretrained(minilm_path)(text)["input_ids"]
    peftjax.apply(model, peftjax.PromptTuningConfig(num_virtual_tokens=n, init="text", init_text_ids=ids))
    model.eval()

    their_prompt = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_array_equal(model.bert.embeddings.input_embeddings.prompt[...], their_prompt)
    with torch.no_grad():
        expected = theirs(**torch_inputs(batch)).logits.numpy()
    logits = nnx.jit(lambda m, *a: m(*a).logits)(model, *jax_inputs(batch))
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------- gradients


def build_lora(dora):
    def build(reference, model):
        theirs = peft.get_peft_model(
            reference, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora)
        )
        peftjax.apply(model, (peftjax.DoraConfig if dora else peftjax.LoraConfig)(rank=4, alpha=8, targets=TARGETS))
        return theirs

    def values(seed, layer, wrapper):
        layer.lora_B["default"].weight.copy_(torch.from_numpy(with_outliers(wrapper.lora_b.shape[::-1], 0.05, seed)))
        wrapper.lora_a[...] = jnp.asarray(layer.lora_A["default"].weight.numpy().T)
        wrapper.lora_b[...] = jnp.asarray(layer.lora_B["default"].weight.numpy().T)
        pairs = {"lora_a": layer.lora_A["default"].weight, "lora_b": layer.lora_B["default"].weight}
        if dora:
            magnitude = layer.lora_magnitude_vector["default"].weight
            np.testing.assert_allclose(wrapper.magnitude[...], magnitude.numpy(), rtol=1e-6)  # both ||W||_c
            magnitude.mul_(torch.from_numpy(1 + np.abs(with_outliers(magnitude.shape, 0.1, seed + 1))))
            wrapper.magnitude[...] = jnp.asarray(magnitude.numpy())
            pairs["magnitude"] = magnitude
        return pairs

    return build, values


def build_ia3(reference, model):
    theirs = peft.get_peft_model(
        reference, peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    )
    peftjax.apply(model, peftjax.IA3Config(targets=["key", "value", "output.dense"], feedforward=["output.dense"]))
    return theirs


def ia3_values(seed, layer, wrapper):
    vector = layer.ia3_l["default"]
    vector.copy_(torch.from_numpy(with_outliers(tuple(vector.shape), 0.1, seed, center=1.0)))
    wrapper.ia3_l[...] = jnp.asarray(vector.numpy().ravel())
    return {"ia3_l": vector}


def build_vera(reference, model):
    theirs = peft.get_peft_model(reference, peft.VeraConfig(r=16, target_modules=TARGETS))
    peftjax.apply(model, peftjax.VeraConfig(rank=16, targets=TARGETS))
    wrapper = next(w for _, w in peftjax.iter_wrappers(model))  # every wrapper shares A and B
    wrapper.projection_a[...] = jnp.asarray(theirs.base_model.vera_A["default"].numpy().T)
    wrapper.projection_b[...] = jnp.asarray(theirs.base_model.vera_B["default"].numpy().T)
    return theirs


def vera_values(seed, layer, wrapper):
    b, d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    b.copy_(torch.from_numpy(with_outliers(tuple(b.shape), 0.1, seed)))
    d.copy_(torch.from_numpy(with_outliers(tuple(d.shape), 0.1, seed + 1, center=0.1)))
    wrapper.scale_b[...], wrapper.scale_d[...] = jnp.asarray(b.numpy()), jnp.asarray(d.numpy())
    return {"scale_b": b, "scale_d": d}


METHODS = {
    "lora": build_lora(dora=False),
    "dora": build_lora(dora=True),
    "ia3": (build_ia3, ia3_values),
    "vera": (build_vera, vera_values),
}


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_hf_peft(minilm_path, batch, method):
    """d(sum(hidden * C)) / d(adapter) for a cotangent C with outliers, on the
    padded rows' real tokens: HF PEFT's autograd against jax.grad."""
    build, values = METHODS[method]
    reference = transformers.AutoModel.from_pretrained(minilm_path, num_hidden_layers=LAYERS).eval()
    model = from_pretrained(minilm_path, config_overrides={"num_hidden_layers": LAYERS})
    theirs = build(reference, model)
    theirs.eval()
    model.eval()
    modules = dict(theirs.base_model.model.named_modules())
    wrappers = dict(peftjax.iter_wrappers(model))
    with torch.no_grad():
        pairs = {path: values(seed, modules[path], wrapper) for seed, (path, wrapper) in enumerate(wrappers.items())}

    cotangent = with_outliers((*batch["input_ids"].shape, model.config.hidden_size), 1.0, seed=99)
    cotangent *= batch["attention_mask"][..., None]
    (theirs(**torch_inputs(batch)).last_hidden_state * torch.from_numpy(cotangent)).sum().backward()

    graphdef, adapters, rest = nnx.split(model, peftjax.AdapterParam, ...)

    def loss(adapters):
        hidden = nnx.merge(graphdef, adapters, rest)(*jax_inputs(batch)).last_hidden_state
        return jnp.sum(hidden * cotangent)

    grads = dict(nnx.to_flat_state(jax.jit(jax.grad(loss))(adapters)))
    for path in wrappers:
        key = tuple(int(part) if part.isdigit() else part for part in path.split("."))
        for name, their_param in pairs[path].items():
            ours = np.asarray(grads[(*key, name)][...])
            expected = their_param.grad.numpy()  # torch layout: (out, in) factors, (out, 1) or (1, in) IA3
            expected = expected.T if expected.ndim == 2 and ours.ndim == 2 else expected.reshape(ours.shape)
            scale = np.abs(expected).max()
            assert scale > 0, f"{path}.{name}: HF PEFT's gradient is zero, the comparison would say nothing"
            np.testing.assert_allclose(ours, expected, atol=GRAD_RTOL * scale, rtol=0, err_msg=f"{path}.{name}")
