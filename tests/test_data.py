"""Data sources: IDX files, tfds (mocked), the offline 5k MNIST, toy2d, and device-side batching."""

import gzip
import time

import jax
import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.config import get_config


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
    for i, (key, stem) in enumerate(data.IDX_FILES.items()):
        write_idx(str(tmp_path / (stem + (".gz" if i % 2 else ""))), arrays[key])  # mixed
    return tmp_path, arrays


def test_idx_reader_round_trips(idx_folder):
    folder, arrays = idx_folder
    ds = data.load_idx_folder(str(folder))
    assert ds.train_x.shape == (30, 28, 28, 1) and ds.train_x.dtype == np.float32
    np.testing.assert_allclose(ds.train_x[..., 0], arrays["train_x"] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(ds.test_y, arrays["test_y"])
    assert ds.train_x.min() >= -1 and ds.train_x.max() <= 1


def test_idx_errors(idx_folder, tmp_path_factory):
    folder, _ = idx_folder
    with pytest.raises(data.DataUnavailableError, match="does not exist"):
        data.load_idx_folder(str(folder / "nope"))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(data.DataUnavailableError, match="lacks train-images-idx3-ubyte"):
        data.load_idx_folder(str(empty))
    bad = tmp_path_factory.mktemp("bad")
    for stem in data.IDX_FILES.values():
        (bad / stem).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")  # says 9, holds 3
    with pytest.raises(data.DataUnavailableError, match="truncated"):
        data.load_idx_folder(str(bad))
    (bad / "train-images-idx3-ubyte").write_bytes(b"GIF89a")
    with pytest.raises(data.DataUnavailableError, match="magic number"):
        data.read_idx(str(bad / "train-images-idx3-ubyte"))


def test_mnist5k_fixed_stratified_split():
    ds = data.load_mnist5k()
    assert ds.train_x.shape == (4500, 28, 28, 1) and ds.test_x.shape == (500, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [50] * 10)
    again = data.load_mnist5k()
    np.testing.assert_array_equal(ds.train_y, again.train_y)
    # real digits: mostly background (-1) with bright strokes, not noise
    assert np.mean(ds.train_x < -0.9) > 0.7 and ds.train_x.max() == 1.0
    # train and test share no image
    train_set = {x.tobytes() for x in ds.train_x[:, ::4, ::4]}
    assert sum(x.tobytes() in train_set for x in ds.test_x[:, ::4, ::4]) < 5


def test_toy2d_mixture():
    ds = data.load_toy2d(num_train=20_000, num_test=100)
    means = data.toy2d_means()
    for c in range(data.TOY2D_CLASSES):
        pts = ds.train_x[ds.train_y == c]
        np.testing.assert_allclose(
            pts.mean(0), means[c], atol=5 * data.TOY2D_STD / np.sqrt(len(pts))
        )
        np.testing.assert_allclose(pts.std(0), data.TOY2D_STD, rtol=0.05)


def test_tfds_path_under_mock_data(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "can_reach", lambda *a, **k: True)
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load_dataset(get_config("mnist", data_dir=str(tmp_path)))
    assert ds.name == "mnist" and ds.train_x.shape == (24, 28, 28, 1)
    assert ds.train_x.dtype == np.float32 and -1 <= ds.train_x.min() and ds.train_x.max() <= 1
    assert ds.train_y.dtype == np.int32 and set(ds.train_y) <= set(range(10))


def test_tfds_offline_fails_fast_with_the_options(monkeypatch, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "DOWNLOAD_HOSTS", (("unreachable.invalid", 443),))
    start = time.perf_counter()
    with pytest.raises(data.DataUnavailableError, match="mnist5k") as err:
        data.load_tfds("fashion_mnist", str(tmp_path))
    assert time.perf_counter() - start < 30
    assert "--dataset idx" in str(err.value)


def test_resize_for_tiny_configs():
    ds = data.load_dataset(get_config("tiny"))
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


def test_unit_range_mapping():
    np.testing.assert_allclose(data.to_unit_range(np.array([-1.0, 0.0, 1.0, 3.0])), [0, 0.5, 1, 1])
