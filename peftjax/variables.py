"""Variable types that PEFT methods add to a model.

Trainability comes from a variable's type, never from its name: the label
rules of :mod:`peftjax.labels` send every ``AdapterParam`` to the optimizer
and keep every other ``nnx.Param`` frozen unless a rule says otherwise.
"""

from flax import nnx


class AdapterParam(nnx.Param):
    """A parameter that a PEFT method added and that trains by default."""


class AdapterBuffer(nnx.Variable):
    """State a PEFT method added that never trains (e.g. VeRA's shared random
    projections, QLoRA's quantised base kernel). Not a parameter: it is not
    counted as one and the optimizer never sees it."""


class FixedBuffer(nnx.Variable):
    """Arrays a training strategy holds fixed for a whole run (L2-SP's starting
    point, EWC's Fisher information and anchor). A train state keeps them with
    the frozen parameters: passed to every step without being returned or
    copied, never written to checkpoints (the strategy's ``setup`` builds them
    again on ``--resume``), and an array shared with a parameter stays one
    buffer."""
