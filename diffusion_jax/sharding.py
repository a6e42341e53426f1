"""Data parallelism on a ``jax.sharding`` mesh, on one host or several.

The batch is split over the devices of a 1-D mesh, parameters and optimizer state are
replicated, and XLA inserts the gradient all-reduce (no pmap). On several hosts each process
runs the same program (``jax.distributed``); the training data are split into one shard per
process, and each process puts only its own shard on its devices.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Join a multi-process run; call before any JAX computation.

    With no arguments jax detects the cluster (Cloud TPU, Slurm, Open MPI, Kubernetes);
    elsewhere give all three.
    """
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_main_process() -> bool:
    """True on the one process (index 0) that writes logs, images, metrics and config files."""
    return jax.process_index() == 0


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all, of every process), ordered by process so each
    process's devices form one contiguous block (its data shard; see :func:`shard_of_position`).
    Auto axes, so that an embedding lookup on batch-sharded labels needs no sharding rules."""
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        cpu = mesh.devices.flat[0].platform == "cpu"
        raise ValueError(
            f"batch_size {batch_size} must be divisible by the {n} devices of the data-parallel "
            f"mesh; use a multiple of {n}"
            + (" (or set DIFFUSION_JAX_CPU_DEVICES=1: the CPU as one device)" if cpu else "")
        )


def check_num_shards(num_shards: int, mesh) -> None:
    n = mesh.devices.size
    if num_shards < 1 or n % num_shards:
        raise ValueError(
            f"data shards ({num_shards}; by default one per process) must divide the {n} devices "
            "of the mesh; give every process the same number of devices"
        )


def shard_of_position(position: int, num_devices: int, num_shards: int) -> int:
    """The data shard held by the device at ``position`` of the mesh: contiguous blocks of
    num_devices / num_shards devices share one shard (one process's devices, with one shard
    per process)."""
    return position // (num_devices // num_shards)


def put_sharded_rows(x: np.ndarray, mesh, num_shards: int, rows_of_shard) -> jax.Array:
    """A (D, M, ...) global array whose row d, on mesh device d, is ``x[rows_of_shard(s)]`` for
    that device's shard s. Each process builds only the rows of its own devices."""
    num_devices = mesh.devices.size
    shard = functools.cache(lambda s: np.ascontiguousarray(x[rows_of_shard(s)]))
    size = len(rows_of_shard(0))

    def block(index):
        position = index[0].start or 0
        return shard(shard_of_position(position, num_devices, num_shards))[None]

    return jax.make_array_from_callback(
        (num_devices, size, *x.shape[1:]), batch_sharded(mesh), block
    )


def to_host(x) -> np.ndarray:
    """A numpy copy of ``x``, gathered from every process if it is split across processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def replicate(tree, mesh):
    """``tree``'s arrays placed whole on every device of ``mesh`` (global arrays when the mesh
    spans several processes; every process must pass the same values)."""
    target = replicated(mesh)

    def put(x):
        if jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable:
            x = np.asarray(x)  # a process-local array: re-placed from its host copy
        return jax.device_put(x, target)

    return jax.tree_util.tree_map(put, tree)


def all_processes(value: int) -> np.ndarray:
    """Every process's ``value`` (an int), in process order: (P,). A collective: call on all."""
    if jax.process_count() == 1:
        return np.array([value])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.int64(value)))


def same_on_all_processes(value: int) -> int:
    """Process 0's ``value`` (an int or bool), on every process: decisions that must not differ
    between processes (e.g. what a shared folder holds, seen through different caches)."""
    return type(value)(all_processes(value)[0])


def check_shared_folder(folder: str) -> None:
    """Raise ValueError on every process unless all processes see the same ``folder`` (process
    0 writes a file there that the others must read). A collective: call on all."""
    nonce = same_on_all_processes(int.from_bytes(os.urandom(4), "little"))
    path = os.path.join(folder, ".shared_check")
    if is_main_process():
        with open(path, "w") as f:
            f.write(str(nonce))
    all_processes(0)  # a barrier: the file is written before anyone reads it
    try:
        with open(path) as f:
            ok = f.read() == str(nonce)
    except OSError:
        ok = False
    seen = all_processes(int(ok))
    if is_main_process():
        os.remove(path)
    if not seen.all():
        raise ValueError(
            f"processes {np.flatnonzero(seen == 0).tolist()} do not see the files process 0 "
            f"writes in {folder!r}; with several hosts the workdir must be a folder they all "
            "share (e.g. an NFS mount)"
        )
