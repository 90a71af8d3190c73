"""The extension API of training strategies: what one is, when its hooks run, the registry.

A training strategy changes how a run trains rather than what the model
computes (that is a method's job): which parameters train and when, extra
loss terms and their state, extra data streams, what happens between steps.
A strategy is one file in ``peftjax/strategies/`` holding a config: a frozen,
keyword-only dataclass subclassing :class:`Strategy`, registered with
``@register_strategy("name")``. Its fields are checked like every config
section (:mod:`peftjax.schema`); its methods are the hooks. An experiment
lists strategies under ``strategies:`` (``{type: name, ...fields}``); the
runner calls every hook of every listed strategy, in list order, and knows
none of them by name. Every hook has a default that does nothing.

Set-up, once per run, on the host:

* ``setup(model, *, rngs)``: an ``nnx.Module`` of the strategy's own (a domain
  classifier, anchor weights, running statistics), attached to the model at
  ``model.training_strategies[name]`` after the methods are applied. Its
  parameters train under the strategy's label rules and, with the rest of
  what changes, go into checkpoints; its non-parameter Variables are state
  the step carries (``TrainState.rest``). Plain ``nnx.Param`` (not
  ``AdapterParam``) keeps it out of adapter files.
* ``streams()``: extra named data streams, ``{name: DataConfig}`` (target-domain
  text): each step gets one batch of each beside the main stream ``train``,
  in an order fixed by the seed; positions are checkpointed.
* ``optimizer(tx, info)``: wraps the labelled optimizer
  (``optax.contrib.reduce_on_plateau``, a schedule over all labels); the step
  passes ``value=loss`` to its ``update``.

Labels, once per stage, on the host:

* ``stage_starts(info)``: the optimizer steps after which this strategy's
  label set changes (gradual unfreezing); the step is compiled once per stage.
* ``label_rules(model, stage)``: rules ahead of every method's
  (``peftjax.core.labels``), so a strategy can freeze an adapter or give a
  layer group its own label. ``stage`` counts this strategy's starts passed.
* ``lr_multipliers(stage)``: ``{label: factor}`` for labels the rules give.
* ``rate_groups(model, stage)``: ``(path regex, group name, factor)``: what
  trains in a group does so under a label of its own, ``<label>@<group>``,
  at ``factor`` times its label's rate (discriminative rates), with
  optimizer state of its own that starts when the group starts training
  (gradual unfreezing: Adam's step count starts there too).

A parameter that starts training at a stage gets its optimizer state then,
not before; a frozen one is bitwise unchanged (``TrainState.relabel``).

In the compiled step:

* ``loss(ctx)``: a term added to the task's loss, or ``(term, metrics)``, or
  None. ``ctx`` (:class:`StepContext`) runs the model once per stream and
  step however many terms ask, and gives the pooled features of any stream.

Boundaries, on the host (``run`` is a :class:`peftjax.train.session.Run`):
``on_start(run)`` (after the state is built or restored: re-apply what the
memory records), ``on_step(run, metrics)``, ``on_epoch(run, epoch)`` (the main
stream finished ``epoch``), ``on_eval(run, scores)``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import optax
from flax import nnx

from peftjax.config import DataConfig
from peftjax.core.labels import PeftOptimizer, RateGroup, make_optimizer
from peftjax.core.layer_groups import STRATEGY_MODULES
from peftjax.core.registry import registrar
from peftjax.errors import PeftError
from peftjax.plugins import load_entry_points
from peftjax.methods.base import LabelRule
from peftjax.models.common import ModelOutput
from peftjax.schema import ConfigError, Section
from peftjax.train.session import MAIN, Run, RunInfo
from peftjax.train.tasks import LogitsLoss, logits_loss, model_output, pooled_features

_REGISTRY: dict[str, type[Strategy]] = {}


# Class decorator that registers a ``Strategy`` under ``name``, its YAML ``type``: ``@register_strategy(name)``.
register_strategy = registrar(_REGISTRY, "strategy", lambda: Strategy)


def registered_strategies() -> dict[str, type[Strategy]]:
    """Registered strategy names and their config classes."""
    return dict(_REGISTRY)


def strategy_from_dict(data: Mapping[str, Any]) -> Strategy:
    """A strategy config from ``{"type": name, **fields}``; errors are ConfigErrors
    whose key is relative to the entry (``layers``, ``type``)."""
    fields = dict(data)
    name = fields.pop("type", None)
    if name not in _REGISTRY:
        load_entry_points()  # an installed plugin's strategy
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown strategy {name!r}; {hint}registered: {sorted(_REGISTRY)}", "type")
    return _REGISTRY[name].from_dict(fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy(Section):
    """Base of every training strategy's config; its methods are the hooks (see the module docstring)."""

    strategy: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.strategy, **super().to_dict()}

    def setup(self, model: nnx.Module, *, rngs: nnx.Rngs) -> nnx.Module | None:
        return None

    def streams(self) -> Mapping[str, DataConfig]:
        return {}

    def optimizer(self, tx: PeftOptimizer, info: RunInfo) -> optax.GradientTransformation:
        return tx

    def stage_starts(self, info: RunInfo) -> tuple[int, ...]:
        return ()

    def label_rules(self, model: nnx.Module, stage: int) -> list[LabelRule]:
        return []

    def lr_multipliers(self, stage: int) -> Mapping[str, float]:
        return {}

    def rate_groups(self, model: nnx.Module, stage: int) -> list[RateGroup]:
        return []

    def loss(self, ctx: StepContext) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]] | None:
        return None

    def on_start(self, run: Run) -> None:
        pass

    def on_step(self, run: Run, metrics: Mapping[str, jax.Array]) -> None:
        pass

    def on_epoch(self, run: Run, epoch: int) -> None:
        pass

    def on_eval(self, run: Run, scores: Mapping[str, float]) -> None:
        pass


