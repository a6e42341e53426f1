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
    datasets,
    evaluation,
    generation,
    images,
    inpainting,
    interpolation,
    models,
    outputs,
    samplers,
    solvers,
)
from diffusion_jax.plans import SamplingPlan

logger = logging.getLogger(__name__)


def _open(workdir: str, plan, solver: str, steps: int | None = None):
    """``(checkpoint, plan, schedule)`` for an image model: ``plan`` (a plan, a dict of
    ``plans.resolve`` keywords, or None) for the checkpoint's config, ``solver`` and ``steps``
    its defaults."""
    ckpt, plan = generation.open_checkpoint(workdir, plan, solver=solver, steps=steps)
    config = ckpt.config
    if len(ckpt.data_shape) != 3:
        raise ValueError("morphs, inpainting and interpolations are for image data, not toy2d")
    schedule = plan.schedule(config.schedule, config.num_timesteps)
    return ckpt, plan, schedule


def _sampling(ckpt, plan: SamplingPlan, schedule) -> dict:
    """The keywords of ``samplers.sample`` (or ``inpainting.inpaint``) that ``plan`` sets."""
    config = ckpt.config
    return dict(
        num_classes=config.num_classes,
        settings=plan.settings(config.prediction),
        **plan.chain_options(schedule, config.num_timesteps),
    )


def _outputs(workdir, out, name, kinds, overwrite) -> dict[str, str]:
    folder = out or outputs.default_folder(workdir, "samples")
    return outputs.prepare(outputs.named(folder, name, kinds), overwrite)


def _check_finite(samples, what: str) -> np.ndarray:
    samples = np.asarray(samples)
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"the {what} hold NaN or infinite values; nothing was written")
    return samples


def _deterministic(workdir, what, fn, arg, check, kinds, plan, *, frames, seed, out, overwrite):
    """``(paths, frames)`` of ``fn`` (``interpolation.class_morph`` or ``noise_interpolation``)
    on the checkpoint in ``workdir`` with ``plan`` (default solver ``dpmpp2m``), after
    ``check(config)`` has vetted the request."""
    ckpt, plan, schedule = _open(workdir, plan, "dpmpp2m")
    if plan.solver == "ddpm":
        others = ", ".join(name for name in solvers.SOLVERS if name != "ddpm")
        raise ValueError(f"a {what} needs a deterministic sampler (--sampler one of {others})")
    check(ckpt.config)
    name = f"step{ckpt.step}_{kinds.pop('name')}_f{frames}_{plan.tag()}_w{plan.w:g}_seed{seed}"
    paths = _outputs(workdir, out, name, kinds, overwrite)
    result = fn(
        models.denoiser(ckpt.model),
        ckpt.params,
        schedule,
        jax.random.PRNGKey(seed),
        ckpt.data_shape,
        arg,
        frames=frames,
        **_sampling(ckpt, plan, schedule),
    )
    return paths, _check_finite(result.samples, f"{what} frames")


