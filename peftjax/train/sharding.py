"""Data-parallel and FSDP on a ``jax.sharding.Mesh``.

The mesh has two axes: ``data`` (replicas that each see part of the batch) and
``fsdp`` (devices that split the batch further and also split every large
parameter). A parameter is sharded on its first axis whose size the ``fsdp``
axis divides; an adapter parameter follows its base kernel: it is sharded on
the axis whose size equals the size of the axis the base kernel is sharded on
(LoRA's A on its input axis when the kernel is sharded on its input axis), so
the adapter's matmul lines up with the base's. Everything else is replicated.
jit then partitions the step (GSPMD): gradients of replicated parameters are
all-reduced over ``data``, FSDP parameters are gathered where used.
``TrainState.on_mesh`` lays a train state out with these specs.

Multi-host: call ``jax.distributed.initialize()`` first (``peftjax train
--distributed``); the mesh spans every process's devices and each process
feeds its own slice of the global batch (see ``global_batch``).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from peftjax.core.inject import iter_wrappers
from peftjax.core.paths import dotted
from peftjax.errors import RunError

BATCH_AXES = ("data", "fsdp")


def make_mesh(*, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices: ``data = devices / fsdp``."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if fsdp < 1 or devices.size % fsdp:
        raise RunError(f"--fsdp {fsdp}: must divide the number of devices ({devices.size}: {devices.flat[0].platform})")
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), BATCH_AXES)


def _first_divisible_axis(shape, size: int, *, wanted: int | None = None) -> int | None:
    for axis, dim in enumerate(shape):
        if dim % size == 0 and dim >= size and (wanted is None or dim == wanted):
            return axis
    return None


def _spec(axis: int | None, ndim: int) -> PartitionSpec:
    if axis is None:
        return PartitionSpec()
    return PartitionSpec(*[("fsdp" if i == axis else None) for i in range(ndim)])


def parameter_specs(model: nnx.Module, mesh: Mesh) -> dict[str, PartitionSpec]:
    """``{dotted path: PartitionSpec}`` for every variable of ``model``."""
    size = mesh.shape["fsdp"]
    shapes = {dotted(p): v.get_value().shape for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    specs = {}
    for path, shape in shapes.items():
        specs[path] = _spec(_first_divisible_axis(shape, size) if size > 1 else None, len(shape))
    if size > 1:
        for where, wrapper in iter_wrappers(model):
            kernel_path = next((p for p in shapes if p.startswith(where + ".base.") and p.endswith(".kernel")), None)
            kernel_spec = specs.get(kernel_path)
            sharded_dim = None
            if kernel_spec is not None and any(kernel_spec):
                sharded_dim = shapes[kernel_path][[a is not None for a in kernel_spec].index(True)]
            for path, shape in shapes.items():
                if path.startswith(where + ".") and not path.startswith(where + ".base."):
                    axis = None if sharded_dim is None else _first_divisible_axis(shape, size, wanted=sharded_dim)
                    specs[path] = _spec(axis, len(shape))
    return specs


def place(tree, specs: dict[str, PartitionSpec], mesh: Mesh):
    """Every leaf of a state tree on ``mesh`` with its path's spec (replicated when it has none)."""

    def put_leaf(path, leaf):
        spec = specs.get(dotted(path[:-1]) if path and getattr(path[-1], "name", None) == "value" else dotted(path))
        return put(leaf, NamedSharding(mesh, spec or PartitionSpec()))

    return jax.tree_util.tree_map_with_path(put_leaf, tree)


def put(value, sharding: jax.sharding.Sharding) -> jax.Array:
    """``value`` (the same on every process) laid out with ``sharding``. With
    several processes each one fills in the shards its own devices hold."""
    if jax.process_count() == 1 or sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return jax.jit(lambda x: x, out_shardings=sharding)(value)  # already global: reshard
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global batch sharded over (data, fsdp) on the leading axis.

    Every process holds the same global batch (the loader's order depends only
    on seed and epoch) and contributes the rows its own devices own."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    count, index = jax.process_count(), jax.process_index()

    def place(array):
        rows = array.shape[0] // count
        return jax.make_array_from_process_local_data(sharding, array[index * rows : (index + 1) * rows], array.shape)

    return {key: place(value) for key, value in batch.items()}
