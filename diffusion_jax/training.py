"""Training: Optax optimiser with a parameter EMA, several steps per dispatch, Orbax resume.

:func:`train` is what ``train.py`` runs. Everything random derives from ``config.seed`` by
``fold_in``: the initial parameters, each epoch's data order (from the epoch number) and each
step's noise, timesteps and label dropout (from the step number). A run that is interrupted and
resumed therefore computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from diffusion_jax import checkpoints, data, losses, models, sharding
from diffusion_jax import config as config_lib
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.schedules import make_schedule


class ConfigConflictError(ValueError):
    """A workdir's saved config differs from the requested one."""


class TrainingDivergedError(RuntimeError):
    """The loss stayed non-finite for too many consecutive steps."""


@struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: the number of optimizer steps taken
    params: Any
    opt_state: Any
    ema_params: Any


class TrainResult(NamedTuple):
    state: TrainState
    config: config_lib.Config
    interrupted: bool


def learning_rate(config) -> optax.Schedule:
    """Linear warm-up to ``config.lr``, then cosine decay to lr / 10 at ``num_steps``.

    The warm-up is shortened to leave at least one decay step in runs shorter than it.
    """
    warmup = min(config.warmup_steps, config.num_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(config.num_steps, warmup + 1),
        end_value=config.lr / 10,
    )


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping and AdamW; non-finite updates are skipped (and counted)."""
    opt = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(learning_rate(config), weight_decay=config.weight_decay),
    )
    # The training loop stops long before this many consecutive skips are reached.
    return optax.apply_if_finite(opt, max_consecutive_errors=2**30)


def ema_decay_at(step, decay: float):
    """EMA decay with a warm-up, min(decay, (1 + step) / (10 + step)), so short runs are usable."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def init_state(config, model, optimizer, example_shape) -> TrainState:
    params = models.init_params(
        model, jax.random.fold_in(jax.random.PRNGKey(config.seed), 0), example_shape
    )
    return TrainState(
        step=jnp.int32(0),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
    )


def make_train_steps(config, mesh=None, num_shards: int = 1):
    """A jitted ``fn(state, train_x, train_y, num_steps) -> (state, metric_sums)``.

    Runs ``num_steps`` (a traced int: any count reuses the same program) optimizer steps on
    device-resident data inside one ``lax.fori_loop``. ``metric_sums`` maps each of
    :func:`step_metrics`' names to the sum of its values over those steps (``"loss"``: the sum
    of their losses), so a logged value is a mean over the steps since the last record.
    ``train_x`` (D, M, ...) and ``train_y`` (D, M) hold, on each of the mesh's D devices, the M
    examples of that device's data shard (:func:`device_data`); each step takes an equal part of
    the batch from every shard, and each device gathers its slice of the batch from its own rows.
    Cached per config (its mathematical fields), mesh and shard count, so a resumed run in the
    same process reuses the compiled program.
    """
    mesh = mesh or sharding.data_mesh()
    sharding.check_num_shards(num_shards, mesh)
    return _make_train_steps(config_lib.math_part(config), mesh, num_shards)


def device_data(dataset: data.Dataset, mesh, num_shards: int):
    """``(train_x, train_y)`` as (D, M, ...) and (D, M) global arrays for :func:`make_train_steps`:
    the training set split into ``num_shards`` shards (:func:`data.shard_rows`), each device
    holding its shard's M = N // num_shards examples. Each process builds only its devices' rows."""
    n = dataset.train_x.shape[0]

    def rows(s):
        return data.shard_rows(n, s, num_shards)

    return (
        sharding.put_sharded_rows(dataset.train_x, mesh, num_shards, rows),
        sharding.put_sharded_rows(dataset.train_y.astype(np.int32), mesh, num_shards, rows),
    )


