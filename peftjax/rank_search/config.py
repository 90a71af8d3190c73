"""The ``sweep:`` section of a rank-search config, and its checks.

A rank-search file is an experiment config (the same YAML as ``peftjax
train``, with exactly one LoRA method: the template) plus::

    sweep:
      ranks: [1, 2, 4, 8, 16, 32, 64]
      target_sets: [qv, all-linear]      # names, explicit lists, or {name: targets}
      seeds: [0, 1, 2]
      learning_rates: null               # null: optim.learning_rate for every point;
                                         # [3e-4, 1e-3]: tuned, best on select_metric;
                                         # {1: 3e-3, 64: 5e-4}: one per rank;
                                         # {qv: 2e-3, all-linear: 1e-3}: one per target set
      metric: test_accuracy
      select_metric: eval_accuracy       # picks the learning rate when several are tried
      mode: batched                      # or sequential
      max_members: null                  # cap on ranks x rates trained in one program
      searches: [grid]                   # and dylora, adalora, pilot: one comparison
      dylora: {max_rank: null}           # null: the largest swept rank
      adalora: {init_rank: 12, target_rank: 8}   # AdaLoraConfig fields but targets and total_steps
      pilot: {rank: 64, mean_rank: 8}    # allocate mean_rank x modules from a rank-64 pilot

``searches`` other than ``grid`` (``peftjax.rank_search.searches``) train, per
target set and seed, on the same data, steps, optimizer and rates as the grid:
``dylora`` one LoRA at ``max_rank`` from which every swept rank up to it is
evaluated; ``adalora`` one AdaLoRA run; ``pilot`` a LoRA whose per-module
ranks come from the spectra of a rank-``rank`` pilot (the grid's point at that
rank when the grid has it).

Named target sets map to module names per model family (``qv`` is
query/value on BERT, q_proj/v_proj on Llama), so one sweep file reads the same
whatever the model. A target set may also be an explicit list of module names
(named by joining them with ``+``) or a mapping ``{name: targets}``, where
targets take every form ``LoraConfig.targets`` does.

Checks that need only the file run at load time; those that need the model
(a rank above a kernel's min(d, k), a set the family does not know) run when
the model is built, before any training. Every problem is a ``SweepError``
(a ``ConfigError``) naming the ``sweep.`` key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from flax import nnx

from peftjax.config import ConfigError, ExperimentConfig, load_config
from peftjax.core.inject import apply, delete_adapter, iter_wrappers
from peftjax.core.paths import ALL_LINEAR, Targets, validate_targets
from peftjax.data import check_data_files
from peftjax.errors import PeftError
from peftjax.methods.base import config_from_dict
from peftjax.methods.lora import LoraConfig
from peftjax.rank_search.batched import ADAFACTOR_MIN_DIM_TO_FACTOR

SWEEP_KEY = "sweep"
MODES = ("batched", "sequential")

# BERT-style encoders (BERT, RoBERTa, ViT share the names): the attention block's
# output projection is attention.output.dense; the MLP is intermediate.dense and
# the layer's own output.dense, which a plain name "output.dense" cannot tell
# from the attention one, hence the regexes.
_BERT_SETS: dict[str, Targets] = {
    "qv": ("query", "value"),
    "qkv": ("query", "key", "value"),
    "qkvo": ("query", "key", "value", "attention.output.dense"),
    "mlp": r".*\.layer\.\d+\.(intermediate|output)\.dense",
    "attention-mlp": r".*\.layer\.\d+\.(attention\.(self|attention)\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)",
    ALL_LINEAR: ALL_LINEAR,
}
_LLAMA_SETS: dict[str, Targets] = {
    "qv": ("q_proj", "v_proj"),
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "attention-mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ALL_LINEAR: ALL_LINEAR,
}
TARGET_SETS: dict[str, dict[str, Targets]] = {
    "bert": _BERT_SETS,
    "roberta": _BERT_SETS,
    "vit": _BERT_SETS,
    "llama": _LLAMA_SETS,
    "mistral": _LLAMA_SETS,
    "qwen2": _LLAMA_SETS,
}
# A family we do not know still has "all-linear".
_FALLBACK_SETS: dict[str, Targets] = {ALL_LINEAR: ALL_LINEAR}

# What a run reports per split, and which way is better.
METRIC_KINDS = {"accuracy": True, "loss": False, "perplexity": False}  # perplexity: language models only


class SweepError(ConfigError):
    """A rank-search config that cannot run; the message names the ``sweep.`` key and the fix."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of the sweep."""

    target_set: str
    rank: int
    seed: int
    learning_rate: float

    @property
    def name(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.target_set)
        return f"{safe}-r{self.rank}-s{self.seed}-lr{self.learning_rate:g}"

    @classmethod
    def of(cls, row: dict[str, Any]) -> Point:
        return cls(row["target_set"], row["rank"], row["seed"], row["learning_rate"])


