"""Freezing by optax masks: label every parameter, then partition the optimizer.

Labels come from an ordered list of rules, first match wins, and every
parameter must be covered. A rule is ``(matcher, label)`` where the matcher is
a regex on the dotted parameter path (full match) or a Variable type. The
rules in force, in order:

0. the ``overrides`` passed by the caller (a training strategy's freezing or
   layer groups), which win over every method's own rules;
1. the ``rules`` passed by the caller;
2. each applied method's own rules (``also_train`` patterns, LoRA+'s B label,
   BitFit's biases, ...), in the order the methods were applied;
3. a new head (parameters ``from_pretrained`` initialised because the
   checkpoint lacked them) -> ``"new_head"``, unless it was loaded with
   ``freeze_new_head=True`` (see ``peftjax.core.new_head``);
4. ``AdapterParam -> "adapter"``;
5. ``nnx.Param -> "frozen"`` unless the caller passed ``rules`` (then an
   uncovered parameter is an error naming it).

Labels other than ``"frozen"`` train. ``make_optimizer`` sends ``"frozen"`` to
``optax.set_to_zero()`` and every other label to the given transformation
(optionally with a per-label learning-rate multiplier), through
``optax.partition``. More groups (a head with its own rate, layer groups for
discriminative rates) are more labels, not more machinery: ``rate_groups``
split a trainable label by layer group (``<label>@<group>``), each part with
its own factor and its own optimizer state. The labels also decide which
batch norms keep their running statistics fixed (``peftjax.core.batch_stats``).

Partitioning gives every label its own state, step counts included, so a
label that first trains at a later stage of a run would start a schedule
inside it from the beginning. ``scheduled(update, schedule, max_grad_norm)``
keeps what belongs to the whole optimizer out of the labels: the gradients
are clipped by their global norm before the labels split them, and the
learning rate follows one step count for every label after.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import optax
from flax import nnx

from peftjax.core import new_head
from peftjax.core.batch_stats import fixed_batch_norms
from peftjax.core.inject import applied_methods, iter_wrappers
from peftjax.core.paths import dotted
from peftjax.errors import PeftError
from peftjax.methods.base import FROZEN, LabelRule
from peftjax.variables import AdapterParam


def label_rules(
    model: nnx.Module, rules: Sequence[LabelRule] | None = None, *, overrides: Sequence[LabelRule] = ()
) -> list[LabelRule]:
    """The ordered rules in force for ``model`` (see the module docstring)."""
    method_rules = [rule for _, config in applied_methods(model) for rule in config.label_rules(model)]
    defaults: list[LabelRule] = [*new_head.label_rule(model), (AdapterParam, "adapter")]
    if rules is None:
        defaults.append((nnx.Param, FROZEN))
    return [*overrides, *(rules or ()), *method_rules, *defaults]


def _rule_matches(matcher: str | type, path: str, variable: nnx.Variable) -> bool:
    if isinstance(matcher, str):
        return re.fullmatch(matcher, path) is not None
    if isinstance(matcher, type):
        return isinstance(variable, matcher)
    raise PeftError(f"a label rule's matcher must be a path regex or a Variable type, got {matcher!r}")


def param_labels(
    model: nnx.Module,
    rules: Sequence[LabelRule] | None = None,
    *,
    overrides: Sequence[LabelRule] = (),
    freeze_inactive: bool = True,
) -> dict[str, str]:
    """``{dotted parameter path: label}`` for every ``nnx.Param`` in ``model``.

    ``overrides`` come before every other rule and, unlike ``rules``, keep the
    catch-all that freezes what nothing else covers. ``freeze_inactive=False``
    labels inactive adapters as if they were active (what an adapter file must
    hold, since loading re-creates every adapter). Raises ``PeftError`` naming
    the first parameter no rule covers.
    """
    in_force = label_rules(model, rules, overrides=overrides)
    # An inactive adapter's own parameters do not train, whatever the rules say.
    inactive = [p + "." for p, w in iter_wrappers(model) if not w.active] if freeze_inactive else []
    labels = {}
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Param):
            continue
        name = dotted(path)
        if any(name.startswith(p) and not name.startswith(p + "base.") for p in inactive):
            labels[name] = FROZEN
            continue
        label = next((lbl for m, lbl in in_force if _rule_matches(m, name, variable)), None)
        if label is None:
            raise PeftError(
                f"parameter {name} ({type(variable).__name__}) is covered by no label rule; add a rule "
                f"such as ({name!r}, 'frozen') or a catch-all (nnx.Param, 'frozen')"
            )
        labels[name] = label
    return labels


def _label_tree(labels: Mapping[str, str]):
    """A function from a parameter tree (all of the model or just the trainable
    part) to the matching tree of labels, as ``optax.partition`` wants."""

    def label_of(path, _):
        name = dotted(path)
        try:
            return labels[name]
        except KeyError:
            raise PeftError(f"no label for parameter {name}: was the model changed after make_optimizer?") from None

    def tree(params):
        return jax.tree_util.tree_map_with_path(label_of, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

    return tree


# (path regex, group name, rate factor): see ``make_optimizer``'s ``rate_groups``.
RateGroup = tuple[str, str, float]


def split_by_rate_group(labels: Mapping[str, str], rate_groups: Sequence[RateGroup]) -> tuple[dict[str, str], dict[str, float]]:
    """``labels`` with every trainable parameter that ``rate_groups`` entries match
    relabelled ``<label>@<group>`` (the matching groups' names, joined by ``+``),
    and each new label's factor: the product of the matching entries' factors."""
    compiled = [(re.compile(pattern), name, factor) for pattern, name, factor in rate_groups]
    split, factors = {}, {}
    for path, label in labels.items():
        found = [(name, factor) for pattern, name, factor in compiled if pattern.fullmatch(path)]
        if label == FROZEN or not found:
            split[path] = label
            continue
        names = "+".join(dict.fromkeys(name for name, _ in found))
        split[path] = f"{label}@{names}"
        factors[split[path]] = math.prod(factor for _, factor in found)
    return split, factors


def _clipped_and_scheduled(
    inner: optax.GradientTransformation, schedule: optax.ScalarOrSchedule, max_grad_norm: float | None
) -> optax.GradientTransformationExtraArgs:
    clip = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    return optax.chain(*clip, inner, optax.scale_by_learning_rate(schedule, flip_sign=False))


class ScheduledTransformation(optax.GradientTransformationExtraArgs):
    """``chain(clip_by_global_norm, update, scale_by_learning_rate(schedule))``
    whose parts ``make_optimizer`` places apart: ``update`` (at rate 1) per
    label, the clipping and the schedule once around every label."""

    update_at_unit_rate: optax.GradientTransformation
    schedule: optax.ScalarOrSchedule
    max_grad_norm: float | None

    def around(self, inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        """``inner`` with this optimizer's clipping before it and its schedule after it."""
        return _clipped_and_scheduled(inner, self.schedule, self.max_grad_norm)


def scheduled(
    update: optax.GradientTransformation, schedule: optax.ScalarOrSchedule, *, max_grad_norm: float | None = None
) -> ScheduledTransformation:
    """An optimizer whose learning rate and clipping belong to the whole model:
    ``update`` is the optimizer at rate 1 (``optax.adamw(1.0, ...)``), the rate
    is ``schedule`` (a float or an ``optax.Schedule`` of the optimizer's own step
    count), and gradients are first clipped to a global norm of
    ``max_grad_norm``. Alone it is that chain; ``make_optimizer`` keeps the
    clipping and the schedule out of the labels (see the module docstring)."""
    whole = _clipped_and_scheduled(update, schedule, max_grad_norm)
    result = ScheduledTransformation(whole.init, whole.update)
    result.update_at_unit_rate, result.schedule, result.max_grad_norm = update, schedule, max_grad_norm
    return result


class PeftOptimizer(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformation`` that also carries its labels, so that
    ``TrainState.create`` splits the model exactly where the optimizer does, and
    the batch norms whose running statistics stay fixed (by dotted module path)."""

    labels: dict[str, str]
    fixed_batch_norms: frozenset[str]

    def carrying(self, tx: optax.GradientTransformation) -> PeftOptimizer:
        """``tx`` (a transformation built around this one, e.g. chained after it) with
        this one's labels and batch-norm decision."""
        tx = optax.with_extra_args_support(tx)
        result = PeftOptimizer(tx.init, tx.update)
        result.labels, result.fixed_batch_norms = self.labels, self.fixed_batch_norms
        return result

    @property
    def trainable_paths(self) -> frozenset[str]:
        return frozenset(p for p, label in self.labels.items() if label != FROZEN)


def make_optimizer(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    rules: Sequence[LabelRule] | None = None,
    overrides: Sequence[LabelRule] = (),
    transforms: Mapping[str, optax.GradientTransformation] | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
    rate_groups: Sequence[RateGroup] = (),
    update_frozen_batch_stats: bool = False,
) -> PeftOptimizer:
    """An optimizer that trains only the labelled-trainable parameters.

    Args:
      model: the model after ``peftjax.apply``.
      tx: the transformation for every trainable label without its own; a
        ``scheduled`` one has its clipping and schedule applied once around
        every label instead of inside each.
      rules: label rules placed before the methods' rules (see module doc).
      overrides: label rules placed before everything else, keeping the
        catch-all (a training strategy's).
      transforms: per-label transformations overriding ``tx`` (inside a
        ``scheduled`` one's clipping and schedule, like ``tx``'s own update).
      lr_multipliers: per-label factors on the update (a learning-rate
        multiplier for SGD, Adam and AdamW alike); merged over the methods'
        own (LoRA+).
      rate_groups: ``(path regex, group name, factor)`` entries: a trainable
        parameter that entries match trains under the label
        ``<label>@<group>``, at the product of their factors times its
        label's rate, with optimizer state of its own (Adam's step count
        included). Discriminative learning rates; gradual unfreezing, where
        a group's state must start when the group starts training.
      update_frozen_batch_stats: let batch norms whose parameters are all
        frozen keep updating their running statistics in training (PyTorch's
        behaviour); by default they use and keep them fixed.

    Frozen parameters get ``optax.set_to_zero()``: no optimizer state at all.
    """
    labels = param_labels(model, rules, overrides=overrides)
    # A method's multiplier may name a label no parameter has now (LoRA+ with its
    # adapter inactive): unused. The caller's own must name labels that exist.
    multipliers = {k: v for _, c in applied_methods(model) for k, v in c.lr_multipliers().items()}
    multipliers.update(lr_multipliers or {})
    transforms = dict(transforms or {})
    unknown = sorted((set(transforms) | set(lr_multipliers or {})) - set(labels.values()))
    if unknown:
        raise PeftError(f"transforms/lr_multipliers name labels no parameter has: {unknown}; labels: {sorted(set(labels.values()))}")
    unsplit = labels
    labels, group_factors = split_by_rate_group(labels, rate_groups)
    base_label = {label: unsplit[path] for path, label in labels.items()}
    outer = tx if isinstance(tx, ScheduledTransformation) else None
    per_label = {}
    for label in sorted(set(labels.values()) | {FROZEN}):
        if label == FROZEN:
            per_label[label] = optax.set_to_zero()
            continue
        base = base_label[label]
        chosen = transforms.get(base, outer.update_at_unit_rate if outer else tx)
        factor = multipliers.get(base, 1.0) * group_factors.get(label, 1.0)
        if base in multipliers or factor != 1.0:
            chosen = optax.chain(chosen, optax.scale(factor))
        per_label[label] = chosen
    partition = optax.partition(per_label, _label_tree(labels))
    tx_all = outer.around(partition) if outer else partition
    for adapter_name, config in applied_methods(model):  # what a method does while training (AdaLoRA)
        tx_all = config.wrap_optimizer(tx_all, model, adapter_name, labels)
    tx_all = optax.with_extra_args_support(tx_all)
    optimizer = PeftOptimizer(tx_all.init, tx_all.update)
    optimizer.labels = labels
    optimizer.fixed_batch_norms = fixed_batch_norms(model, labels, update_frozen=update_frozen_batch_stats)
    return optimizer