def step_metrics(loss, grads) -> dict[str, jnp.ndarray]:
    """What one optimizer step reports: float32 scalars by name. A new metric is one entry here
    (metrics.jsonl, the progress bar and TensorBoard pick it up)."""
    return {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.lru_cache(maxsize=8)
def _make_train_steps(config, mesh, num_shards):
    model, optimizer = models.build_model(config), make_optimizer(config)
    schedule = make_schedule(config.schedule, config.num_timesteps)
    denoise = models.denoiser(model, train=True)
    base = jax.random.PRNGKey(config.seed)
    data_key, step_key = jax.random.fold_in(base, 1), jax.random.fold_in(base, 2)
    batched = sharding.batch_sharded(mesh)

    def one_step(state: TrainState, train_x, train_y):
        key = jax.random.fold_in(step_key, state.step)
        key_loss, key_dropout = jax.random.split(key)
        # (S, B/S) indices into each shard -> (D, B/D): shard s's part split over its devices.
        # Device d gathers from its own rows, so no example crosses devices.
        idx = data.shard_batch_indices(
            data_key, state.step, train_x.shape[1], config.batch_size, num_shards
        ).reshape(train_x.shape[0], -1)
        idx = jax.lax.with_sharding_constraint(idx, batched)
        # The batch is split over the mesh; the (replicated) parameters' gradients are then
        # all-reduced by XLA. The random draws do not depend on the split (partitionable
        # threefry), so with one shard any device count computes the same losses up to
        # summation order.
        x0, y0 = (
            jax.lax.with_sharding_constraint(
                jax.vmap(lambda rows, i: rows[i])(a, idx).reshape(-1, *a.shape[2:]), batched
            )
            for a in (train_x, train_y)
        )

        def loss_fn(params):
            loss, _ = losses.diffusion_loss(
                denoise,
                params,
                schedule,
                key_loss,
                x0,
                y0,
                null_label=config.null_label,
                prediction=config.prediction,
                loss_type=config.loss_type,
                weighting=config.weighting,
                min_snr_gamma=config.min_snr_gamma,
                p_uncond=config.p_uncond,
                rngs={"dropout": key_dropout},
            )
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, config.ema_decay)
        ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
        # A skipped (non-finite) update must not move the EMA toward the unchanged parameters
        # either: a skipped step leaves parameters, EMA and optimiser state as they were.
        ema = jax.tree_util.tree_map(
            lambda new, old: jnp.where(opt_state.last_finite, new, old), ema, state.ema_params
        )
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        return new, step_metrics(loss, grads)

    if config.steps_per_dispatch == 1:
        # XLA:CPU runs convolution gradients inside a while loop ~25x slower than the same
        # gradients in straight-line code (measured here on jax 0.10.2: 58 s vs 2.2 s per step
        # of the cpu preset), so one step per dispatch compiles without a loop. The count
        # argument is then always 1.
        @jax.jit
        def train_steps(state, train_x, train_y, num_steps):
            return one_step(state, train_x, train_y)

    else:

        @jax.jit
        def train_steps(state, train_x, train_y, num_steps):
            def body(_, carry):
                state, sums = carry
                state, values = one_step(state, train_x, train_y)
                return state, jax.tree_util.tree_map(jnp.add, sums, values)

            # (the metrics' structure, from a trace that runs nothing)
            shapes = jax.eval_shape(one_step, state, train_x, train_y)[1]
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            return jax.lax.fori_loop(0, num_steps, body, (state, zeros))

    return train_steps