def morph_to_files(
    workdir: str,
    classes,
    plan: SamplingPlan | dict | None = None,
    *,
    frames: int = 8,
    seed: int = 0,
    out: str | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """``morph_*.gif`` (the frames in turn) and ``morph_*_grid.png`` (one row per transition)
    of ``classes`` morphing one into the next under one noise; returns {kind: path}. ``plan``
    (a plan, a dict of ``plans.resolve`` keywords, or None; default solver ``dpmpp2m``) must be
    deterministic."""
    classes = [int(c) for c in classes]

    def check(config):
        if len(classes) < 2 or any(not 0 <= c < config.num_classes for c in classes):
            raise ValueError(
                f"--morph takes two or more labels in [0, {config.num_classes}), got {classes}"
            )
        if frames < 1:
            raise ValueError(f"--frames must be >= 1 for a morph, got {frames}")

    kinds = {"name": f"morph{'-'.join(map(str, classes))}", "morph": "gif", "grid": "png"}
    paths, out = _deterministic(
        workdir,
        "morph",
        interpolation.class_morph,
        classes,
        check,
        kinds,
        plan,
        frames=frames,
        seed=seed,
        out=out,
        overwrite=overwrite,
    )
    # one row per transition, from a class to the next one inclusive
    rows = [out[i * frames : (i + 1) * frames + 1] for i in range(len(classes) - 1)]
    with outputs.staged(paths, overwrite) as tmp:
        images.save_gif(out[:, None], tmp["morph"], per_row=1, scale=4, frame_ms=120)
        names = [f"{a}>{b}" for a, b in zip(classes[:-1], classes[1:], strict=True)]
        images.save_rows(rows, tmp["grid"], names)
    for p in paths.values():
        logger.info(f"wrote {p}")
    return paths


def interpolate_to_files(
    workdir: str,
    label: int,
    plan: SamplingPlan | dict | None = None,
    *,
    frames: int = 8,
    seed: int = 0,
    out: str | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """``interp_*_strip.png``: ``frames`` samples of class ``label`` from noises spherically
    interpolated between two draws; returns {kind: path}. ``plan`` as :func:`morph_to_files`
    (``ddim`` also works)."""

    def check(config):
        if not 0 <= label < config.num_classes:
            raise ValueError(
                f"--interpolate takes a label in [0, {config.num_classes}), got {label}"
            )
        if frames < 2:
            raise ValueError(f"--frames must be >= 2 for an interpolation, got {frames}")

    kinds = {"name": f"interp{label}", "strip": "png"}
    paths, strip = _deterministic(
        workdir,
        "interpolation",
        interpolation.noise_interpolation,
        label,
        check,
        kinds,
        plan,
        frames=frames,
        seed=seed,
        out=out,
        overwrite=overwrite,
    )
    with outputs.staged(paths, overwrite) as tmp:
        images.save_rows([strip], tmp["strip"], [str(label)])
    for p in paths.values():
        logger.info(f"wrote {p}")
    return paths


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
    plan: SamplingPlan | dict | None = None,
    *,
    images_path: str | None = None,
    count: int = 10,
    resample: int = 10,
    seed: int = 0,
    out: str | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """``inpaint_*_compare.png``: rows of original | masked | filled for ``count`` images (the
    first test images of the run's data set, or ``images_path``), filled with RePaint
    (``resample`` repeats per step, ancestral steps), guided by their labels when known.
    ``plan``: its solver must be ``ddpm`` (default: ``ddpm`` with :data:`INPAINT_STEPS` steps)."""
    T = checkpoints.read_config(workdir)[0].num_timesteps
    ckpt, plan, schedule = _open(workdir, plan, "ddpm", inpaint_steps(T))
    if plan.solver != "ddpm":
        raise ValueError("--inpaint uses ancestral steps (RePaint); drop --sampler")
    config, shape = ckpt.config, ckpt.data_shape
    mask_arr = load_mask(mask, shape, seed)
    if images_path is None:
        dataset = datasets.load_dataset(config)
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
    if labels is None:
        plan = plan.replace(w=0.0)  # nothing to guide towards
    else:
        labels = np.asarray(labels).astype(np.int32)
    mask_name = mask if mask in inpainting.MASKS else "file"
    name = (
        f"step{ckpt.step}_inpaint_{mask_name}_r{resample}_ddpm{plan.steps}_w{plan.w:g}_seed{seed}"
    )
    paths = _outputs(workdir, out, name, {"compare": "png"}, overwrite)
    sampling = _sampling(ckpt, plan, schedule)
    sampling.pop("eta")  # (RePaint's steps are ancestral: no eta)
    filled = inpainting.inpaint(
        models.denoiser(ckpt.model),
        ckpt.params,
        schedule,
        jax.random.PRNGKey(seed),
        originals,
        mask_arr,
        labels=labels,
        resample=resample,
        **sampling,
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


def inpaint_steps(num_timesteps: int) -> int:
    """The strided ancestral steps of an inpainting when none are asked for."""
    return min(INPAINT_STEPS, num_timesteps)
