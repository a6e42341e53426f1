"""Pictures of samples: labelled grids (PNG), animations of the reverse chain (GIF), 2-D scatter
plots, and the ``.npz`` files that evaluation reads. Inputs are in the model range [-1, 1]."""

from __future__ import annotations

import numpy as np

from diffusion_jax.data import to_unit_range
from diffusion_jax.outputs import written


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255], same shape."""
    return np.round(to_unit_range(x) * 255.0).astype(np.uint8)


def tile(images: np.ndarray, per_row: int, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, per_row*(W+pad)+pad, C) mosaic."""
    n, h, w, c = images.shape
    rows = -(-n // per_row)
    out = np.full((rows * (h + pad) + pad, per_row * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, per_row)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y : y + h, x : x + w] = images[i]
    return out


MAX_PER_ROW = 16  # a class with more samples wraps onto further rows (100 per class: 7 rows)


def _rows_by_label(samples, labels, max_per_row: int = MAX_PER_ROW):
    """Indices putting each class in a block of rows of its own (-1 = blank cell), wrapped at
    ``max_per_row`` cells; the row labels (the class on a block's first row, None on the rows
    that continue it), and the row length."""
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    per_row = min(max(int(np.sum(labels == c)) for c in classes), max_per_row)
    order, row_labels = [], []
    for c in classes:
        idx = list(np.flatnonzero(labels == c))
        for start in range(0, len(idx), per_row):
            row = idx[start : start + per_row]
            order.append(row + [-1] * (per_row - len(row)))  # -1: blank cell
            row_labels.append(c if start == 0 else None)
    return np.asarray(order).reshape(-1), row_labels, per_row


def save_grid(
    samples, labels, path: str, null_label: int = 10, scale: int = 2, names: dict | None = None
) -> None:
    """A PNG of image samples (N, H, W, C) with one row per class, labelled on the left (by
    ``names[label]`` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = to_uint8(samples)
    order, row_labels, per_row = _rows_by_label(samples, labels)
    blank = np.full((1,) + imgs.shape[1:], 255, np.uint8)
    cells = np.concatenate([imgs, blank])[order]  # index -1 picks the blank
    mosaic = tile(cells, per_row)
    h = imgs.shape[1] + 1
    fig_w = mosaic.shape[1] * scale / 100 + 0.5
    fig, ax = plt.subplots(figsize=(fig_w, mosaic.shape[0] * scale / 100 + 0.1), dpi=100)
    ax.imshow(
        mosaic.squeeze(-1) if mosaic.shape[-1] == 1 else mosaic,
        cmap="gray",
        vmin=0,
        vmax=255,
        interpolation="nearest",
    )
    ax.set_yticks([1 + h * i + h / 2 for i in range(len(row_labels))])
    if names is None:
        names = {c: "uncond" if c == null_label else str(c) for c in row_labels if c is not None}
    ax.set_yticklabels([names.get(c, "") for c in row_labels], fontsize=7)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    fig.subplots_adjust(left=0.5 / fig_w, right=1, top=1, bottom=0)
    with written(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def save_rows(rows, path: str, row_labels=None, scale: int = 3) -> None:
    """A PNG of image rows: ``rows`` a list of (n_i, H, W, C) arrays in [-1, 1], one row each
    (shorter rows padded with blank cells), optionally labelled on the left."""
    samples = np.concatenate(rows)
    labels = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    names = dict(enumerate(row_labels)) if row_labels is not None else None
    save_grid(samples, labels, path, null_label=-1, scale=scale, names=names)


def save_gif(
    snapshots, path: str, per_row: int, scale: int = 2, frame_ms: int = 80, hold_last_ms: int = 1500
) -> None:
    """An animated GIF of the reverse chain: snapshots (S, N, H, W, C), one mosaic per frame."""
    from PIL import Image

    frames = []
    for snap in np.asarray(snapshots):
        mosaic = tile(to_uint8(snap), per_row)
        img = Image.fromarray(mosaic.squeeze(-1) if mosaic.shape[-1] == 1 else mosaic)
        frames.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    durations = [frame_ms] * (len(frames) - 1) + [hold_last_ms]
    with written(path) as tmp:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=durations, loop=0)


def save_npz(path: str, samples, labels, **metadata) -> None:
    """Samples as uint8 images (N, H, W, C) in [0, 255] (or float32 points for 2-D data), their
    int labels, and scalar metadata (guidance, sampler, steps, seed...)."""
    samples = np.asarray(samples)
    payload = to_uint8(samples) if samples.ndim == 4 else samples.astype(np.float32)
    with written(path) as tmp:
        np.savez_compressed(
            tmp,
            samples=payload,
            labels=np.asarray(labels, np.int32),
            **{k: np.asarray(v) for k, v in metadata.items()},
        )


def save_toy2d_plot(real, panels: dict[str, np.ndarray], path: str) -> None:
    """Scatter plots of 2-D samples next to the real data: one panel per entry of ``panels``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.3))
    for ax, (title, pts) in zip(axes, [("data", real), *panels.items()], strict=True):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with written(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)