def resolve_config(saved, preset, overrides, allow_config_change=False) -> config_lib.Config:
    """The config of a run: a fresh one from ``preset`` + ``overrides``, or, when resuming, the
    ``saved`` one with ``overrides`` applied. A change of a field that alters the training
    mathematics raises ConfigConflictError unless ``allow_config_change``."""
    if saved is None:
        return config_lib.get_config(preset or "mnist", **overrides)
    if preset is not None:
        requested = config_lib.get_config(preset, **overrides)
    else:
        requested = dataclasses.replace(saved, **overrides).validate()
    diffs = config_lib.differences(saved, requested)
    if diffs and not allow_config_change:
        lines = "\n".join(f"  {k}: saved {a!r}, requested {b!r}" for k, (a, b) in diffs.items())
        raise ConfigConflictError(
            f"the workdir's saved config differs from the requested one:\n{lines}\n"
            "Resume without these flags, use a new --workdir, or pass --allow_config_change "
            "to continue with the new values."
        )
    return requested


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between dispatches.

    With several processes the loop acts on a signal only through :meth:`agree`, which every
    process calls after every dispatch: a checkpoint is a collective operation, so all of them
    must stop at the same step, whichever of them received the signal.
    """

    def __init__(self):
        self.signal = None  # what the loop acts on
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum
        if jax.process_count() == 1:
            self.signal = signum

    def agree(self) -> None:
        """Set ``signal`` if any process has received one (a collective: call on all)."""
        if jax.process_count() > 1:
            signals = sharding.all_processes(self.received or 0)
            if np.any(signals):
                self.signal = int(np.max(signals))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _tensorboard(workdir: str):
    """A TensorBoard writer if one is installed (tensorboardX), else None."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def train(
    workdir: str,
    *,
    preset: str | None = None,
    overrides: dict | None = None,
    allow_config_change: bool = False,
    dataset: data.Dataset | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    log=print,
    data_shards: int | None = None,
) -> TrainResult:
    """Train (or resume) the run in ``workdir``.

    Args:
      workdir: folder for checkpoints, ``metrics.jsonl`` and sample grids. If it holds a
        checkpoint, training resumes from the latest one.
      preset, overrides: the config (see :func:`resolve_config`).
      allow_config_change: resume even if the config's mathematics changed.
      dataset: use this data instead of loading ``config.dataset`` (tests, custom data).
      stop_after: behave as if interrupted once this many steps are done (tests).
      progress: show a progress bar.
      log: where to print messages.
      data_shards: split the training set into this many shards, each held by an equal block
        of devices (default: one per process, so each process holds only its own shard). The
        data order depends on it; with one shard it does not depend on the device count.

    With several processes (:func:`sharding.initialize_distributed`) every process calls this
    with the same arguments; only process 0 takes the workdir lock and writes logs, metrics,
    sample grids and ``config.json``, while all of them take part in the Orbax checkpoints.

    Returns:
      A :class:`TrainResult`; ``interrupted`` is True if a signal (or ``stop_after``) ended the
      run early, after a checkpoint was written.
    """
    workdir = os.path.abspath(workdir)
    workdir_lib.check_workdir(workdir)
    if not os.path.isdir(os.path.join(workdir, checkpoints.SUBDIR)):
        # A new run: a config that cannot be trained (e.g. sample_steps > num_timesteps) is
        # refused before the lock creates the folder, so no empty workdir is left behind.
        config_lib.get_config(preset or "mnist", **(overrides or {}))
    main = sharding.is_main_process()
    if not main:
        log, progress = (lambda *a, **k: None), False
    num_shards = jax.process_count() if data_shards is None else data_shards
    with workdir_lib.run_lock(workdir):
        return _train(
            workdir,
            preset,
            overrides,
            allow_config_change,
            dataset,
            stop_after,
            progress,
            log,
            num_shards,
        )


