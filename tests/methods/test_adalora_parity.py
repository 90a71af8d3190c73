"""AdaLoRA against HF PEFT: the forward pass, the budget schedule, and a short training run
in which PyTorch + HF PEFT (``AdaLoraModel.update_and_allocate`` after each optimizer step)
and peftjax each compute their own gradients; after every step the parameters, the
importance EMAs, the triplet scores and the masked triplets must agree."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from peftjax.methods.adalora import (
    AdaLoraConfig,
    allocator_state,
    as_lora_config,
    hf_rank_pattern,
    kept_ranks,
    trainable_after_pruning,
    triplet_scores,
)
from peftjax.train.state import TrainState, make_train_step

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

D_IN, D_HIDDEN, D_OUT, ROWS = 12, 10, 8, 16
MODULES = ("key", "down")
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=14, beta1=0.85, beta2=0.85,
                orth_reg_weight=0.5, lora_alpha=8)
LEARNING_RATE = 0.1


class TorchToy(torch.nn.Module):
    """Two linear layers; returns an object with ``.loss``, as AdaLoraModel's regulariser expects."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.key = torch.nn.Linear(D_IN, D_HIDDEN)
        self.down = torch.nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x, y):
        out = self.down(torch.nn.functional.gelu(self.key(x)))
        return types.SimpleNamespace(loss=((out - y) ** 2).mean(), out=out)


class JaxToy(nnx.Module):
    def __init__(self, source: TorchToy):
        rngs = nnx.Rngs(0)
        self.key = nnx.Linear(D_IN, D_HIDDEN, rngs=rngs)
        self.down = nnx.Linear(D_HIDDEN, D_OUT, rngs=rngs)
        for name in MODULES:
            theirs = getattr(source, name)
            getattr(self, name).kernel[...] = jnp.asarray(theirs.weight.detach().numpy().T)
            getattr(self, name).bias[...] = jnp.asarray(theirs.bias.detach().numpy())

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.key(x), approximate=False))


def ours_config(**changes) -> AdaLoraConfig:
    s = SCHEDULE
    fields = dict(init_rank=s["init_r"], target_rank=s["target_r"], total_steps=s["total_step"],
                  initial_steps=s["tinit"], final_steps=s["tfinal"], mask_interval=s["deltaT"], beta1=s["beta1"],
                  beta2=s["beta2"], orth_reg_weight=s["orth_reg_weight"], alpha=float(s["lora_alpha"]),
                  targets=list(MODULES))
    return AdaLoraConfig(**{**fields, **changes})


def theirs_model():
    config = peft.AdaLoraConfig(target_modules=list(MODULES), **SCHEDULE)
    return peft.get_peft_model(TorchToy(), config)


def numpy(tensor) -> np.ndarray:
    """A copy: torch's optimizer changes parameters in place."""
    return tensor.detach().numpy().copy()


def data():
    """Regression targets with outliers, one fixed batch per step."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((SCHEDULE["total_step"], ROWS, D_IN)).astype(np.float32)
    y = rng.standard_normal((SCHEDULE["total_step"], ROWS, D_OUT)).astype(np.float32)
    y[:, 0] *= 10.0
    return x, y


def copy_factors(theirs, ours) -> None:
    """HF's initial A and B into ours (E is zero in both), so both runs start from one point."""
    for name in MODULES:
        layer, mine = getattr(theirs.base_model.model, name), getattr(ours, name)
        mine.lora_a[...] = jnp.asarray(numpy(layer.lora_A["default"]).T)
        mine.lora_b[...] = jnp.asarray(numpy(layer.lora_B["default"]).T)
        np.testing.assert_array_equal(numpy(layer.lora_E["default"]).ravel(), np.asarray(mine.lora_e[...]))


def test_initialisation_matches_hf_peft_distribution():
    model = JaxToy(TorchToy())
    peftjax.apply(model, ours_config(init_rank=64))
    theirs = peft.get_peft_model(TorchToy(), peft.AdaLoraConfig(target_modules=list(MODULES), **{**SCHEDULE,
                                                                                           "init_r": 64}))
    for name in MODULES:
        mine, layer = getattr(model, name), getattr(theirs.base_model.model, name)
        assert not np.any(np.asarray(mine.lora_e[...])) and not np.any(numpy(layer.lora_E["default"]))
        for ours_value, their_value in ((mine.lora_a, layer.lora_A["default"]), (mine.lora_b, layer.lora_B["default"])):
            assert ours_value.shape == tuple(reversed(their_value.shape))
            # Both normal(0, 0.02): the sample standard deviations of 640+ draws agree within 15%.
            assert abs(float(np.std(np.asarray(ours_value[...]))) / float(numpy(their_value).std()) - 1) < 0.15
        assert mine.scale == pytest.approx(layer.scaling["default"] / (float(layer.ranknum["default"]) + 1e-5))


