"""Sampling from a trained configuration: the sampler settings of a Config, one call."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time

import jax
import numpy as np

from diffusion_jax import checkpoints, models, outputs, samplers, sharding, solvers
from diffusion_jax.schedules import SPACINGS, max_steps, respace

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000  # samples drawn at once by sample.py: 10,000 in one batch took 8.1 GB


def resolve_sampler(
    config,
    method: str | None,
    steps: int | None,
    spacing: str | None,
    x0: str | None = None,
    threshold_quantile: float = solvers.THRESHOLD_QUANTILE,
    **settings,
):
    """``(method, steps, spacing, settings)`` with the defaults filled in and checked.

    method: the config's ``sampler``. steps: the config's ``sample_steps`` when the method is the
    config's own, else the solver's default (all T steps for ``ddpm``). spacing: the one the
    solver is meant for (``Solver.spacing``). ``settings`` are
    :class:`~diffusion_jax.samplers.SamplerSettings` fields; unless they set ``clip`` or
    ``threshold`` themselves, those come from ``x0`` (``solvers.X0_MODES``; default "clip").
    """
    method = config.sampler if method is None else method
    solver = solvers.get(method)
    T = config.num_timesteps
    default_count = steps is None
    if steps is None:
        steps = (
            config.sample_steps if method == config.sampler else solvers.default_steps(method, T)
        )
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(
            f"--steps must be in [1, {T}] (the model was trained with T={T}), got {steps}"
        )
    spacing = solver.spacing if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if default_count:  # a default never asks for more steps than the spacing can place
        steps = min(steps, max_steps(config.schedule, T, spacing))
    if "clip" not in settings and "threshold" not in settings:
        settings.update(solvers.x0_settings(x0 or "clip", threshold_quantile))
    samplers.SamplerSettings(method=method, **settings)  # bad settings fail before any work
    return method, int(steps), spacing, settings


def generate(
    config,
    model,
    params,
    data_shape: tuple[int, ...],
    labels,
    key: jax.Array,
    *,
    w: float | None = None,
    method: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    eta: float = 0.0,
    num_snapshots: int = 0,
    timing: dict | None = None,
    mesh=None,
    batch_size: int | None = None,
    snapshot_rows=None,
    **settings,
) -> samplers.SampleResult:
    """Samples of shape (len(labels), *data_shape) from ``model`` with ``params``.

    ``labels`` are ints in [0, num_classes] (num_classes = unconditional). ``w`` defaults to the
    config's ``guidance``; ``method``, ``steps``, ``spacing`` and further keywords (``x0``,
    ``threshold_quantile``, or :class:`~diffusion_jax.samplers.SamplerSettings` fields such as
    ``variance``, ``clip``, ``threshold``, ``unroll``) as :func:`resolve_sampler`. ``timing`` is
    passed to
    :func:`~diffusion_jax.samplers.sample`. The batch is split over ``mesh`` (default: this
    process's devices, when there are several; in a multi-process program pass a mesh over all
    processes' devices and call this on every process).

    ``batch_size`` bounds the memory: more labels than that are sampled in chunks of
    ``batch_size`` rows (the last one padded, so one program serves them all). Chunk c draws
    its noise from ``fold_in(key, c)`` (chunk 0 from ``key`` itself), so up to ``batch_size``
    samples are those of one batch, and the samples depend on the seed and the batch size.
    ``snapshot_rows`` (indices into ``labels``): keep only these samples' snapshots.
    """
    if mesh is None and jax.local_device_count() > 1:
        mesh = sharding.data_mesh(jax.local_devices())
    method, steps, spacing, settings = resolve_sampler(config, method, steps, spacing, **settings)
    labels = np.asarray(labels)
    n = len(labels)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    size = n if batch_size is None else min(batch_size, n)
    schedule = respace(config.schedule, config.num_timesteps, steps, spacing)
    w = config.guidance if w is None else w

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
            w=w,
            eta=eta,
            method=method,
            prediction=config.prediction,
            num_snapshots=num_snapshots,
            mesh=mesh,
            **settings,
        )

    first = chain(0)
    if size == n:  # one batch: the arrays stay on the device (global arrays with a mesh)
        result = first.run() if timing is None else first.timed(timing)
        if snapshot_rows is None or result.snapshots is None:
            return result
        return result._replace(snapshots=result.snapshots[:, np.asarray(snapshot_rows)])
    compiled, compile_s = first.compile() if timing is not None else (None, 0.0)
    start = time.perf_counter()
    samples, snapshots = [], []
    for c in range(-(-n // size)):
        result = (first if c == 0 else chain(c)).run(compiled)
        rows = np.arange(c * size, min((c + 1) * size, n))
        samples.append(np.asarray(result.samples)[: len(rows)])
        if result.snapshots is not None:
            keep = rows if snapshot_rows is None else np.intersect1d(rows, snapshot_rows)
            snapshots.append(np.asarray(result.snapshots)[:, keep - c * size])
    if timing is not None:
        timing.update(compile_s=compile_s, sample_s=time.perf_counter() - start)
    return samplers.SampleResult(
        np.concatenate(samples), np.concatenate(snapshots, axis=1) if snapshots else None
    )


def x0_mode(settings: dict) -> str:
    """The ``solvers.X0_MODES`` entry that resolved ``clip``/``threshold`` settings amount to."""
    if settings.get("threshold") is not None:
        return "threshold"
    return "none" if settings.get("clip", (-1.0, 1.0)) is None else "clip"


def sampler_tag(method: str, steps: int, spacing: str, eta: float = 0.0, **settings) -> str:
    """A file-name fragment naming every sampler choice that differs from the solver's
    defaults, e.g. ``dpmpp2m20`` or ``ddim50_eta0.5_quadratic_x0threshold``; ``settings`` as
    resolved by :func:`resolve_sampler`."""
    solver = solvers.get(method)
    tag = solver.tag(steps, eta)
    if spacing != solver.spacing:
        tag += f"_{spacing}"
    if settings.get("variance", "small") != "small":
        tag += f"_{settings['variance']}"
    threshold, clip = settings.get("threshold"), settings.get("clip", (-1.0, 1.0))
    mode = x0_mode(settings)
    if mode != "clip":
        tag += f"_x0{mode}"
    if mode == "threshold" and threshold != solvers.THRESHOLD_QUANTILE:
        tag += f"_q{threshold:g}"
    if mode == "clip" and tuple(clip) != (-1.0, 1.0):
        tag += f"_clip{clip[0]:g},{clip[1]:g}"
    return tag


def load_for_sampling(path: str):
    """``(config, model, ema_params, data_shape, step)`` from a workdir or a checkpoint folder.

    Only the EMA parameters are read (not the optimizer state).
    """
    mngr, directory, step, config, data_shape = checkpoints.open_for_sampling(path)
    try:
        model = models.build_model(config)
        target = models.abstract_params(model, (1, *data_shape))
        params = checkpoints.restore_ema(mngr, directory, step, target)
    finally:
        mngr.close()
    return config, model, params, data_shape, step


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed; PermissionError with the reason if it cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write to output folder {folder!r}: {e.strerror}") from e


def sample_to_files(
    workdir: str,
    *,
    labels=None,
    per_class: int | None = None,
    w: float | None = None,
    method: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    eta: float = 0.0,
    seed: int = 0,
    frames: int = 20,
    out: str | None = None,
    overwrite: bool = False,
    batch_size: int = BATCH_SIZE,
    **settings,
) -> dict[str, str]:
    """Sample a checkpoint and write the pictures and an ``.npz``; returns {kind: path}.

    Images: ``*_grid.png`` (one row per class), ``*_reverse.gif`` (``frames`` snapshots of the
    chain) and ``*_samples.npz`` (uint8 images, labels, settings). 2-D data: ``*_toy2d.png``
    (the full-length ancestral chain next to the requested few-step sampler, against the data)
    and the ``.npz``. File names record step, sampler settings, w and seed; existing files are
    never replaced unless ``overwrite``. ``method``, ``steps``, ``spacing`` default as
    :func:`resolve_sampler`; further keywords are :class:`~diffusion_jax.samplers.SamplerSettings`
    fields (``variance``, ``clip``, ``threshold``). At most ``batch_size`` samples are drawn at
    once (see :func:`generate`); a name of more samples than that also records the batch size,
    on which they then depend.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    config, model, params, data_shape, step = load_for_sampling(workdir)
    is_2d = len(data_shape) == 1
    method, steps, spacing, settings = resolve_sampler(config, method, steps, spacing, **settings)
    w = config.guidance if w is None else w
    if not is_2d and frames < 2:
        raise ValueError(f"--frames must be >= 2 (the GIF shows noise to samples), got {frames}")
    name = f"step{step}_{sampler_tag(method, steps, spacing, eta, **settings)}"
    name += f"_w{w:g}_seed{seed}"
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

    out = out or os.path.join(os.path.dirname(checkpoints.resolve(workdir)[0]), "samples")
    stem = os.path.join(out, name)
    kinds = ("toy2d", "samples") if is_2d else ("grid", "reverse", "samples")
    ext = {"grid": "png", "toy2d": "png", "reverse": "gif", "samples": "npz"}
    paths = {k: f"{stem}_{k}.{ext[k]}" for k in kinds}
    outputs.clean_stale(out)  # a killed earlier call's staging folder is not an output
    outputs.check_free(paths, overwrite)
    check_writable(out)

    key = jax.random.PRNGKey(seed)
    timing: dict = {}
    kw = dict(
        w=w, method=method, steps=steps, spacing=spacing, eta=eta, batch_size=batch_size, **settings
    )
    result = generate(
        config,
        model,
        params,
        data_shape,
        labels,
        key,
        num_snapshots=0 if is_2d else min(frames, steps + 1),
        snapshot_rows=None if is_2d else gif_selection(labels),
        timing=timing,
        **kw,
    )
    logger.info(
        f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
        f"{len(labels)} samples, {method} {steps} steps, w={w:g}: "
        f"compile {timing['compile_s']:.1f} s, sampling {timing['sample_s']:.2f} s"
    )
    samples = np.asarray(result.samples)
    if not np.all(np.isfinite(samples)):
        raise ValueError(
            f"{np.sum(~np.isfinite(samples))} sample values are NaN or infinite, so nothing was "
            f"written. {_nonfinite_causes(config, w, method, steps, spacing, eta, settings)}"
            f"If the settings are the run's defaults, the parameters of {workdir!r} step {step} "
            "give non-finite outputs (a diverged run?): sample from an earlier checkpoint with "
            f"--workdir {os.path.join(checkpoints.resolve(workdir)[0], 'STEP')}."
        )

    with outputs.staged(paths, overwrite) as tmp:  # the .npz (last in paths) moves last
        _write_outputs(tmp, config, model, params, data_shape, labels, key, kw, result, step, seed)
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


def _nonfinite_causes(config, w, method, steps, spacing, eta, settings) -> str:
    """A sentence naming the sampler settings of this call that differ from the run's own and
    can make samples non-finite (large guidance, eta, no x0 clipping), or ''."""
    unusual = []
    if w > max(4.0, 2 * config.guidance):
        unusual.append(f"--w {w:g}")
    if eta > 0:
        unusual.append(f"--eta {eta:g}")
    if x0_mode(settings) == "none":
        unusual.append("--x0 none")
    if method != config.sampler or spacing != solvers.get(method).spacing:
        unusual.append(f"--sampler {method} --steps {steps} ({spacing} spacing)")
    if not unusual:
        return ""
    return f"These settings may cause it: {', '.join(unusual)}; try the run's defaults. "


def _write_outputs(paths, config, model, params, data_shape, labels, key, kw, result, step, seed):
    """The files of :func:`sample_to_files` (each written under a temporary name first)."""
    from diffusion_jax import data, images

    samples = np.asarray(result.samples)
    T, method, steps = config.num_timesteps, kw["method"], kw["steps"]
    if len(data_shape) == 1:
        # the reference is the full ancestral chain: all T steps, so uniform spacing (the
        # few-step sampler's spacing, e.g. dpmpp2m's logsnr, cannot place T steps)
        reference = dict(kw, method="ddpm", steps=T, spacing="uniform", eta=0.0)
        full = np.asarray(
            generate(config, model, params, data_shape, labels, key, **reference).samples
        )
        real = data.load_dataset(config).test_x[: len(labels)]
        images.save_toy2d_plot(
            real,
            {f"ancestral, {T} steps": full, f"{method}, {steps} steps": samples},
            paths["toy2d"],
        )
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
    images.save_npz(
        paths["samples"],
        samples,
        labels,
        w=kw["w"],
        sampler=method,
        steps=steps,
        spacing=kw["spacing"],
        eta=kw["eta"],
        seed=seed,
        step=step,
    )
