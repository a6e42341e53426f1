"""What a trained checkpoint can show, as files: class morphs, inpainting, noise interpolations.

Each function loads a checkpoint (EMA parameters), runs one of :mod:`diffusion_jax.interpolation`
or :mod:`diffusion_jax.inpainting`, and writes pictures whose names record the settings. Inputs
are checked before any sampling, and nothing is written unless everything is (existing files are
kept unless ``overwrite``).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from diffusion_jax import (
    checkpoints,
    evaluation,
    generation,
    images,
    inpainting,
    interpolation,
    models,
    outputs,
    samplers,
)
from diffusion_jax.schedules import respace

logger = logging.getLogger(__name__)


def _open(workdir: str, method: str | None, steps: int | None, spacing: str | None, settings):
    """(config, model, params, data_shape, step, method, steps, spacing, schedule, settings),
    resolved as ``generation.resolve_sampler`` does, for an image model."""
    config, model, params, data_shape, step = generation.load_for_sampling(workdir)
    if len(data_shape) != 3:
        raise ValueError("morphs, inpainting and interpolations are for image data, not toy2d")
    eta = settings.pop("eta", 0.0)
    method, steps, spacing, settings = generation.resolve_sampler(
        config, method, steps, spacing, **settings
    )
    settings["eta"] = eta  # (traced, not a compile-time setting; sample() takes it)
    schedule = respace(config.schedule, config.num_timesteps, steps, spacing)
    return config, model, params, data_shape, step, method, steps, spacing, schedule, settings


def _outputs(workdir, out, name, kinds, overwrite) -> dict[str, str]:
    out = out or os.path.join(os.path.dirname(checkpoints.resolve(workdir)[0]), "samples")
    paths = {k: os.path.join(out, f"{name}_{k}.{ext}") for k, ext in kinds.items()}
    outputs.clean_stale(out)  # a killed earlier call's staging folder is not an output
    outputs.check_free(paths, overwrite)
    generation.check_writable(out)
    return paths


def _check_finite(samples, what: str) -> np.ndarray:
    samples = np.asarray(samples)
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"the {what} hold NaN or infinite values; nothing was written")
    return samples


def _deterministic(
    workdir,
    what,
    fn,
    arg,
    check,
    kinds,
    *,
    frames,
    w,
    method,
    steps,
    spacing,
    seed,
    out,
    overwrite,
    settings,
):
    """``(paths, frames)`` of ``fn`` (``interpolation.class_morph`` or ``noise_interpolation``)
    on the checkpoint in ``workdir``, after ``check(config)`` has vetted the request."""
    config, model, params, shape, step, method, steps, spacing, schedule, settings = _open(
        workdir, method, steps, spacing, settings
    )
    if method == "ddpm":
        raise ValueError(f"a {what} needs a deterministic sampler (--sampler ddim or dpmpp2m)")
    check(config)
    w = config.guidance if w is None else w
    tag = generation.sampler_tag(method, steps, spacing, **settings)
    paths = _outputs(
        workdir,
        out,
        f"step{step}_{kinds.pop('name')}_f{frames}_{tag}_w{w:g}_seed{seed}",
        kinds,
        overwrite,
    )
    result = fn(
        models.denoiser(model),
        params,
        schedule,
        jax.random.PRNGKey(seed),
        shape,
        arg,
        num_classes=config.num_classes,
        frames=frames,
        w=w,
        method=method,
        prediction=config.prediction,
        **settings,
    )
    return paths, _check_finite(result.samples, f"{what} frames")


def morph_to_files(
    workdir: str,
    classes,
    *,
    frames: int = 8,
    **kw,
) -> dict[str, str]:
    """``morph_*.gif`` (the frames in turn) and ``morph_*_grid.png`` (one row per transition)
    of ``classes`` morphing one into the next under one noise; returns {kind: path}. Keywords:
    ``w``, ``method`` (default ``dpmpp2m``), ``steps``, ``spacing``, ``seed``, ``out``,
    ``overwrite`` and sampler settings, as :func:`interpolate_to_files`."""
    classes = [int(c) for c in classes]

    def check(config):
        if len(classes) < 2 or any(not 0 <= c < config.num_classes for c in classes):
            raise ValueError(
                f"--morph takes two or more labels in [0, {config.num_classes}), got {classes}"
            )
        if frames < 1:
            raise ValueError(f"--frames must be >= 1 for a morph, got {frames}")

    kinds = {"name": f"morph{'-'.join(map(str, classes))}", "morph": "gif", "grid": "png"}
    opts = _defaults(kw)
    paths, out = _deterministic(
        workdir,
        "morph",
        interpolation.class_morph,
        classes,
        check,
        kinds,
        frames=frames,
        **opts,
    )
    # one row per transition, from a class to the next one inclusive
    rows = [out[i * frames : (i + 1) * frames + 1] for i in range(len(classes) - 1)]
    with outputs.staged(paths, opts["overwrite"]) as tmp:
        images.save_gif(out[:, None], tmp["morph"], per_row=1, scale=4, frame_ms=120)
        names = [f"{a}>{b}" for a, b in zip(classes[:-1], classes[1:], strict=True)]
        images.save_rows(rows, tmp["grid"], names)
    for p in paths.values():
        logger.info(f"wrote {p}")
    return paths


def interpolate_to_files(
    workdir: str,
    label: int,
    *,
    frames: int = 8,
    **kw,
) -> dict[str, str]:
    """``interp_*_strip.png``: ``frames`` samples of class ``label`` from noises spherically
    interpolated between two draws; returns {kind: path}. Keywords: ``w`` (default: the
    config's), ``method`` (default ``dpmpp2m``; ``ddim`` also works), ``steps``, ``spacing``,
    ``seed``, ``out``, ``overwrite`` and sampler settings (``x0``, ``eta``...)."""

    def check(config):
        if not 0 <= label < config.num_classes:
            raise ValueError(
                f"--interpolate takes a label in [0, {config.num_classes}), got {label}"
            )
        if frames < 2:
            raise ValueError(f"--frames must be >= 2 for an interpolation, got {frames}")

    kinds = {"name": f"interp{label}", "strip": "png"}
    opts = _defaults(kw)
    paths, strip = _deterministic(
        workdir,
        "interpolation",
        interpolation.noise_interpolation,
        label,
        check,
        kinds,
        frames=frames,
        **opts,
    )
    with outputs.staged(paths, opts["overwrite"]) as tmp:
        images.save_rows([strip], tmp["strip"], [str(label)])
    for p in paths.values():
        logger.info(f"wrote {p}")
    return paths


def _defaults(kw: dict) -> dict:
    """The keywords of :func:`_deterministic`: the named ones with their defaults, the rest
    sampler settings."""
    named = dict(
        w=None, method="dpmpp2m", steps=None, spacing=None, seed=0, out=None, overwrite=False
    )
    for k in named:
        if k in kw:
            named[k] = kw.pop(k)
    if named["method"] is None:
        named["method"] = "dpmpp2m"
    return dict(named, settings=kw)


def load_images(path: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images in [-1, 1], labels or None)`` from an ``.npz`` (``samples``/``images`` uint8
    [0, 255] or floats in [0, 1], optional ``labels``) or ``.npy``; ValueError naming the file
    and what is wrong."""
    try:
        loaded = np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"--images {path!r} cannot be read as .npz or .npy: {e}") from e
    labels = None
    if isinstance(loaded, np.ndarray):
        arr = loaded
    else:
        key = next((k for k in ("samples", "images") if k in loaded.files), None)
        if key is None:
            raise ValueError(f"--images {path!r} has no 'samples' or 'images' array")
        arr = loaded[key]
        labels = loaded["labels"] if "labels" in loaded.files else None
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[..., None]
    try:  # the same checks and conversion as evaluate.py --npz
        return evaluation.check_images(arr, shape), labels
    except ValueError as e:
        raise ValueError(f"--images {path!r}: {e}") from None