class StepContext:
    """What a loss term sees inside the compiled step.

    ``model`` is the step's model: gradients flow to its trainable
    parameters, and a strategy's own module is ``ctx.module(self)``, where a
    term may write non-parameter Variables that the next step sees.
    ``batches`` holds one batch per stream (``train`` and the strategies'
    streams). The model runs once per stream per step, when first asked.
    ``info`` is the run's :class:`RunInfo` (None outside a run): a term on a
    schedule over the run divides a step counter of its module by
    ``info.total_steps``.
    """

    def __init__(self, model: nnx.Module, batches: Mapping[str, Any], task_loss: LogitsLoss,
                 info: RunInfo | None = None) -> None:
        self.model = model
        self.batches = batches
        self.info = info
        self._task_loss = task_loss
        self._outputs: dict[str, ModelOutput] = {}

    def outputs(self, stream: str = MAIN) -> ModelOutput:
        """The model's output on this step's batch of ``stream``."""
        if stream not in self._outputs:
            self._outputs[stream] = model_output(self.model, self.batches[stream])
        return self._outputs[stream]

    def features(self, stream: str = MAIN) -> jax.Array:
        """Pooled features of ``stream``'s batch, (batch, hidden) (see ``tasks.pooled_features``)."""
        return pooled_features(self.outputs(stream), self.batches[stream])

    def task_loss(self, stream: str = MAIN) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The task's weighted mean loss on ``stream``'s batch, and its sums."""
        return self._task_loss(self.outputs(stream).logits, self.batches[stream])

    def module(self, strategy: Strategy) -> nnx.Module:
        """The module ``strategy.setup`` returned."""
        return getattr(self.model, STRATEGY_MODULES)[strategy.strategy]


def step_loss(task: str, strategies: Sequence[Strategy], info: RunInfo | None = None):
    """``f(model, batches) -> (loss, stats)``: the task's loss on the main stream
    plus every strategy's term; ``stats["terms"]`` holds the terms' values and
    metrics by strategy when there are any."""
    task_loss = logits_loss(task)

    def loss(model: nnx.Module, batches: Mapping[str, Any]):
        ctx = StepContext(model, batches, task_loss, info)
        total, stats = ctx.task_loss()
        terms = {}
        for strategy in strategies:
            term = strategy.loss(ctx)
            if term is None:
                continue
            value, metrics = term if isinstance(term, tuple) else (term, {})
            total = total + value
            terms[strategy.strategy] = {"loss": value, **metrics}
        return total, ({**stats, "terms": terms} if terms else stats)

    return loss


def build_strategies(specs: Sequence[Mapping[str, Any]]) -> tuple[Strategy, ...]:
    """Strategy configs from ``strategies:`` entries; errors name ``strategies.N``."""
    strategies = []
    for index, spec in enumerate(specs):
        try:
            strategy = strategy_from_dict(spec)
        except ConfigError as error:
            raise error.prefixed(f"strategies.{index}.") from None
        if any(type(other) is type(strategy) for other in strategies):
            raise ConfigError(f"{strategy.strategy} is listed twice; merge the two entries", f"strategies.{index}")
        strategies.append(strategy)
    return tuple(strategies)


def attach_modules(model: nnx.Module, strategies: Sequence[Strategy], *, seed: int) -> None:
    """Puts each strategy's ``setup`` module at ``model.training_strategies[name]``."""
    modules = {}
    for index, strategy in enumerate(strategies):
        module = strategy.setup(model, rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(seed), index)))
        if module is not None:
            modules[strategy.strategy] = module
    if modules:
        setattr(model, STRATEGY_MODULES, nnx.Dict(modules))


