"""peftjax: parameter-efficient fine-tuning for Flax NNX."""

from peftjax.arithmetic import combine_adapters
from peftjax.core.counting import ParamCount, count_params, summary
from peftjax.core.adapter_io import load_adapter, save_adapter
from peftjax.core.inject import (
    applied_methods,
    apply,
    delete_adapter,
    disable_adapters,
    iter_wrappers,
    merge,
    set_active_adapters,
    unmerge,
)
from peftjax.core.labels import PeftOptimizer, make_optimizer, param_labels
from peftjax.core.layer_groups import LayerGroup, layer_groups
from peftjax.errors import (
    AdapterError,
    BenchError,
    CheckpointError,
    ConfigError,
    DataError,
    ModelLoadError,
    PeftError,
    Preempted,
    RunError,
)
from peftjax.methods import import_all, registered_methods
from peftjax.methods.base import FROZEN, AdapterWrapper, MethodConfig, config_from_dict, register_method
from peftjax.strategies import Strategy, register_strategy, registered_strategies
from peftjax.train.state import TrainState, TrainStep, make_train_step
from peftjax.variables import AdapterBuffer, AdapterParam

__all__ = [
    "FROZEN",
    "AdapterBuffer",
    "AdapterError",
    "AdapterParam",
    "AdapterWrapper",
    "BenchError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LayerGroup",
    "MethodConfig",
    "ModelLoadError",
    "ParamCount",
    "PeftError",
    "PeftOptimizer",
    "Preempted",
    "RunError",
    "Strategy",
    "TrainState",
    "TrainStep",
    "applied_methods",
    "apply",
    "combine_adapters",
    "config_from_dict",
    "count_params",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "save_adapter",
    "set_active_adapters",
    "iter_wrappers",
    "layer_groups",
    "make_optimizer",
    "make_train_step",
    "merge",
    "param_labels",
    "register_method",
    "register_strategy",
    "registered_methods",
    "registered_strategies",
    "summary",
    "unmerge",
]

import_all()

# Every registered method's config is exported under its class name
# (peftjax.LoraConfig, ...), so a new method file needs no edit here.
for _config in registered_methods().values():
    globals()[_config.__name__] = _config
    __all__.append(_config.__name__)