def load_mask(spec: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A mask by name (``inpainting.MASKS``) or from an ``.npy``/``.npz`` file (``mask``)."""
    if spec in inpainting.MASKS:
        return inpainting.make_mask(spec, shape, seed)
    if not os.path.isfile(spec):
        raise ValueError(f"--inpaint takes one of {inpainting.MASKS} or a mask file, got {spec!r}")
    try:
        loaded = np.load(spec)
        mask = loaded if isinstance(loaded, np.ndarray) else loaded["mask"]
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise ValueError(f"--inpaint mask file {spec!r} cannot be read: {e}") from e
    try:
        return inpainting.check_mask(mask, shape)
    except ValueError as e:
        raise ValueError(f"--inpaint mask file {spec!r}: {e}") from None


# Strided ancestral steps of an inpainting when none are asked for: with RePaint's repeats each
# costs ``resample`` network calls, and 100 x 10 already takes a minute on two CPU cores.
INPAINT_STEPS = 100


def inpaint_to_files(
    workdir: str,
    mask: str,
    *,
    images_path: str | None = None,
    count: int = 10,
    resample: int = 10,
    w: float | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    seed: int = 0,
    out: str | None = None,
    overwrite: bool = False,
    **settings,
) -> dict[str, str]:
    """``inpaint_*_compare.png``: rows of original | masked | filled for ``count`` images (the
    first test images of the run's data set, or ``images_path``), filled with RePaint
    (``resample`` repeats per step, ancestral steps), guided by their labels when known."""
    from diffusion_jax import data

    if steps is None:
        steps = min(INPAINT_STEPS, checkpoints.read_config(workdir)[0].num_timesteps)
    config, model, params, shape, step, _, steps, spacing, schedule, settings = _open(
        workdir, "ddpm", steps, spacing, settings
    )
    mask_arr = load_mask(mask, shape, seed)
    if images_path is None:
        dataset = data.load_dataset(config)
        if count < 1:
            raise ValueError(f"--per_class (images to inpaint) must be >= 1, got {count}")
        # the first test images of each class in turn, so every digit shows up
        by_class = [np.flatnonzero(dataset.test_y == c) for c in range(config.num_classes)]
        index = [ix[i] for i in range(max(map(len, by_class))) for ix in by_class if i < len(ix)]
        index = np.array(index[:count])
        originals, labels = dataset.test_x[index], dataset.test_y[index]
    else:
        originals, labels = load_images(images_path, shape)
        if labels is not None:
            try:  # (integers in [0, num_classes]; num_classes means unconditional)
                samplers.check_labels(np.asarray(labels), config.num_classes, len(originals))
            except ValueError as e:
                raise ValueError(f"--images {images_path!r}: {e}") from None
    w = config.guidance if w is None else w
    if labels is None:
        labels, w = None, 0.0  # nothing to guide towards
    else:
        labels = np.asarray(labels).astype(np.int32)
    mask_name = mask if mask in inpainting.MASKS else "file"
    name = f"step{step}_inpaint_{mask_name}_r{resample}_ddpm{steps}_w{w:g}_seed{seed}"
    paths = _outputs(workdir, out, name, {"compare": "png"}, overwrite)
    filled = inpainting.inpaint(
        models.denoiser(model),
        params,
        schedule,
        jax.random.PRNGKey(seed),
        originals,
        mask_arr,
        num_classes=config.num_classes,
        labels=labels,
        w=w,
        resample=resample,
        prediction=config.prediction,
        **settings,
    )
    filled = _check_finite(filled, "inpainted images")
    masked = np.where(mask_arr > 0.5, originals, 0.0)  # unknown pixels shown mid-grey
    rows = [np.stack([o, m, f]) for o, m, f in zip(originals, masked, filled, strict=True)]
    with outputs.staged(paths, overwrite) as tmp:
        names = None if labels is None else [str(int(c)) for c in labels]
        images.save_rows(rows, tmp["compare"], names)
    for p in paths.values():
        logger.info(f"wrote {p}")
    return paths