@dataclasses.dataclass(frozen=True)
class TargetSet:
    """A named choice of modules to adapt. ``targets`` is None for a set named
    by the family table, resolved against the model by :func:`resolve_target_sets`."""

    name: str
    targets: Targets | None = None


def _target_set(entry: Any, index: int) -> TargetSet:
    key = f"sweep.target_sets.{index}"
    if isinstance(entry, str):
        return TargetSet(entry)
    if isinstance(entry, (list, tuple)):
        try:
            targets = validate_targets(list(entry), key)
        except ValueError as err:
            raise SweepError(str(err).removeprefix(f"{key} ").removeprefix(f"{key}"), key) from None
        return TargetSet("+".join(targets), targets)
    if isinstance(entry, Mapping) and len(entry) == 1:
        ((name, targets),) = entry.items()
        try:
            targets = validate_targets(targets if isinstance(targets, str) else list(targets), key)
        except (ValueError, TypeError) as err:
            raise SweepError(f"{name!r}: {err}", key) from None
        return TargetSet(str(name), targets)
    raise SweepError(
        f"{entry!r} is not a target set: give a known name (qv, qkvo, mlp, all-linear, ...), a list of module "
        "names, or a one-entry mapping {name: targets}",
        key,
    )


SEARCHES = ("grid", "dylora", "adalora", "pilot")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DyLoraSearch:
    """DyLoRA: one LoRA at ``max_rank`` (null: the largest swept rank) trained on truncations
    to b, drawn each step uniformly from ``min_rank``..``max_rank``."""

    max_rank: int | None = None
    min_rank: int = 1

    def __post_init__(self) -> None:
        if self.max_rank is not None and not _positive_int(self.max_rank):
            raise SweepError(f"must be a positive integer (the largest rank trained), got {self.max_rank!r}",
                             "sweep.dylora.max_rank")
        if not _positive_int(self.min_rank) or (self.max_rank is not None and self.min_rank > self.max_rank):
            raise SweepError(f"must be a positive integer at most max_rank, got {self.min_rank!r}",
                             "sweep.dylora.min_rank")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PilotSearch:
    """Per-module ranks from a pilot: ``mean_rank`` x modules allocated by the pilot's
    Delta W spectra (``peftjax.rank_search.allocation``), from a rank-``rank`` pilot."""

    rank: int = 64
    mean_rank: float = 8.0

    def __post_init__(self) -> None:
        if not _positive_int(self.rank):
            raise SweepError(f"must be a positive integer, got {self.rank!r}", "sweep.pilot.rank")
        if not isinstance(self.mean_rank, (int, float)) or isinstance(self.mean_rank, bool) or not (
            1 <= self.mean_rank <= self.rank
        ):
            raise SweepError(f"must be a number from 1 to pilot.rank={self.rank} (every module keeps at least rank "
                             f"1 and at most the pilot's), got {self.mean_rank!r}", "sweep.pilot.mean_rank")


def _sub_config(cls, data: Any, key: str):
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise SweepError(f"must be a mapping, got {type(data).__name__}", key)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise SweepError(f"unknown key(s) {unknown}; valid keys: {fields}", key)
    return cls(**data)


