"""Adapter arithmetic against HF PEFT's ``add_weighted_adapter``.

Two LoRA adapters with random factors, different scales and partly different
targets (an embedding and a convolution among them) are made in PyTorch,
saved by HF PEFT and loaded by peftjax; each combination runs on both sides
with the same weights, and the new factors (and their product, for ``svd``,
whose factors are unique only up to sign) must agree within 1e-5. DARE is
compared at density 1 and with the same given masks on both sides; its random
masks' statistics are tested on their own. fp32.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import peftjax  # noqa: E402
from peftjax import arithmetic, cli, models  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

ATOL = 1e-5
WEIGHTS = {"a": 0.7, "b": -0.4}
FAMILIES = {  # family -> (model, adapter a's targets, adapter b's targets)
    "bert": (
        transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)),
        ["query", "value", "word_embeddings"], ["query", "key"],
    ),
    "vit": (
        transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=8,
            patch_size=4)),
        ["q_proj", "projection"], ["projection", "v_proj"],
    ),
}
COMBINATIONS = {  # combination -> options on both sides
    "svd": {}, "cat": {}, "linear": {}, "ties": {"density": 0.6}, "magnitude_prune": {"density": 0.6},
    "dare_linear": {"density": 1.0}, "dare_ties": {"density": 1.0},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def adapters(request, tmp_path_factory):
    """(family, base checkpoint folder, HF PEFT model with adapters a and b, folders they are saved in)."""
    base, targets_a, targets_b = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    base.save_pretrained(folder / "base")
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets_a), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets_b))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in theirs.named_parameters():
            if "lora_" in name:
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
    theirs.save_pretrained(folder / "adapters")  # each in a subfolder named after it
    return request.param, folder / "base", theirs, {name: folder / "adapters" / name for name in WEIGHTS}


def ours_with(adapters):
    _, base, _, folders = adapters
    model = models.from_pretrained(base)
    for name, path in folders.items():
        peftjax.load_adapter(model, path, adapter_name=name)
    return model


@pytest.fixture(scope="module")
def ours(adapters):
    """peftjax's model with the same adapters, shared by the tests that only add combined ones."""
    return ours_with(adapters)


def their_factors(theirs, name) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """``{module path: (A, B, scale)}`` of HF PEFT adapter ``name``, in torch's layout."""
    found = {}
    for path, module in theirs.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.scaling:
            a, b = (module.lora_A[name].weight, module.lora_B[name].weight) if name in module.lora_A else (
                module.lora_embedding_A[name], module.lora_embedding_B[name])
            found[path] = (a.detach().numpy(), b.detach().numpy(), module.scaling[name])
    return found


def our_factors(model, name, names) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """The same for peftjax adapter ``name``, in torch's layout, under transformers' module paths."""
    found = {}
    for path, wrapper in peftjax.iter_wrappers(model):
        if wrapper.adapter_name == name:
            tensors = list(wrapper.hf_tensors().values())
            a, b = (t.to_torch(np.asarray(getattr(wrapper, t.attribute)[...])) for t in tensors)
            found[names.path(path.removesuffix(".base").removesuffix(".base"))] = (a, b, wrapper.scale)
    return found


def product(a, b, scale):
    return scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))


def compare(model, theirs, name, *, factors: bool):
    from peftjax.core.hf_peft import ModuleNames

    ours, expected = our_factors(model, name, ModuleNames(model)), their_factors(theirs, name)
    assert ours.keys() == expected.keys()
    for path, (a, b, scale) in expected.items():
        np.testing.assert_allclose(product(*ours[path]), product(a, b, scale), atol=ATOL, err_msg=path)
        if factors:
            np.testing.assert_allclose(ours[path][0] * ours[path][2], a * scale, atol=ATOL, err_msg=path)
            np.testing.assert_allclose(ours[path][1], b, atol=ATOL, err_msg=path)


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_combinations_equal_hf_peft(adapters, ours, combination):
    _, _, theirs, _ = adapters
    model = ours
    name = f"{combination}_combined"
    theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), name, combination_type=combination,
                                **COMBINATIONS[combination])
    peftjax.combine_adapters(model, WEIGHTS, into=name, combination=combination, **COMBINATIONS[combination])
    compare(model, theirs, name, factors=combination != "svd")
    assert {w.active for _, w in peftjax.iter_wrappers(model) if w.adapter_name == name} == {False}


