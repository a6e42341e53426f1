"""Data as arrays: the :class:`Dataset` of a loaded data set, its ranges (uint8 <-> [-1, 1] <->
[0, 1]), its fingerprint, and the batches a training step draws from it on the device.

Loading (the sources, the registry of names, the cache) is :mod:`diffusion_jax.datasets`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class DataUnavailableError(RuntimeError):
    """The data set cannot be read or downloaded; the message says what to do instead (raised by
    the loaders of :mod:`diffusion_jax.datasets`)."""


class Dataset(NamedTuple):
    """``*_x``: (N, H, W, C) float32 images in [-1, 1] or (N, 2) points; ``*_y``: int32 (N,).

    ``known_as``: the registered data set (:data:`diffusion_jax.datasets.REGISTRY`) these data
    are, which gives e.g. the classifier's accuracy floor: the name they were loaded under, or
    for an IDX folder the data set recognised from its test labels (else ``"idx"``); ``""`` for
    data made elsewhere.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    known_as: str = ""


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], NHWC."""
    x = np.asarray(images_uint8, np.float32) / 127.5 - 1.0
    return x[..., None] if x.ndim == 3 else x


def to_unit_range(x) -> np.ndarray:
    """Model range [-1, 1] -> [0, 1], clipped (for saving and viewing)."""
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def digest(arrays) -> str:
    """SHA-256 (hex) of a sequence of arrays: each one's dtype, shape and bytes, in order."""
    import hashlib

    h = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def fingerprint(dataset: Dataset) -> str:
    """SHA-256 of the training examples and labels as loaded (dtype, shape and bytes): what a
    resumed run must train on again. About 0.1 s for MNIST's 188 MB of float32 images."""
    return digest((dataset.train_x, dataset.train_y))


# ---------------------------------------------------------------- batches on the device


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches in one epoch: the last incomplete batch is dropped."""
    return num_examples // batch_size


def epoch_order(data_key: jax.Array, epoch, num_examples: int) -> jnp.ndarray:
    """The order in which epoch ``epoch`` visits the examples: int32 (num_examples,), a
    permutation drawn from ``fold_in(data_key, epoch)``."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)


def batch_indices(data_key: jax.Array, step, num_examples: int, batch_size: int) -> jnp.ndarray:
    """Indices of the examples of training step ``step``: int32 (batch_size,).

    Each epoch is a fresh permutation (:func:`epoch_order`); the last incomplete batch of an
    epoch is dropped. Stateless, so a resumed run sees the same batches.
    """
    spe = steps_per_epoch(num_examples, batch_size)
    order = epoch_order(data_key, step // spe, num_examples)
    return jax.lax.dynamic_slice(order, ((step % spe) * batch_size,), (batch_size,))


def shard_rows(num_examples: int, shard: int, num_shards: int) -> np.ndarray:
    """The examples of data shard ``shard``: every num_shards-th row from ``shard`` (so a data
    set stored sorted by class still gives balanced shards), num_examples // num_shards of them."""
    return np.arange(shard, num_examples, num_shards)[: num_examples // num_shards]


def _shard_key(data_key, shard, num_shards):
    # one shard walks the epochs of data_key itself: the order of runs made before data shards
    return data_key if num_shards == 1 else jax.random.fold_in(data_key, shard)


def shard_batch_indices(data_key, step, shard_size: int, batch_size: int, num_shards: int):
    """Each shard's part of the batch of step ``step``: int32 (num_shards, batch_size /
    num_shards), indices into the shard. Shard s walks its own epochs, keyed by fold_in(data_key,
    s); one shard is the batch of :func:`batch_indices` under ``data_key`` itself."""
    per_shard = batch_size // num_shards
    return jax.vmap(
        lambda s: batch_indices(_shard_key(data_key, s, num_shards), step, shard_size, per_shard)
    )(jnp.arange(num_shards))


def dispatch_epochs(steps_per_dispatch: int, shard_size: int, batch_size: int, num_shards: int):
    """How many epochs a dispatch of at most ``steps_per_dispatch`` steps can touch, wherever
    in an epoch it starts: the number of epoch orders :func:`dispatch_orders` draws."""
    spe = steps_per_epoch(shard_size, batch_size // num_shards)
    return 1 + (spe + steps_per_dispatch - 2) // spe


def dispatch_orders(data_key, first_step, shard_size: int, batch_size: int, num_shards: int,
                    num_epochs: int):
    """Every shard's example order for the ``num_epochs`` epochs from the one holding step
    ``first_step``: int32 (num_epochs, num_shards, shard_size). Drawn once per dispatch, so a
    dispatch's steps slice them (:func:`batch_from_orders`) instead of each drawing a
    permutation of the whole data set."""
    spe = steps_per_epoch(shard_size, batch_size // num_shards)
    epochs = first_step // spe + jnp.arange(num_epochs)
    return jax.vmap(
        lambda e: jax.vmap(
            lambda s: epoch_order(_shard_key(data_key, s, num_shards), e, shard_size)
        )(jnp.arange(num_shards))
    )(epochs)


def batch_from_orders(orders, first_step, step, batch_size: int, num_shards: int):
    """:func:`shard_batch_indices` of ``step`` read from ``dispatch_orders(.., first_step, ..)``:
    int32 (num_shards, batch_size / num_shards). ``step`` must lie in the orders' epochs."""
    per_shard = batch_size // num_shards
    spe = steps_per_epoch(orders.shape[-1], per_shard)
    order = orders[step // spe - first_step // spe]
    return jax.lax.dynamic_slice_in_dim(order, (step % spe) * per_shard, per_shard, axis=1)