def adalora_spec(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """``sweep.adalora`` checked by building an AdaLoraConfig from it (total_steps and
    targets come from the run and the target set)."""
    from peftjax.methods.adalora import AdaLoraConfig

    spec = dict(data or {})
    fixed = sorted(set(spec) & {"targets", "total_steps", "type"})
    if fixed:
        raise SweepError(f"{fixed} come from the target sets and the run's length; remove them", "sweep.adalora")
    try:
        AdaLoraConfig(targets=("probe",), total_steps=10**6, **spec)
    except TypeError as err:
        raise SweepError(f"{err}; its keys are AdaLoraConfig's fields", "sweep.adalora") from None
    except PeftError as err:
        raise SweepError(str(err), "sweep.adalora") from None
    return spec


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """What the rank search varies and how it is judged (see the module docstring)."""

    ranks: tuple[int, ...]
    target_sets: tuple[TargetSet, ...] = (TargetSet("qv"),)
    seeds: tuple[int, ...] = (0,)
    learning_rates: tuple[float, ...] | Mapping[int, float] | None = None
    metric: str = "test_accuracy"
    select_metric: str = "eval_accuracy"
    mode: Literal["batched", "sequential"] = "batched"
    max_members: int | None = None
    searches: tuple[str, ...] = ("grid",)
    dylora: DyLoraSearch = DyLoraSearch()
    adalora: Mapping[str, Any] | None = None
    pilot: PilotSearch = PilotSearch()

    def __post_init__(self) -> None:
        ranks = self.ranks
        if not isinstance(ranks, (list, tuple)) or not ranks:
            raise SweepError("is empty: list at least one LoRA rank, e.g. [1, 2, 4, 8]", "sweep.ranks")
        bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or r < 1]
        if bad:
            raise SweepError(f"ranks must be positive integers, got {bad}", "sweep.ranks")
        if len(set(ranks)) != len(ranks):
            raise SweepError(f"{list(ranks)} lists a rank twice; give each once", "sweep.ranks")
        object.__setattr__(self, "ranks", tuple(sorted(ranks)))
        if not self.target_sets:
            raise SweepError("is empty: name at least one target set, e.g. [qv]", "sweep.target_sets")
        names = [t.name for t in self.target_sets]
        if len(set(names)) != len(names):
            raise SweepError(f"{names} names a target set twice", "sweep.target_sets")
        seeds = self.seeds
        if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise SweepError(f"must be a non-empty list of non-negative integers, got {seeds!r}", "sweep.seeds")
        if len(set(seeds)) != len(seeds):
            raise SweepError(f"{list(seeds)} lists a seed twice", "sweep.seeds")
        self._check_learning_rates()
        if self.mode not in MODES:
            raise SweepError(f"{self.mode!r} is not a mode; use one of {list(MODES)}", "sweep.mode")
        if self.max_members is not None and (not isinstance(self.max_members, int) or self.max_members < 1):
            raise SweepError(f"must be a positive integer or null, got {self.max_members!r}", "sweep.max_members")
        searches = self.searches
        if isinstance(searches, str) or not searches or any(s not in SEARCHES for s in searches):
            raise SweepError(f"must list searches among {list(SEARCHES)}, got {searches!r}", "sweep.searches")
        if len(set(searches)) != len(searches):
            raise SweepError(f"{list(searches)} lists a search twice", "sweep.searches")
        object.__setattr__(self, "searches", tuple(searches))
        object.__setattr__(self, "adalora", adalora_spec(self.adalora))
        if self.dylora.max_rank is None:
            object.__setattr__(self, "dylora", dataclasses.replace(self.dylora, max_rank=max(self.ranks)))
        if "dylora" in self.searches and self.dylora.max_rank < min(self.ranks):
            raise SweepError(f"{self.dylora.max_rank} is below every swept rank {list(self.ranks)}: DyLoRA would "
                             "evaluate no rank", "sweep.dylora.max_rank")

    def _check_learning_rates(self) -> None:
        rates = self.learning_rates
        if rates is None:
            return
        key = "sweep.learning_rates"
        if isinstance(rates, Mapping) and rates and all(isinstance(k, str) and not k.isdigit() for k in rates):
            names = [t.name for t in self.target_sets]
            if sorted(rates) != sorted(names):
                raise SweepError(f"a per-target-set mapping needs exactly the target sets {names}, got "
                                 f"{sorted(rates)}", key)
            try:
                values = [float(lr) for lr in rates.values()]
            except (TypeError, ValueError):
                raise SweepError(f"a per-target-set mapping needs numeric rates, got {dict(rates)!r}", key) from None
            object.__setattr__(self, "learning_rates", {name: float(rates[name]) for name in names})
        elif isinstance(rates, Mapping):
            try:
                rates = {int(rank): float(lr) for rank, lr in rates.items()}
            except (TypeError, ValueError):
                detail = f"a per-rank mapping needs integer ranks and numeric rates, got {rates!r}"
                raise SweepError(detail, key) from None
            missing = sorted(set(self.ranks) - set(rates))
            extra = sorted(set(rates) - set(self.ranks))
            if missing or extra:
                raise SweepError(
                    f"a per-rank mapping needs exactly the swept ranks {list(self.ranks)}: missing {missing}, "
                    f"not swept {extra}",
                    key,
                )
            values = list(rates.values())
            object.__setattr__(self, "learning_rates", dict(sorted(rates.items())))
        elif isinstance(rates, (list, tuple)):
            if not rates:
                raise SweepError("is empty: give rates to tune over, a {rank: rate} mapping, or null", key)
            try:
                values = [float(lr) for lr in rates]
            except (TypeError, ValueError):
                raise SweepError(f"rates must be numbers, got {list(rates)}", key) from None
            object.__setattr__(self, "learning_rates", tuple(values))
        else:
            raise SweepError(f"must be a list of rates, a {{rank: rate}} mapping or null, got {rates!r}", key)
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise SweepError(f"rates must be positive and finite, got {values}", key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SweepConfig:
        if data is None:
            raise SweepError("a rank-search config needs a 'sweep:' section (ranks, target_sets, seeds, metric, ...)",
                             SWEEP_KEY)
        if not isinstance(data, Mapping):
            raise SweepError(f"must be a mapping, got {type(data).__name__}", SWEEP_KEY)
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f"did you mean {'sweep.' + close[0]!r}?" if close else f"valid keys: {', '.join(fields)}"
                raise SweepError(f"unknown key; {hint}", f"sweep.{key}")
        if "ranks" not in data:
            raise SweepError("is required: the LoRA ranks to try, e.g. [1, 2, 4, 8, 16, 32, 64]", "sweep.ranks")
        values = dict(data)
        for key in ("ranks", "seeds"):
            if isinstance(values.get(key), int):
                values[key] = [values[key]]
            if key in values and isinstance(values[key], list):
                values[key] = tuple(values[key])
        if "dylora" in values:
            values["dylora"] = _sub_config(DyLoraSearch, values["dylora"], "sweep.dylora")
        if "pilot" in values:
            values["pilot"] = _sub_config(PilotSearch, values["pilot"], "sweep.pilot")
        if isinstance(values.get("searches"), list):
            values["searches"] = tuple(values["searches"])
        if "target_sets" in values:
            sets = values["target_sets"]
            sets = [sets] if isinstance(sets, (str, Mapping)) else list(sets or ())
            values["target_sets"] = tuple(_target_set(entry, i) for i, entry in enumerate(sets))
        if isinstance(values.get("learning_rates"), (int, float)):
            values["learning_rates"] = [values["learning_rates"]]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        rates = self.learning_rates
        return {
            "ranks": list(self.ranks),
            "target_sets": [t.name if t.targets is None else {t.name: _plain(t.targets)} for t in self.target_sets],
            "seeds": list(self.seeds),
            "learning_rates": dict(rates) if isinstance(rates, Mapping) else (list(rates) if rates else None),
            "metric": self.metric,
            "select_metric": self.select_metric,
            "mode": self.mode,
            "max_members": self.max_members,
            "searches": list(self.searches),
            # A search's settings only where it runs: a grid sweep's record (and resume check) is the grid's.
            **{name: section for name, section in (("dylora", dataclasses.asdict(self.dylora)),
                                                   ("adalora", dict(self.adalora)),
                                                   ("pilot", dataclasses.asdict(self.pilot))) if name in self.searches},
        }

    @property
    def tunes_learning_rate(self) -> bool:
        """Whether several rates are tried per point (then the best on ``select_metric`` is reported)."""
        return isinstance(self.learning_rates, tuple) and len(self.learning_rates) > 1

    def rates_for(self, rank: int, default: float, target_set: str | None = None) -> tuple[float, ...]:
        """The learning rates rank ``rank`` of ``target_set`` is trained with."""
        rates = self.learning_rates
        if rates is None:
            return (default,)
        if isinstance(rates, Mapping):
            return (rates[target_set],) if target_set in rates else (rates[rank],)
        return tuple(rates)


def _plain(targets: Targets) -> str | list[str]:
    return targets if isinstance(targets, str) else list(targets)


# ----------------------------------------------------------------------------
# Loading, and the checks against the experiment config.
# ----------------------------------------------------------------------------


def template_method(config: ExperimentConfig) -> LoraConfig:
    """The one LoRA method of a rank-search config, validated."""
    specs = config.method_dicts()
    if len(specs) != 1 or specs[0].get("type") != "lora":
        kinds = [spec.get("type") for spec in specs]
        raise SweepError(
            f"a rank search varies one LoRA method; the config's methods are {kinds}. Keep exactly one "
            "'type: lora' entry (its rank and targets are what the sweep varies; alpha, rslora, dropout, "
            "init and also_train are kept)",
            "methods",
        )
    spec = dict(specs[0])
    spec.pop("adapter_name", None)
    method = config_from_dict(spec)
    assert isinstance(method, LoraConfig)
    return method


def available_metrics(config: ExperimentConfig) -> list[str]:
    """The metric names a run of ``config`` produces: accuracy and loss per evaluated split,
    and perplexity for a language model."""
    splits = [split for split, name in (("eval", config.data.eval_split), ("test", config.data.test_split)) if name]
    kinds = [kind for kind in METRIC_KINDS if kind != "perplexity" or config.data.task == "causal_lm"]
    return [f"{split}_{kind}" for split in splits for kind in kinds]


def higher_is_better(metric: str) -> bool:
    return METRIC_KINDS[metric.rsplit("_", 1)[-1]]


def check_metrics(config: ExperimentConfig, sweep: SweepConfig) -> None:
    """``sweep.metric`` (and ``select_metric`` when rates are tuned) must be produced by the task."""
    produced = available_metrics(config)
    wanted = [("sweep.metric", sweep.metric)]
    if sweep.tunes_learning_rate:
        wanted.append(("sweep.select_metric", sweep.select_metric))
    for key, name in wanted:
        if name not in produced:
            close = difflib.get_close_matches(name, produced, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SweepError(
                f"{name!r} is not produced by this task; it produces {produced} (an eval_* or test_* metric "
                f"needs data.eval_split or data.test_split set).{hint}",
                key,
            )


def load_rank_search(path: str | pathlib.Path, overrides: Iterable[str] = ()) -> tuple[ExperimentConfig, SweepConfig]:
    """Read a rank-search file: the experiment config and its ``sweep`` section.

    Overrides apply to both (``sweep.ranks=[1,2]``, ``train.steps=10``).
    """
    sections: dict[str, Any] = {SWEEP_KEY: None}
    config = load_config(path, overrides, method_validator=config_from_dict, split_sections=sections)
    check_data_files(config.data)
    if config.strategies:
        raise SweepError("rank search trains LoRA at many ranks on its own; remove the strategies", "strategies")
    sweep = SweepConfig.from_dict(sections[SWEEP_KEY])
    template_method(config)
    check_metrics(config, sweep)
    check_optimizer(config, sweep)
    return config, sweep


def check_optimizer(config: ExperimentConfig, sweep: SweepConfig) -> None:
    """Batched members must equal their separate runs. Adafactor factors the second
    moment of an array whose two largest axes are both at least 128: a member of rank
    r < 128 padded to R >= 128 would be factored where its own run is not."""
    large = [r for r in sweep.ranks if r >= ADAFACTOR_MIN_DIM_TO_FACTOR]
    if sweep.mode == "batched" and config.optim.name == "adafactor" and large and len(sweep.ranks) > 1:
        raise SweepError(
            f"Adafactor factors the second moment of arrays with two axes of at least "
            f"{ADAFACTOR_MIN_DIM_TO_FACTOR}, so batched members padded to rank {max(sweep.ranks)} would not equal "
            f"their separate runs (ranks {large} are that large). Use sweep.mode: sequential, ranks below "
            f"{ADAFACTOR_MIN_DIM_TO_FACTOR}, or another optim.name",
            "sweep.mode",
        )


def model_family(model: nnx.Module) -> str | None:
    """The checkpoint family (``model_type``) of one of peftjax's models, if it says."""
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_target_sets(sweep: SweepConfig, model: nnx.Module) -> list[TargetSet]:
    """Every target set with its module targets for this model's family."""
    family = model_family(model)
    table = TARGET_SETS.get(family, _FALLBACK_SETS)
    resolved = []
    for index, target_set in enumerate(sweep.target_sets):
        if target_set.targets is not None:
            resolved.append(target_set)
            continue
        if target_set.name not in table:
            close = difflib.get_close_matches(target_set.name, list(table), n=2)
            hint = f" Did you mean {close}?" if close else ""
            raise SweepError(
                f"unknown target set {target_set.name!r} for a {family or type(model).__name__} model.{hint} "
                f"Known sets: {sorted(table)}; or give an explicit list of module names, or {{name: targets}}",
                f"sweep.target_sets.{index}",
            )
        resolved.append(TargetSet(target_set.name, table[target_set.name]))
    return resolved


@dataclasses.dataclass(frozen=True)
class AdaptedModule:
    """A module a target set adapts: its path, kernel shape and matrix sizes (d in, k out)."""

    path: str
    kernel_shape: tuple[int, ...]
    fan_in: int
    fan_out: int

    @property
    def max_rank(self) -> int:
        return min(self.fan_in, self.fan_out)


def adapted_modules(model: nnx.Module, template: LoraConfig, target_set: TargetSet, index: int) -> list[AdaptedModule]:
    """The modules ``target_set`` selects on ``model`` (applied at rank 1, read, removed again)."""
    name = "rank-search-probe"
    try:
        apply(model, dataclasses.replace(template, rank=1, targets=target_set.targets), adapter_name=name)
    except PeftError as err:
        raise SweepError(f"target set {target_set.name!r}: {err}", f"sweep.target_sets.{index}") from None
    try:
        return [
            AdaptedModule(path, tuple(w.base_layer.kernel.shape), w.layout.fan_in, w.layout.fan_out)
            for path, w in iter_wrappers(model)
            if w.adapter_name == name
        ]
    finally:
        delete_adapter(model, name)


def check_ranks(ranks: Sequence[int], modules: Sequence[AdaptedModule], target_set: TargetSet) -> None:
    """Every rank must be at most min(d, k) of every adapted kernel (a larger one adds nothing)."""
    worst = min(modules, key=lambda m: m.max_rank)
    too_large = [r for r in ranks if r > worst.max_rank]
    if too_large:
        raise SweepError(
            f"rank(s) {too_large} exceed min(d, k) = {worst.max_rank} of {worst.path} (kernel shape "
            f"{worst.kernel_shape}: d={worst.fan_in} in, k={worst.fan_out} out), adapted by target set "
            f"{target_set.name!r}; a LoRA update of that module has rank at most {worst.max_rank}. Drop those "
            f"ranks or narrow the target set",
            "sweep.ranks",
        )