def stages_at(starts: Sequence[Sequence[int]], done: int) -> tuple[int, ...]:
    """Each strategy's stage after ``done`` optimizer steps: how many of its starts passed."""
    return tuple(sum(1 for start in own if start <= done) for own in starts)


def stage_starts(strategies: Sequence[Strategy], info: RunInfo) -> tuple[tuple[int, ...], ...]:
    """Every strategy's ``stage_starts``, checked: increasing, within the run."""
    found = []
    for index, strategy in enumerate(strategies):
        starts = tuple(int(start) for start in strategy.stage_starts(info))
        if list(starts) != sorted(set(starts)) or any(not 0 < s < info.total_steps for s in starts):
            raise PeftError(f"strategies.{index} ({strategy.strategy}): stage starts {list(starts)} must increase "
                            f"strictly and lie between 0 and the run's {info.total_steps} steps")
        found.append(starts)
    return tuple(found)


def stage_optimizer(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    strategies: Sequence[Strategy],
    stages: Sequence[int],
    info: RunInfo,
) -> PeftOptimizer:
    """The optimizer of one stage: ``tx`` partitioned by the labels the methods and
    the strategies' rules give (strategies' first), split by their rate groups,
    with their multipliers, then wrapped by each strategy's ``optimizer`` hook."""
    rules = [rule for strategy, stage in zip(strategies, stages) for rule in strategy.label_rules(model, stage)]
    multipliers = {k: v for s, stage in zip(strategies, stages) for k, v in s.lr_multipliers(stage).items()}
    groups = [group for strategy, stage in zip(strategies, stages) for group in strategy.rate_groups(model, stage)]
    optimizer = make_optimizer(model, tx, overrides=rules, lr_multipliers=multipliers or None, rate_groups=groups)
    for strategy in strategies:
        optimizer = optimizer.carrying(strategy.optimizer(optimizer, info))
    if strategies and not optimizer.trainable_paths:
        names = [strategy.strategy for strategy in strategies]
        raise PeftError(f"with strategies {names} at stages {list(stages)} no parameter trains; "
                        "freeze less, or apply a method whose parameters the strategies leave trainable")
    return optimizer
