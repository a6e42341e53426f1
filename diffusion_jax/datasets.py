"""The data sets by name: one registry entry per ``--dataset`` choice, and the kinds of data.

Everything that depends on which data set is in use reads it from :data:`REGISTRY`: the config's
choices, class count and dataset/network pairing (:mod:`diffusion_jax.config`), loading
(:func:`diffusion_jax.data.load_dataset`) and the evaluation classifier's accuracy floor
(:mod:`diffusion_jax.classifier`). Adding a data set is a loader in :mod:`diffusion_jax.data` and
one entry here. A loaded :class:`~diffusion_jax.data.Dataset` says which entry it is
(``known_as``): an IDX folder is known as the data set whose test labels it holds
(:data:`RECOGNISED`), else as ``idx``.

A network declares the kind of data it denoises (``input_kind``, one of :data:`KINDS`; see
:class:`diffusion_jax.models.Network`) and checks a batch's rank with :func:`check_shape`.

This module imports no jax: :mod:`diffusion_jax.config` reads it, and the loaders import
:mod:`diffusion_jax.data` only when a data set is read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Kind(NamedTuple):
    """A kind of data: the rank of a batch of it, how messages name that shape, and how they
    name the data sets of this kind (``{names}``: their names)."""

    rank: int
    shape: str
    noun: str


KINDS = {
    "points": Kind(2, "vectors (B, D)", "{names} data"),
    "image": Kind(4, "NHWC images (B, H, W, C)", "images"),
}


def check_shape(kind: str, shape, who: str) -> None:
    """ValueError unless ``shape`` is a batch of data of ``kind``, naming ``who`` expects it."""
    if len(shape) != KINDS[kind].rank:
        raise ValueError(f"{who} expects {KINDS[kind].shape}, got shape {tuple(shape)}")


class DatasetSpec(NamedTuple):
    """One data set that ``--dataset NAME`` can name."""

    name: str
    # data_dir -> diffusion_jax.data.Dataset (reads the files, or downloads them)
    load: Callable
    # classes the model is built for (an IDX folder may hold fewer: its largest label + 1)
    num_classes: int
    kind: str  # a key of KINDS
    # the test accuracy below which the evaluation classifier's features are not trusted;
    # None: no floor (unknown data, or no classifier for this kind)
    min_accuracy: float | None
    # what --data_dir must name, for a data set that cannot be read without it ("": optional)
    needs_data_dir: str = ""


def _data():
    from diffusion_jax import data  # imports jax: only when a data set is read

    return data


IDX_FOLDER = "the folder holding the IDX files"  # what --data_dir names for dataset idx

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # name, load(data_dir), num_classes, kind, min_accuracy[, needs_data_dir]
        DatasetSpec("mnist", lambda d: _data().load_tfds("mnist", d), 10, "image", 0.99),
        DatasetSpec(
            "fashion_mnist", lambda d: _data().load_tfds("fashion_mnist", d), 10, "image", 0.9
        ),
        DatasetSpec("mnist5k", lambda d: _data().load_mnist5k(), 10, "image", 0.97),
        # no floor, unless the folder is recognised as another entry (see RECOGNISED)
        DatasetSpec("idx", lambda d: _data().load_idx_folder(d), 10, "image", None, IDX_FOLDER),
        DatasetSpec("toy2d", lambda d: _data().load_toy2d(), 5, "points", None),
    )
}
DATASETS = tuple(REGISTRY)


def get(name: str) -> DatasetSpec:
    """The registry entry ``name``; ValueError naming the choices if there is none."""
    if name not in REGISTRY:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return REGISTRY[name]


# Registered data sets that an IDX folder may hold, by the SHA-256 of their test labels (uint8,
# in file order): the test split's labels are a fixed sequence, the same whatever the folder is
# called, gzipped or not, and at whatever size the images are used.
RECOGNISED = {
    # Fashion-MNIST's t10k-labels-idx1-ubyte (as Debian's dataset-fashion-mnist ships it)
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9": "fashion_mnist",
}


def recognise(test_labels) -> str | None:
    """The registered data set whose test labels these are (:data:`RECOGNISED`), else None."""
    digest = hashlib.sha256(np.asarray(test_labels).astype(np.uint8).tobytes()).hexdigest()
    return RECOGNISED.get(digest)


def min_accuracy(dataset) -> float | None:
    """The classifier accuracy floor for a loaded ``dataset`` (a :class:`~diffusion_jax.data.
    Dataset`): its registry entry's, looked up by what the data are (``dataset.known_as``)."""
    spec = REGISTRY.get(dataset.known_as)
    return spec.min_accuracy if spec else None
