"""Sampling a trained checkpoint: :func:`load_for_sampling`, :func:`generate` (samples of a
:class:`~diffusion_jax.plans.SamplingPlan`) and :func:`sample_to_files` (sample.py's pictures)."""

from __future__ import annotations

import hashlib
import logging
import os
import time

import jax
import numpy as np

from diffusion_jax import (
    checkpoints,
    datasets,
    images,
    models,
    outputs,
    plans,
    samplers,
    sharding,
    solvers,
)
from diffusion_jax.plans import SamplingPlan

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000  # samples drawn at once by sample.py: 10,000 in one batch took 8.1 GB


def generate(
    config,
    model,
    params,
    data_shape: tuple[int, ...],
    labels,
    key: jax.Array,
    plan: SamplingPlan | dict | None = None,
    *,
    num_snapshots: int = 0,
    snapshot_rows=None,
    batch_size: int | None = None,
    mesh=None,
    timed: bool = False,
) -> samplers.SampleResult:
    """Samples of shape (len(labels), *data_shape) from ``model`` with ``params``.

    ``labels`` are ints in [0, num_classes] (num_classes = unconditional); ``plan`` says how to
    sample (:func:`~diffusion_jax.plans.for_config`: a plan, a dict of ``plans.resolve``
    keywords, or None for the config's own sampler and guidance). ``timed``:
    the result carries its :class:`~diffusion_jax.samplers.Timing`. The batch is split over
    ``mesh`` (default: this process's devices, when there are several; in a multi-process
    program pass a mesh over all processes' devices and call this on every process).

    ``batch_size`` bounds the memory: more labels than that are sampled in chunks of
    ``batch_size`` rows (the last one padded, so one program serves them all). Chunk c draws
    its noise from ``fold_in(key, c)`` (chunk 0 from ``key`` itself), so up to ``batch_size``
    samples are those of one batch, and the samples depend on the seed and the batch size.
    ``snapshot_rows`` (indices into ``labels``): keep only these samples' snapshots.
    """
    if mesh is None and jax.local_device_count() > 1:
        mesh = sharding.data_mesh(jax.local_devices())
    plan = plans.for_config(config, plan)
    if solvers.get(plan.solver).student != bool(getattr(model, "guidance_embedding", False)):
        raise ValueError(
            f"--sampler {plan.solver} does not fit this network (a distilled student takes w as "
            "an input and is sampled with --sampler distilled only): resolve the plan with "
            "plans.for_checkpoint(checkpoint, ...)"
        )
    labels = np.asarray(labels)
    n = len(labels)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    size = n if batch_size is None else min(batch_size, n)
    schedule = plan.schedule(config.schedule, config.num_timesteps)
    settings = plan.settings(config.prediction, num_snapshots=num_snapshots)
    options = plan.chain_options(schedule, config.num_timesteps)

    def chain(c: int) -> samplers.ChainCall:
        part = labels[c * size : (c + 1) * size]
        # the last chunk is padded with unconditional rows, so every chunk has one shape
        part = np.concatenate([part, np.full(size - len(part), config.num_classes, part.dtype)])
        return samplers.prepare_chain(
            models.denoiser(model),
            params,
            schedule,
            key if c == 0 else jax.random.fold_in(key, c),
            (size, *data_shape),
            num_classes=config.num_classes,
            labels=part,
            settings=settings,
            mesh=mesh,
            **options,
        )

    first = chain(0)
    if size == n:  # one batch: the arrays stay on the device (global arrays with a mesh)
        result = first.timed() if timed else first.run()
        if snapshot_rows is None or result.snapshots is None:
            return result
        return result._replace(snapshots=result.snapshots[:, np.asarray(snapshot_rows)])
    compiled, compile_s = first.compile() if timed else (None, 0.0)
    start = time.perf_counter()
    samples, snapshots = [], []
    for c in range(-(-n // size)):
        result = (first if c == 0 else chain(c)).run(compiled)
        rows = np.arange(c * size, min((c + 1) * size, n))
        samples.append(np.asarray(result.samples)[: len(rows)])
        if result.snapshots is not None:
            keep = rows if snapshot_rows is None else np.intersect1d(rows, snapshot_rows)
            snapshots.append(np.asarray(result.snapshots)[:, keep - c * size])
    timing = samplers.Timing(compile_s, time.perf_counter() - start) if timed else None
    return samplers.SampleResult(
        np.concatenate(samples), np.concatenate(snapshots, axis=1) if snapshots else None, timing
    )


def load_for_sampling(path: str, steps: int | None = None) -> checkpoints.Checkpoint:
    """The :class:`~diffusion_jax.checkpoints.Checkpoint` (config, model, EMA parameters,
    example shape, step, distill record) of a workdir or a checkpoint folder. Only the EMA
    parameters are read (not the optimizer state). A distillation run's folder gives the
    student of ``steps`` steps (default: its fewest), see ``checkpoints.student_path``."""
    path = checkpoints.student_path(path, steps)
    mngr, directory, step, config, data_shape, record = checkpoints.open_for_sampling(path)
    try:
        model = models.build_model(config, guidance_embedding=record is not None)
        target = models.abstract_params(model, (1, *data_shape))
        params = checkpoints.restore_ema(mngr, directory, step, target)
    finally:
        mngr.close()
    return checkpoints.Checkpoint(config, model, params, tuple(data_shape), step, record)


def open_checkpoint(
    path: str, plan: SamplingPlan | dict | None = None, **defaults
) -> tuple[checkpoints.Checkpoint, SamplingPlan]:
    """``(checkpoint, plan)``: :func:`load_for_sampling` of ``path`` (a distillation run's
    round chosen by the plan's steps) and ``plan`` resolved for it
    (:func:`~diffusion_jax.plans.for_checkpoint`, ``defaults`` filling what it leaves open)."""
    if isinstance(plan, SamplingPlan):
        steps = plan.steps
    else:
        steps = {**defaults, **(plan or {})}.get("steps")
    ckpt = load_for_sampling(path, steps)
    return ckpt, plans.for_checkpoint(ckpt, plan, **defaults)


def sample_to_files(
    workdir: str,
    plan: SamplingPlan | dict | None = None,
    *,
    labels=None,
    per_class: int | None = None,
    seed: int = 0,
    frames: int = 20,
    out: str | None = None,
    overwrite: bool = False,
    batch_size: int = BATCH_SIZE,
) -> dict[str, str]:
    """Sample a checkpoint with ``plan`` (a plan, a dict of ``plans.resolve`` keywords such as
    ``{"steps": 4}``, or None: the config's defaults) and write the pictures and an ``.npz``;
    returns {kind: path}.

    Images: ``*_grid.png`` (one row per class), ``*_reverse.gif`` (``frames`` snapshots of the
    chain) and ``*_samples.npz`` (uint8 images, labels, settings). 2-D data: ``*_toy2d.png``
    (the full-length ancestral chain next to the plan's sampler, against the data) and the
    ``.npz``. File names record step, the plan (:meth:`SamplingPlan.tag`), w and seed; existing
    files are never replaced unless ``overwrite``. At most ``batch_size`` samples are drawn at
    once (see :func:`generate`); a name of more samples than that also records the batch size,
    on which they then depend.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    ckpt, plan = open_checkpoint(workdir, plan)
    config, data_shape = ckpt.config, ckpt.data_shape
    is_2d = len(data_shape) == 1
    if not is_2d and frames < 2:
        raise ValueError(f"--frames must be >= 2 (the GIF shows noise to samples), got {frames}")
    name = f"step{ckpt.step}_{plan.tag()}_w{plan.w:g}_seed{seed}"
    if labels is None:
        per_class = (400 if is_2d else 8) if per_class is None else per_class
        if per_class < 1:
            raise ValueError(f"--per_class must be >= 1, got {per_class}")
        labels = np.repeat(np.arange(config.num_classes), per_class)
    else:
        labels = np.asarray(labels)
        samplers.check_labels(labels, config.num_classes)
        if labels.size == 0:
            raise ValueError("--labels is empty")
        # explicit labels get a short tag, so different label sets never share a file name
        name += "_labels" + hashlib.sha1(labels.astype(np.int64).tobytes()).hexdigest()[:6]
    labels = labels.astype(np.int32)
    if len(labels) > batch_size:
        name += f"_batch{batch_size}"

    kinds = ("toy2d", "samples") if is_2d else ("grid", "reverse", "samples")
    ext = {"grid": "png", "toy2d": "png", "reverse": "gif", "samples": "npz"}
    folder = out or outputs.default_folder(workdir, "samples")
    paths = outputs.prepare(outputs.named(folder, name, {k: ext[k] for k in kinds}), overwrite)

    key = jax.random.PRNGKey(seed)
    result = generate(
        *ckpt[:4],
        labels,
        key,
        plan,
        num_snapshots=0 if is_2d else min(frames, plan.steps + 1),
        snapshot_rows=None if is_2d else gif_selection(labels),
        batch_size=batch_size,
        timed=True,
    )
    logger.info(
        f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
        f"{len(labels)} samples, {plan.solver} {plan.steps} steps, w={plan.w:g}: "
        f"compile {result.timing.compile_s:.1f} s, sampling {result.timing.sample_s:.2f} s"
    )
    samples = np.asarray(result.samples)
    if not np.all(np.isfinite(samples)):
        raise ValueError(
            f"{np.sum(~np.isfinite(samples))} sample values are NaN or infinite, so nothing was "
            f"written. {_nonfinite_causes(config, plan)}"
            f"If the settings are the run's defaults, the parameters of {workdir!r} step "
            f"{ckpt.step} give non-finite outputs (a diverged run?): sample from an earlier "
            f"checkpoint with --workdir {os.path.join(checkpoints.resolve(workdir)[0], 'STEP')}."
        )

    with outputs.staged(paths, overwrite) as tmp:  # the .npz (last in paths) moves last
        _write_outputs(tmp, ckpt, plan, labels, key, result, seed, batch_size)
    for path in paths.values():
        logger.info(f"wrote {path}")
    return paths


GIF_PER_CLASS = 10  # the GIF's row per class: 100 per class made a 35 MB GIF


def gif_selection(labels, per_class: int = GIF_PER_CLASS) -> np.ndarray:
    """Indices of the samples a GIF shows, class by class: the first ``per_class`` of each
    class (labels (N,) ints -> indices (M,), M <= per_class * classes)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    rank = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])
    return order[rank < per_class]


