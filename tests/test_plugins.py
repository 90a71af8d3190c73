"""Methods from outside the package: a module written to a temporary folder
(not under peftjax/) registers a method, and ``peftjax train --plugin``, a
config's ``plugins:`` key and the ``peftjax.methods`` entry-point group each
make it usable; ``python -m peftjax`` runs the command."""

from __future__ import annotations

import json
import runpy
import sys
import textwrap

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from peftjax.cli import main
from peftjax.config import load_config
from peftjax.methods.base import config_from_dict
from peftjax.plugins import PluginError, load_entry_points, load_plugins

PLUGIN = '''
import dataclasses

import jax.numpy as jnp
from flax import nnx

import peftjax


class ShiftParam(peftjax.AdapterParam):
    """beta, added to the layer's output."""


@peftjax.register_method("{name}")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ShiftConfig(peftjax.MethodConfig):
    target_types = (nnx.Linear,)

    def wrap(self, module, *, adapter_name, rngs):
        return Shift(module, adapter_name=adapter_name)


class Shift(peftjax.AdapterWrapper):
    def __init__(self, base, *, adapter_name):
        super().__init__(base, adapter_name=adapter_name)
        self.beta = ShiftParam(jnp.zeros(self.base_layer.out_features))

    def __call__(self, x):
        y = self.base(x)
        return y + self.beta[...].astype(y.dtype) if self.adds_output else y
'''

TINY = {  # bert-tiny on synthetic sentences: no download, no shared data
    "name": "plugin",
    "model": {"name": "bert-tiny"},
    "data": {"source": "synthetic:sentiment", "task": "classification", "eval_split": None, "test_split": None,
             "text_columns": ["sentence"], "label_column": "label", "max_length": 16, "bucket_lengths": [16],
             "max_train_rows": 64},
    "optim": {"name": "adamw", "learning_rate": 1e-2},
    "train": {"batch_size": 16, "steps": 3, "eval_every": 0, "checkpoint_every": 0, "log_every": 1},
}


def write_plugin(folder, module: str) -> None:
    (folder / f"{module}.py").write_text(PLUGIN.format(name=module))


def write_config(folder, method: str, **top) -> str:
    config = {**TINY, "output_dir": str(folder / "out"), **top,
              "methods": [{"type": method, "targets": ["query", "value"]}]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return str(folder / "config.yaml")


def test_a_method_from_outside_the_package_trains_through_peftjax_train_plugin(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin(tmp_path, "shift_by_flag")
    config = write_config(tmp_path, "shift_by_flag")
    assert main(["train", config, "--quiet"]) == 2  # unknown without the plugin: a clear error, no traceback
    assert "unknown method type 'shift_by_flag'" in capsys.readouterr().err
    assert main(["train", "--plugin", "shift_by_flag", config, "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    hidden, layers = 32, 2  # bert-tiny: one beta per query and value output
    assert printed["params"]["trainable"] == layers * 2 * hidden
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == layers * 2 and all(bool(np.any(beta != 0)) for beta in adapter.values()), "it trained"


def test_the_plugins_key_imports_before_methods_are_read(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin(tmp_path, "shift_by_key")
    config = load_config(write_config(tmp_path, "shift_by_key", plugins=["shift_by_key"]),
                         method_validator=config_from_dict)
    assert config.plugins == ("shift_by_key",)
    assert type(config_from_dict(config.method_dicts()[0])).__name__ == "ShiftConfig"
    assert yaml.safe_load(config.to_yaml())["plugins"] == ["shift_by_key"]  # kept in result.json's config


def test_the_entry_point_group_is_loaded(tmp_path, monkeypatch):
    """A distribution installed on sys.path declares the module in ``peftjax.methods``."""
    write_plugin(tmp_path, "shift_by_entry_point")
    info = tmp_path / "shift_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shift-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[peftjax.methods]\nshift = shift_by_entry_point\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_entry_points.cache_clear()
    try:
        method = config_from_dict({"type": "shift_by_entry_point", "targets": ["query"]})
        assert type(method).__name__ == "ShiftConfig"
        assert "shift = shift_by_entry_point" in load_entry_points()
    finally:
        load_entry_points.cache_clear()  # later tests run without the temporary distribution


def test_bad_plugins_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"plugin module 'no_such_plugin' not found: put the folder .* on PYTHONPATH"):
        load_plugins(["no_such_plugin"])
    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency\n")
    with pytest.raises(PluginError, match=r"plugin module 'broken_plugin' failed to import: No module named "
                                          r"'no_such_dependency'"):
        load_plugins(["broken_plugin"])
    (tmp_path / "clashing_plugin.py").write_text(textwrap.dedent('''
        import dataclasses
        import peftjax

        @peftjax.register_method("lora")
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class MyLora(peftjax.MethodConfig):
            pass
    '''))
    with pytest.raises(PluginError, match=r"'clashing_plugin' failed to import: PeftError: method name 'lora' is "
                                          r"already registered by LoraConfig"):
        load_plugins(["clashing_plugin"])


def test_python_dash_m_peftjax_runs(monkeypatch, capsys):
    """As ``python -m peftjax train --help`` runs it (runpy is what ``-m`` uses), in this process."""
    monkeypatch.setattr(sys, "argv", ["peftjax", "train", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("peftjax", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0 and "--plugin MODULE" in capsys.readouterr().out