def test_forward_matches_hf_peft():
    theirs = theirs_model()
    ours = JaxToy(theirs.base_model.model)
    peftjax.apply(ours, ours_config())
    generator = torch.Generator().manual_seed(3)
    for name in MODULES:
        layer, mine = getattr(theirs.base_model.model, name), getattr(ours, name)
        with torch.no_grad():
            layer.lora_E["default"].copy_(torch.randn(layer.lora_E["default"].shape, generator=generator))
        mine.lora_e[...] = jnp.asarray(numpy(layer.lora_E["default"]).ravel())
    copy_factors(theirs, ours)
    x, y = data()
    expected = numpy(theirs.base_model.model(torch.from_numpy(x[0]), torch.from_numpy(y[0])).out)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x[0]))), expected, atol=1e-5)


@pytest.mark.parametrize("schedule", [dict(), dict(tinit=5, tfinal=40, deltaT=3, total_step=200, init_r=12,
                                                   target_r=3)])
def test_budget_schedule_matches_hf_peft(schedule):
    settings = {**SCHEDULE, **schedule}
    theirs = peft.get_peft_model(TorchToy(), peft.AdaLoraConfig(target_modules=list(MODULES), **settings))
    allocator = theirs.base_model.rankallocator
    ours = ours_config(init_rank=settings["init_r"], target_rank=settings["target_r"],
                       total_steps=settings["total_step"], initial_steps=settings["tinit"],
                       final_steps=settings["tfinal"], mask_interval=settings["deltaT"])
    budget, allocate = ours.budget_schedule(len(MODULES))
    expected = [allocator.budget_schedule(step) for step in range(settings["total_step"] + 1)]
    assert budget.tolist() == [b for b, _ in expected]
    assert allocate.tolist() == [m for _, m in expected]
    assert budget[0] == settings["init_r"] * len(MODULES) and budget[-1] == settings["target_r"] * len(MODULES)


@pytest.fixture(scope="module")
def trained_both_ways():
    """14 steps of SGD both ways; per step, HF's state and ours."""
    x, y = data()
    theirs = theirs_model()
    ours = JaxToy(theirs.base_model.model)
    peftjax.apply(ours, ours_config())
    copy_factors(theirs, ours)

    params = [p for p in theirs.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LEARNING_RATE)
    allocator = theirs.base_model.rankallocator
    config = theirs.base_model.peft_config["default"]
    their_steps = []
    for step in range(SCHEDULE["total_step"]):
        theirs.base_model(torch.from_numpy(x[step]), torch.from_numpy(y[step])).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        layers = {name: getattr(theirs.base_model.model, name) for name in MODULES}
        their_steps.append({
            "factors": {n: {"lora_a": numpy(l.lora_A["default"]).T, "lora_e": numpy(l.lora_E["default"]).ravel(),
                            "lora_b": numpy(l.lora_B["default"]).T} for n, l in layers.items()},
            "ema": {n: dict(allocator.exp_avg_ipt) and {
                f: (numpy(allocator.exp_avg_ipt[f"{n}.{hf}.default"]), numpy(allocator.exp_avg_unc[f"{n}.{hf}.default"]))
                for f, hf in (("lora_a", "lora_A"), ("lora_e", "lora_E"), ("lora_b", "lora_B"))} for n in MODULES},
            "rank_pattern": dict(config.rank_pattern) if config.rank_pattern else None,
        })
        optimizer.zero_grad()

    def loss_fn(model, batch):
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

    state = TrainState.create(ours, peftjax.make_optimizer(ours, optax.sgd(LEARNING_RATE)))
    step_fn = make_train_step(loss_fn)
    our_steps = []
    for step in range(SCHEDULE["total_step"]):
        state, _ = step_fn(state, {"x": jnp.asarray(x[step]), "y": jnp.asarray(y[step])})
        model = state.model()
        allocation = allocator_state(state.opt_state)
        our_steps.append({
            "factors": {n: {f: np.asarray(getattr(getattr(model, n), f)[...]) for f in ("lora_a", "lora_e", "lora_b")}
                        for n in MODULES},
            "sensitivity": jax.device_get(allocation.sensitivity),
            "uncertainty": jax.device_get(allocation.uncertainty),
            "keep": {n: np.asarray(allocation.keep[n]) for n in MODULES},
        })
    return their_steps, our_steps, state, allocator