def given_mask(values: np.ndarray, density: float) -> np.ndarray:
    """A mask fixed by the values themselves, so both sides drop the same entries."""
    return (np.abs(values) * 997.0) % 1.0 < density


@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties"])
def test_dare_with_given_masks_equals_hf_peft(adapters, ours, combination, monkeypatch):
    _, _, theirs, _ = adapters
    density = 0.5

    def their_pruning(tensor, density, rescale):
        assert rescale
        return tensor * torch.from_numpy(given_mask(tensor.numpy(), density)) / density

    monkeypatch.setattr(merge_utils, "random_pruning", their_pruning)
    monkeypatch.setattr(arithmetic, "dare_prune", lambda t, d, rng: t * given_mask(t, d) / np.float32(d))
    model = ours
    name = f"{combination}_masked"
    theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), name, combination_type=combination,
                                density=density)
    peftjax.combine_adapters(model, WEIGHTS, into=name, combination=combination, density=density)
    compare(model, theirs, name, factors=True)


def test_dare_masks_keep_the_expected_value():
    values = np.full(200_000, 3.0, np.float32)
    density = 0.3
    pruned = arithmetic.dare_prune(values, density, np.random.default_rng(0))
    kept = pruned != 0
    sigma = np.sqrt(density * (1 - density) / values.size)
    assert abs(kept.mean() - density) < 5 * sigma
    assert np.all(pruned[kept] == np.float32(3.0) / np.float32(density))  # rescaled, not just kept
    assert abs(pruned.mean() - 3.0) < 5 * 3.0 / density * sigma  # E[pruned] = the tensor
    again = arithmetic.dare_prune(values, density, np.random.default_rng(0))
    other = arithmetic.dare_prune(values, density, np.random.default_rng(1))
    assert np.array_equal(again, pruned) and not np.array_equal(other, pruned)


@pytest.mark.parametrize("adapters", ["bert"], indirect=True)  # the checks do not depend on the family
def test_bad_combinations_raise_and_leave_the_model_alone(adapters, unchanged):
    model = ours_with(adapters)
    check = unchanged(model)
    cases = [
        (dict(weights={"a": 1.0, "c": 1.0}, into="x"), r"no adapter named \['c'\]"),
        (dict(weights=WEIGHTS, into="a"), r"'a' is already used"),
        (dict(weights=WEIGHTS, into="x", combination="ties"), r"needs density in \[0, 1\]"),
        (dict(weights=WEIGHTS, into="x", combination="mean"), r"combination='mean'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(peftjax.PeftError, match=message):
            peftjax.combine_adapters(model, **kwargs)
    check()


@pytest.mark.parametrize("adapters", ["bert"], indirect=True)
def test_unequal_ranks_and_non_lora_adapters_are_refused(adapters):
    model = ours_with(adapters)
    peftjax.apply(model, peftjax.LoraConfig(rank=3, targets=["query"]), adapter_name="r3", stack=True)
    with pytest.raises(peftjax.PeftError, match=r"needs equal ranks; the adapters have \{'a': 2, 'r3': 3\}"):
        peftjax.combine_adapters(model, {"a": 1.0, "r3": 1.0}, into="x", combination="linear")
    peftjax.apply(model, peftjax.IA3Config(targets=["query"]), adapter_name="ia3", stack=True)
    with pytest.raises(peftjax.PeftError, match=r"combines plain LoRA adapters; \{'ia3': 'IA3Config'\}"):
        peftjax.combine_adapters(model, {"a": 1.0, "ia3": 1.0}, into="x")


@pytest.mark.parametrize("adapters", ["bert"], indirect=True)  # the command is the same for every family
def test_combine_adapters_command(adapters, tmp_path):
    _, base, theirs, folders = adapters
    args = [f"{folders['a']}=0.7", f"{folders['b']}=-0.4", "--combination", "ties", "--density", "0.6"]
    assert cli.main(["combine-adapters", *args, "--out", str(tmp_path / "out"), "--model", str(base)]) == 0
    theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "cli", combination_type="ties", density=0.6)
    model = peftjax.load_adapter(models.from_pretrained(base), tmp_path / "out", adapter_name="cli")
    compare(model, theirs, "cli", factors=True)
    assert cli.main(["combine-adapters", f"{folders['a']}", "--out", str(tmp_path / "x"), "--model", str(base)]) == 2
