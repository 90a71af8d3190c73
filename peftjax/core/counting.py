"""Parameter counts, per method and per block, in the form HF PEFT users know."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple

from flax import nnx

from peftjax.core.inject import iter_wrappers
from peftjax.core.labels import param_labels
from peftjax.core.new_head import new_head
from peftjax.core.paths import dotted
from peftjax.methods.base import FROZEN


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def line(self) -> str:
        """The one line HF PEFT's ``print_trainable_parameters`` prints."""
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


# A module that stores parameters in another form (QLoRA's 4-bit kernels) names
# them in a ``logical_params`` attribute, ``{name: number of scalars}``: they count
# as the parameters they stand for, under ``<module path>.<name>``, and never train.
LOGICAL_PARAMS_ATTR = "logical_params"


def _param_sizes(model: nnx.Module) -> dict[str, int]:
    return {dotted(p): v.size for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def _logical_sizes(model: nnx.Module) -> dict[str, int]:
    """Frozen parameters stored in another form, by the dotted path they stand for."""
    return {
        dotted((*path, name)): size
        for path, module in nnx.iter_modules(model)
        for name, size in getattr(module, LOGICAL_PARAMS_ATTR, {}).items()
    }


def count_params(model: nnx.Module, labels: dict[str, str] | None = None) -> ParamCount:
    """Trainable and total parameter counts (adapters included in the total).

    ``labels`` defaults to ``param_labels(model)``; pass an optimizer's
    ``labels`` to count what that optimizer trains.
    """
    labels = param_labels(model) if labels is None else labels
    sizes = _param_sizes(model)
    total = sum(sizes.values()) + sum(_logical_sizes(model).values())
    return ParamCount(sum(n for p, n in sizes.items() if labels[p] != FROZEN), total)


def _block(path: str) -> str:
    """``bert.encoder.layer.3.attention.self.query.kernel`` -> ``bert.encoder.layer.*``:
    the owning module's path up to its first list index, else its first two parts."""
    module = ".".join(part for part in path.split(".")[:-1] if part != "base") or path
    match = re.match(r"^(.*?)\.\d+(\.|$)", module)
    return f"{match.group(1)}.*" if match else ".".join(module.split(".")[:2])


def summary(model: nnx.Module, labels: dict[str, str] | None = None) -> str:
    """A table of trainable and total parameters per adapter and per block,
    ending with the HF PEFT line. Returned as text (print it)."""
    labels = param_labels(model) if labels is None else labels
    sizes = _param_sizes(model)
    by_block: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, n in sizes.items():
        row = by_block[_block(path)]
        row[0] += n if labels[path] != FROZEN else 0
        row[1] += n
    for path, n in _logical_sizes(model).items():
        by_block[_block(path)][1] += n
    by_adapter: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, wrapper in iter_wrappers(model):
        key = f"{wrapper.adapter_name} ({type(wrapper).__name__})"
        own = {p: n for p, n in sizes.items() if p.startswith(path + ".") and not p.startswith(path + ".base.")}
        by_adapter[key][0] += sum(n for p, n in own.items() if labels[p] != FROZEN)
        by_adapter[key][1] += 1
    width = max([len(k) for k in [*by_block, *by_adapter]] + [20])
    lines = [f"{'block':<{width}} {'trainable':>14} {'total':>14}"]
    lines += [f"{k:<{width}} {t:>14,} {n:>14,}" for k, (t, n) in by_block.items()]
    if by_adapter:
        lines += ["", f"{'adapter (wrapper)':<{width}} {'trainable':>14} {'modules':>14}"]
        lines += [f"{k:<{width}} {t:>14,} {n:>14,}" for k, (t, n) in by_adapter.items()]
    head = new_head(model)
    if head is not None:
        present = [p for p in head.paths if p in sizes]
        trains = [p for p in present if labels[p] != FROZEN]
        state = "trains" if trains else "frozen"
        lines += ["", f"new head (not in the checkpoint, {state}): {', '.join(present)} "
                  f"({sum(sizes[p] for p in present):,} params"
                  + ("; freeze_new_head=True freezes it)" if trains else ")")]
    lines += ["", count_params(model, labels).line()]
    return "\n".join(lines)