def test_training_matches_hf_peft_step_by_step(trained_both_ways):
    their_steps, our_steps, _, _ = trained_both_ways
    pruning_end = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    masked_steps = 0
    for step, (theirs, ours) in enumerate(zip(their_steps, our_steps)):
        where = f"after step {step}"
        for name in MODULES:
            for factor in ("lora_a", "lora_e", "lora_b"):
                np.testing.assert_allclose(ours["factors"][name][factor], theirs["factors"][name][factor],
                                           atol=2e-6, rtol=1e-4, err_msg=f"{where}: {name}.{factor}")
            if step < pruning_end:  # HF drops its EMAs at the last allocation (ours are zeroed then)
                for factor, (ipt, unc) in theirs["ema"][name].items():
                    as_ours = (lambda v: v.ravel()) if factor == "lora_e" else (lambda v: v.T)
                    np.testing.assert_allclose(ours["sensitivity"][name][factor], as_ours(ipt), atol=1e-9, rtol=1e-3,
                                               err_msg=f"{where}: sensitivity of {name}.{factor}")
                    np.testing.assert_allclose(ours["uncertainty"][name][factor], as_ours(unc), atol=1e-9, rtol=1e-3,
                                               err_msg=f"{where}: uncertainty of {name}.{factor}")
        pattern = theirs["rank_pattern"]
        masking = step >= pruning_end or (step > SCHEDULE["tinit"] and step % SCHEDULE["deltaT"] == 0)
        for name in MODULES:
            expected = np.ones(SCHEDULE["init_r"], bool) if pattern is None else np.asarray(pattern[f"{name}.lora_E.default"])
            np.testing.assert_array_equal(ours["keep"][name], expected, err_msg=f"{where}: kept triplets of {name}")
            if masking:  # the masked triplets' E is exactly zero after a masking step
                assert not np.any(ours["factors"][name]["lora_e"][~expected])
                masked_steps += int(not expected.all())
    assert masked_steps > 3  # the comparison saw pruning
    final = our_steps[-1]["keep"]
    assert sum(int(k.sum()) for k in final.values()) == SCHEDULE["target_r"] * len(MODULES)


def test_triplet_scores_match_hf_peft(trained_both_ways):
    """Our score formula on HF's own EMAs, against HF's ``_element_score`` and ``_combine_ipt``."""
    _, _, _, allocator = trained_both_ways
    pruning_end = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    theirs = theirs_model()
    x, y = data()
    allocator = theirs.base_model.rankallocator
    for step in range(pruning_end - 1):  # EMAs exist until the last allocation
        theirs.base_model(torch.from_numpy(x[step]), torch.from_numpy(y[step])).loss.backward()
        allocator.update_ipt(theirs.base_model.model)
        theirs.zero_grad()
    sensitivity, uncertainty, expected = {}, {}, {}
    for name in MODULES:
        key = lambda hf: f"{name}.{hf}.default"  # noqa: E731
        sensitivity[name] = {"lora_a": numpy(allocator.exp_avg_ipt[key("lora_A")]).T,
                             "lora_e": numpy(allocator.exp_avg_ipt[key("lora_E")]).ravel(),
                             "lora_b": numpy(allocator.exp_avg_ipt[key("lora_B")]).T}
        uncertainty[name] = {"lora_a": numpy(allocator.exp_avg_unc[key("lora_A")]).T,
                             "lora_e": numpy(allocator.exp_avg_unc[key("lora_E")]).ravel(),
                             "lora_b": numpy(allocator.exp_avg_unc[key("lora_B")]).T}
        ipt_a = allocator._element_score(key("lora_A")).mean(dim=1, keepdim=True)
        ipt_b = allocator._element_score(key("lora_B")).mean(dim=0).view(-1, 1)
        expected[name] = numpy(allocator._combine_ipt(allocator._element_score(key("lora_E")),
                                                      torch.cat([ipt_a, ipt_b], dim=1)))
    ours = triplet_scores(jax.tree.map(jnp.asarray, sensitivity), jax.tree.map(jnp.asarray, uncertainty))
    for name in MODULES:
        assert np.any(expected[name] > 0)
        np.testing.assert_allclose(np.asarray(ours[name]), expected[name], rtol=1e-5)


def test_exported_allocation(trained_both_ways):
    their_steps, _, state, _ = trained_both_ways
    ranks = kept_ranks(state.opt_state)
    pattern = their_steps[-1]["rank_pattern"]
    assert ranks == {name: int(np.sum(pattern[f"{name}.lora_E.default"])) for name in MODULES}
    assert hf_rank_pattern(state.opt_state) == {k: list(v) for k, v in pattern.items()}
    assert sum(ranks.values()) == SCHEDULE["target_r"] * len(MODULES)
    model = state.model()
    expected = sum(r * (D_IN + D_HIDDEN + 1) if n == "key" else r * (D_HIDDEN + D_OUT + 1) for n, r in ranks.items())
    assert trainable_after_pruning(model, ranks) == expected
    lora = as_lora_config(ours_config(), ranks)
    toy = JaxToy(TorchToy())
    peftjax.apply(toy, lora)
    for name, rank in ranks.items():
        if rank:
            assert getattr(toy, name).lora_a.shape[-1] == rank


def test_bad_adalora_input_is_refused():
    from peftjax.errors import PeftError
    from peftjax.rank_search.config import SweepConfig, SweepError

    with pytest.raises(PeftError, match=r"target_rank=16: must be at most init_rank=12"):
        ours_config(init_rank=12, target_rank=16)
    with pytest.raises(PeftError, match=r"initial_steps=10: leaves no steps to prune in"):
        ours_config(total_steps=20, initial_steps=10, final_steps=10)
    with pytest.raises(SweepError, match=r"sweep\.adalora: .*target_rank=9: must be at most init_rank=4"):
        SweepConfig.from_dict({"ranks": [1], "searches": ["adalora"], "adalora": {"init_rank": 4, "target_rank": 9}})