def _train(
    workdir, preset, overrides, allow_config_change, dataset, stop_after, progress, log, num_shards
):
    ckpt_dir = os.path.join(workdir, checkpoints.SUBDIR)
    saved, saved_step, mngr = None, None, None
    # (process 0's view, so that every process restores the same step or none)
    if sharding.same_on_all_processes(os.path.isdir(ckpt_dir)):
        mngr = checkpoints.manager(ckpt_dir)
        saved_step = sharding.same_on_all_processes(
            -1 if mngr.latest_step() is None else mngr.latest_step()
        )
        saved_step = None if saved_step < 0 else saved_step
        if saved_step is not None:
            saved, _ = checkpoints.read_meta(mngr, ckpt_dir, saved_step)
    config = resolve_config(saved, preset, overrides or {}, allow_config_change)
    if mngr is not None:
        mngr.close()
    if dataset is None:
        dataset = data.load_dataset(config)
    mesh = sharding.data_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_num_shards(num_shards, mesh)
    if config.batch_size > dataset.train_x.shape[0] // num_shards * num_shards:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {dataset.train_x.shape[0]} training "
            f"examples of {dataset.name}"
            + (f" (in {num_shards} equal shards)" if num_shards > 1 else "")
        )

    model = models.build_model(config)
    optimizer = make_optimizer(config)
    state = init_state(config, model, optimizer, (1, *dataset.train_x.shape[1:]))
    # Replicated on every device of the mesh, before a restore so that Orbax restores into this
    # placement (global arrays when there are several processes). Fresh and restored states get
    # the same placement, so resuming in the same process does not compile the step again.
    state = sharding.replicate(state, mesh)
    mngr = checkpoints.manager(ckpt_dir, keep_every=config.keep_every)
    if saved_step is not None:
        restored, ema = checkpoints.restore_train(
            mngr,
            ckpt_dir,
            saved_step,
            {"step": state.step, "params": state.params, "opt_state": state.opt_state},
            state.ema_params,
        )
        state = TrainState(ema_params=ema, **restored)
        log(f"resumed {workdir} at step {int(state.step)}")
    start = int(state.step)
    if start >= config.num_steps:
        log(f"{workdir} is already trained to step {start} (num_steps={config.num_steps})")
        mngr.close()
        return TrainResult(state, config, False)

    train_steps = make_train_steps(config, mesh, num_shards)
    train_x, train_y = device_data(dataset, mesh, num_shards)
    main = sharding.is_main_process()
    if main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_lib.to_dict(config), f, indent=1)

    events = [config.log_every, config.checkpoint_every, config.sample_every]
    end = config.num_steps if stop_after is None else min(config.num_steps, stop_after)
    grid_fn = _sample_grid_fn(config, model, dataset, mesh) if config.sample_every else None
    metrics = _MetricsLog(workdir, config, start, progress, write=main)
    step, interrupted, streak = start, False, 0
    cpu_collectives = jax.local_device_count() > 1 and jax.local_devices()[0].platform == "cpu"
    try:
        with _StopFlag() as stop:
            # (logged once signals are caught, so a Ctrl-C from here on writes a checkpoint)
            log(
                f"training {config.model} on {dataset.name} ({len(dataset.train_x)} examples) "
                f"on {jax.devices()[0].platform}, {start} -> {config.num_steps} steps"
            )
            while step < end:
                # Chunks end on every logging/checkpoint/sample boundary, so those are exact.
                n = min(config.steps_per_dispatch, end - step, *[e - step % e for e in events if e])
                state, sums = train_steps(state, train_x, train_y, n)
                if cpu_collectives:
                    # XLA:CPU deadlocks in the all-reduce when many dispatches of a multi-device
                    # program are queued (jax 0.10.2, 2 virtual devices, ~50 dispatches in), so
                    # each dispatch finishes before the next is queued.
                    jax.block_until_ready(sums)
                step += n
                metrics.add(n, sums)
                if step % config.log_every == 0 or step == end:
                    skipped = metrics.write(step, state.opt_state.notfinite_count)
                    if skipped >= config.max_nonfinite_steps:
                        raise TrainingDivergedError(
                            f"the loss was non-finite for {skipped} consecutive steps up to step "
                            f"{step}; those updates were skipped and nothing was saved after the "
                            f"last good checkpoint ({mngr.latest_step()}). Lower --lr, check the "
                            "data for NaNs, or try --grad_clip with a smaller value."
                        )
                if grid_fn is not None and step % config.sample_every == 0:
                    grid_fn(
                        state.ema_params, os.path.join(workdir, "samples", f"step_{step:07d}.png")
                    )
                stop.agree()
                stopping = stop.signal is not None or (stop_after is not None and step >= end)
                streak = 0
                if step % config.checkpoint_every == 0 or step == config.num_steps or stopping:
                    # Inside a streak of skipped (non-finite) updates nothing is saved, so the
                    # last good checkpoint is never rotated away by copies of a diverging run.
                    streak = int(state.opt_state.notfinite_count)
                    if streak == 0:
                        checkpoints.save(
                            mngr,
                            step,
                            {
                                "step": state.step,
                                "params": state.params,
                                "opt_state": state.opt_state,
                            },
                            state.ema_params,
                            config,
                            dataset.train_x.shape[1:],
                        )
                    else:
                        log(
                            f"step {step}: not saved: the last {streak} updates were non-finite "
                            f"and skipped (last good checkpoint: {mngr.latest_step()})"
                        )
                if stop.signal is not None:
                    interrupted = True
                    log(
                        f"\nstopped by signal {stop.signal} at step {step}; "
                        + ("checkpoint written" if streak == 0 else "nothing saved")
                    )
                    break
            if step == config.num_steps and streak:
                raise TrainingDivergedError(
                    f"the run reached step {step} inside a streak of {streak} non-finite "
                    f"(skipped) updates; nothing was saved after the last good checkpoint "
                    f"({mngr.latest_step()}). Lower --lr, check the data for NaNs, or try "
                    "--grad_clip with a smaller value, then resume."
                )
    finally:
        metrics.close()
        mngr.wait_until_finished()  # asynchronous saves are complete before we return
        mngr.close()
    return TrainResult(state, config, interrupted or step < config.num_steps)