def _nonfinite_causes(config, plan: SamplingPlan) -> str:
    """A sentence naming the choices of ``plan`` that differ from the run's own and can make
    samples non-finite (large guidance, eta, no x0 clipping, another solver or grid), or ''."""
    unusual = []
    if plan.w > max(4.0, 2 * config.guidance):
        unusual.append(f"--w {plan.w:g}")
    if plan.eta > 0:
        unusual.append(f"--eta {plan.eta:g}")
    if plan.x0 == "none":
        unusual.append("--x0 none")
    if plan.timesteps is not None:
        unusual.append(f"--timesteps {','.join(map(str, plan.timesteps))}")
    elif plan.solver != config.sampler or plan.spacing != solvers.get(plan.solver).spacing:
        unusual.append(f"--sampler {plan.solver} --steps {plan.steps} ({plan.spacing} spacing)")
    if not unusual:
        return ""
    return f"These settings may cause it: {', '.join(unusual)}; try the run's defaults. "


def _write_outputs(paths, ckpt, plan: SamplingPlan, labels, key, result, seed, batch_size):
    """The files of :func:`sample_to_files` (each written under a temporary name first)."""
    config, data_shape = ckpt.config, ckpt.data_shape
    samples = np.asarray(result.samples)
    T = config.num_timesteps
    if len(data_shape) == 1:
        # the reference is the full ancestral chain: all T steps, so uniform spacing (the
        # few-step sampler's spacing, e.g. dpmpp2m's logsnr, cannot place T steps)
        reference = plan.replace(solver="ddpm", steps=T, spacing="uniform", timesteps=None, eta=0)
        full = generate(*ckpt[:4], labels, key, reference, batch_size=batch_size).samples
        real = datasets.load_dataset(config).test_x[: len(labels)]
        panels = {f"ancestral, {T} steps": np.asarray(full)}
        panels[f"{plan.solver}, {plan.steps} steps"] = samples
        images.save_toy2d_plot(real, panels, paths["toy2d"])
    else:
        images.save_grid(samples, labels, paths["grid"], null_label=config.null_label)
        shown = gif_selection(labels)
        per_row = max(int(np.sum(labels[shown] == c)) for c in set(labels.tolist()))
        if len(shown) < len(labels):
            logger.info(
                f"the GIF shows the first {per_row} samples of each class ({len(shown)} of "
                f"{len(labels)}); the grid and the .npz hold them all"
            )
        # (generate kept only the snapshots of the samples shown)
        images.save_gif(np.asarray(result.snapshots), paths["reverse"], per_row=per_row)
    # the choices away from their defaults are recorded too (an .npz cannot hold None)
    extra = {}
    if plan.timesteps is not None:
        extra["timesteps"] = plan.timesteps
    if plan.x0 != "clip":
        extra["x0"] = plan.x0
    if plan.guidance_interval is not None:
        extra["guidance_interval"] = plan.guidance_interval
    if plan.guidance_schedule != "constant":
        extra["guidance_schedule"] = plan.guidance_schedule
    images.save_npz(
        paths["samples"],
        samples,
        labels,
        w=plan.w,
        sampler=plan.solver,
        steps=plan.steps,
        spacing=plan.spacing,
        eta=plan.eta,
        seed=seed,
        step=ckpt.step,
        **extra,
    )
