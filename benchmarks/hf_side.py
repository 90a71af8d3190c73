"""HF PEFT's side of a comparison with peftjax (``compare_hf_peft.py`` describes both): PyTorch only."""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile

import comparison  # noqa: F401  (sets the environment before transformers starts)
import numpy as np
import torch
from comparison import LEARNING_RATE, WEIGHT_DECAY, Counts, Source, dtype_names

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_qlora_requirements(args, source: Source) -> None:
    """Stops before anything is built when the HF side of QLoRA cannot run here."""
    if args.method != "qlora":
        return
    if source.task.qlora_targets is None:
        raise SystemExit(f"--method qlora: wired for Llama models only, not {source.config.model_type!r}")
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (not installed)")
    if missing:
        raise SystemExit(f"--method qlora: the HF side (bitsandbytes 4-bit) needs CUDA and bitsandbytes; missing here: "
                         f"{', '.join(missing)}. Run on a GPU machine after `pip install bitsandbytes`.")


def sync_torch(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_model(args, source: Source, device: torch.device) -> torch.nn.Module:
    """The transformers model with HF PEFT's adapters, if any (on ``device`` only when quantised or a preset)."""
    model = hf_base_model(args, source, device)
    if args.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                            target_modules=list(args.targets), task_type=source.task.peft_task_type))


def hf_base_model(args, source: Source, device: torch.device) -> torch.nn.Module:
    """The transformers model in ``--dtype``."""
    import transformers

    cls = getattr(transformers, source.task.hf_class)
    dtype = DTYPES[args.dtype]
    kwargs = {"dtype": dtype, **source.dropout_overrides(args.dropout)}
    if source.task.num_labels:
        kwargs["num_labels"] = source.task.num_labels
    if args.method == "qlora":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            folder = source.folder
            if folder is None:  # bitsandbytes quantises while loading, so a preset goes through a folder
                config = cls.config_class(**source.hf_config())
                cls._from_config(config, dtype=dtype).save_pretrained(tmp)
                folder = tmp
            return cls.from_pretrained(folder, quantization_config=quantization,
                                       device_map={"": device.index or 0}, **kwargs)
    if source.folder is None:
        kwargs.pop("dtype")
        # Initialised on the device in its final dtype: no float32 or host copy to count at the peak.
        with device:
            return cls._from_config(cls.config_class(**{**source.hf_config(), **kwargs}), dtype=dtype)
    return cls.from_pretrained(source.folder, **kwargs)


def logical_numel(parameter: torch.nn.Parameter) -> int:
    """The float size of a parameter (bitsandbytes packs two 4-bit weights a byte; its quant_state keeps the shape)."""
    state = getattr(parameter, "quant_state", None)
    return math.prod(state.shape) if state is not None else parameter.numel()


class HFSide:
    name = "hf_peft"

    def __init__(self, args, source: Source, batch: dict[str, np.ndarray]):
        from transformers.utils import logging

        logging.disable_progress_bar()
        self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        model = hf_model(args, source, self.torch_device)
        self.attn_implementation = model.config._attn_implementation
        if args.method != "qlora":  # a 4-bit model is already where its loader's device_map put it
            model = model.to(self.torch_device)
        self.model = model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # Trainable: requires_grad. Total: the base model's own (PEFT's copy of the head is not a new parameter of it).
        base = self.model.get_base_model() if args.method != "full" else self.model
        total = sum(logical_numel(p) for n, p in base.named_parameters() if "original_module" not in n)
        self.counts = Counts(sum(p.numel() for p in trainable), total)
        self.param_dtypes = {"trainable": dtype_names(trainable),
                             "frozen": dtype_names(p for p in self.model.parameters() if not p.requires_grad)}
        self.optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.batch = {k: torch.as_tensor(v, device=self.torch_device) for k, v in batch.items()}
        cuda = self.torch_device.type == "cuda"
        self.device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"

    def step(self) -> torch.Tensor:
        """One step; returns its loss (of the parameters before the update), left on the device."""
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync_torch(self.torch_device)
        return loss.detach()

    def forward(self) -> None:
        self.model(**self.batch).loss.item()
        sync_torch(self.torch_device)

    def peak_memory(self) -> int | None:
        return int(torch.cuda.max_memory_allocated()) if self.torch_device.type == "cuda" else None