def _drop_records_after(path: str, step: int) -> None:
    """Keep only the records of steps <= ``step`` (the checkpoint a resumed run starts from):
    records written after it by an interrupted run are about to be written again."""
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a crash
    if len(keep) != len(lines):
        from diffusion_jax import images

        with images.written(path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)


class _MetricsLog:
    """metrics.jsonl (+ TensorBoard, + progress bar). Losses stay on the device until a write."""

    def __init__(self, workdir: str, config, start: int, progress: bool, write: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl") if write else None
        if self.path is not None and os.path.exists(self.path):
            _drop_records_after(self.path, start)
        self.config = config
        self.bar = _progress(config.num_steps, start, progress and write)
        self.writer = _tensorboard(workdir) if write else None
        self.pending, self.last_step, self.last_time = [], start, time.perf_counter()

    def add(self, num_steps: int, sums: dict) -> None:
        self.pending.append(sums)
        if self.bar is not None:
            self.bar.update(num_steps)

    def write(self, step: int, notfinite_count) -> int:
        """Append one record; returns the count of consecutive skipped (non-finite) updates."""
        now = time.perf_counter()
        n = step - self.last_step
        rate = n / (now - self.last_time)
        record = {
            "step": step,
            **{k: float(sum(p[k] for p in self.pending)) / n for k in self.pending[0]},
            "lr": float(learning_rate(self.config)(step)),
            "steps_per_sec": rate,
            "images_per_sec": rate * self.config.batch_size,
            "nonfinite_skipped": int(notfinite_count),
            "time": time.time(),
        }
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k in ("loss", "grad_norm", "lr", "steps_per_sec"):
                self.writer.add_scalar(k, record[k], step)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.0f}"
            )
        self.pending, self.last_step, self.last_time = [], step, now
        return record["nonfinite_skipped"]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _sample_grid_fn(config, model, dataset, mesh):
    """``fn(ema_params, path)`` writing a class-ordered grid of samples (images only), sampled
    over the mesh by every process and written by process 0."""
    from diffusion_jax import generation, images

    if dataset.train_x.ndim != 4:
        return None

    def write(ema_params, path):
        labels = np.repeat(np.arange(config.num_classes), 8)
        result = generation.generate(
            config,
            model,
            ema_params,
            dataset.train_x.shape[1:],
            labels,
            jax.random.PRNGKey(config.seed + 1),
            mesh=mesh,
        )
        samples = sharding.to_host(result.samples)
        if sharding.is_main_process():
            images.save_grid(samples, labels, path, null_label=config.null_label)

    return write
