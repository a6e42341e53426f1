"""Data parallelism on a ``jax.sharding`` mesh: the batch is split over devices, parameters and
optimizer state are replicated, and XLA inserts the gradient all-reduce (no pmap)."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all). Auto axes, so that an embedding lookup on
    batch-sharded labels needs no explicit sharding rules."""
    devices = list(devices or jax.devices())
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (AxisType.Auto,), devices=devices)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by the {n} devices of the data-parallel "
            f"mesh; use a multiple of {n}"
        )
