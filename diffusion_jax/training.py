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
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from diffusion_jax import checkpoints, data, dispatch, hooks, losses, models, runs, sharding
from diffusion_jax import config as config_lib
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.optimization import ema_decay_at, learning_rate, make_optimizer
from diffusion_jax.schedules import make_schedule

logger = logging.getLogger(__name__)
# (raised by train; defined with the run resolution)
ConfigConflictError = runs.ConfigConflictError


# A dispatch's wall time is kept near this (its step count adapts from measured step times),
# so a stop signal is acted on within about this long even on a slow CPU; on a GPU a dispatch of
# steps_per_dispatch steps is far shorter and the cap never binds.


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


def init_state(config, model, example_shape) -> TrainState:
    """The step-0 state for inputs of ``example_shape`` = (B, ...): parameters, the optimiser
    state of :func:`make_optimizer` and the EMA copy, computed by one jitted program (built
    piecewise, they took some 55 small compiles before the first step)."""
    model.check_input_shape(example_shape)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    x = jnp.zeros(example_shape, jnp.float32)
    t = jnp.zeros(example_shape[:1], jnp.int32)
    return _init_program(config_lib.math_part(config), model)(key, x, t)


@functools.lru_cache(maxsize=8)
def _init_program(config, model):
    optimizer = make_optimizer(config)

    @jax.jit
    def init(key, x, t):
        params = model.init(key, x, t, t)["params"]
        return TrainState(
            step=jnp.int32(0),
            params=params,
            opt_state=optimizer.init(params),
            ema_params=jax.tree_util.tree_map(jnp.copy, params),
        )

    return init


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

            # The metrics' structure, from step_metrics alone: tracing one_step for it would
            # trace the whole step a second time.
            loss = jax.ShapeDtypeStruct((), jnp.float32)
            shapes = jax.eval_shape(step_metrics, loss, state.params)
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            return jax.lax.fori_loop(0, num_steps, body, (state, zeros))

    return train_steps


def train(
    workdir: str,
    *,
    preset: str | None = None,
    overrides: dict | None = None,
    allow_config_change: bool = False,
    dataset: data.Dataset | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    tensorboard: bool = True,
    data_shards: int | None = None,
) -> TrainResult:
    """Train (or resume) the run in ``workdir``.

    Args:
      workdir: folder for checkpoints, ``metrics.jsonl`` and sample grids. If it holds a
        checkpoint, training resumes from the latest one.
      preset, overrides: the config (see :func:`runs.resolve_config`).
      allow_config_change: resume even if the config's mathematics changed.
      dataset: use this data instead of loading ``config.dataset`` (tests, custom data).
      stop_after: behave as if interrupted once this many steps are done (tests).
      progress: show a progress bar.
      tensorboard: also write the metrics for TensorBoard (``workdir/tensorboard``).
      data_shards: split the training set into this many shards, each held by an equal block
        of devices (default: one per process, so each process holds only its own shard). The
        data order depends on it; with one shard it does not depend on the device count.

    Messages go to the ``diffusion_jax.training`` logger. With several processes
    (:func:`sharding.initialize_distributed`) every process calls this with the same
    arguments; only process 0 takes the workdir lock and writes logs, metrics, sample grids and
    ``config.json``, while all of them take part in the Orbax checkpoints.

    Returns:
      A :class:`TrainResult`; ``interrupted`` is True if a signal (or ``stop_after``) ended the
      run early, after a checkpoint was written.
    """
    workdir = os.path.abspath(workdir)
    workdir_lib.check_workdir(workdir)
    if tensorboard:
        hooks.require_tensorboard()  # before anything is written
    if not os.path.isdir(os.path.join(workdir, checkpoints.SUBDIR)):
        # A new run: a config that cannot be trained (e.g. sample_steps > num_timesteps) is
        # refused before the lock creates the folder, so no empty workdir is left behind.
        config_lib.get_config(preset or "mnist", **(overrides or {}))
    num_shards = jax.process_count() if data_shards is None else data_shards
    with workdir_lib.run_lock(workdir):
        run = runs.resolve_run(
            workdir,
            preset=preset,
            overrides=overrides or {},
            allow_config_change=allow_config_change,
            dataset=dataset,
            stop_after=stop_after,
            num_shards=num_shards,
        )
        return _train(run, progress=progress and run.is_main, tensorboard=tensorboard)


def _say(run: runs.Run, message: str) -> None:
    if run.is_main:
        logger.info(message)


def _initial_state(run: runs.Run, model, mngr) -> TrainState:
    """A fresh state, or the one of the run's saved step, replicated over the mesh."""
    config = run.config
    state = init_state(config, model, (1, *run.dataset.train_x.shape[1:]))
    # Replicated on every device of the mesh, before a restore so that Orbax restores into this
    # placement (global arrays when there are several processes). Fresh and restored states get
    # the same placement, so resuming in the same process does not compile the step again.
    state = sharding.replicate(state, run.mesh)
    if run.saved_step is None:
        return state
    restored, ema = checkpoints.restore_train(
        mngr, run.checkpoint_dir, run.saved_step, _saved_part(state), state.ema_params
    )
    _say(run, f"resumed {run.workdir} at step {run.saved_step}")
    return TrainState(ema_params=ema, **restored)


def _saved_part(state: TrainState) -> dict:
    """What a checkpoint holds besides the EMA parameters (saved on their own)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _diverged(step, streak, last_good, during_run: bool) -> TrainingDivergedError:
    """The error of a run whose updates stayed non-finite (``during_run``: the streak reached
    ``max_nonfinite_steps``; else the run ended inside a streak)."""
    where = (
        f"the loss was non-finite for {streak} consecutive steps up to step {step}; those "
        "updates were skipped and nothing was saved after the last good checkpoint"
        if during_run
        else f"the run reached step {step} inside a streak of {streak} non-finite (skipped) "
        "updates; nothing was saved after the last good checkpoint"
    )
    return TrainingDivergedError(
        f"{where} ({last_good}). Lower --lr, check the data for NaNs, or try --grad_clip with a "
        "smaller value" + ("." if during_run else ", then resume.")
    )


def _last_good(mngr) -> str:
    """Where the last good checkpoint is, for a message (there may be none yet)."""
    step = mngr.latest_step()
    if step is None:
        return "none: no checkpoint has been saved yet, so a new run starts from step 0"
    return f"step {step}"


def _grid_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "samples", f"step_{step:07d}.png")


def _checkpoint(run: runs.Run, mngr, step: int, state: TrainState) -> int:
    """Save ``state`` as step ``step`` unless the last updates were skipped as non-finite: inside
    such a streak nothing is saved, so the last good checkpoint is never rotated away by copies
    of a diverging run. Returns the streak's length (0: saved)."""
    streak = int(state.opt_state.notfinite_count)
    if streak == 0:
        checkpoints.save(
            mngr,
            step,
            _saved_part(state),
            state.ema_params,
            run.config,
            run.dataset.train_x.shape[1:],
        )
    else:
        _say(
            run,
            f"step {step}: not saved: the last {streak} updates were non-finite and skipped "
            f"(last good checkpoint: {_last_good(mngr)})",
        )
    return streak


def _train(run: runs.Run, *, progress: bool, tensorboard: bool) -> TrainResult:
    model = models.build_model(run.config)
    mngr = checkpoints.manager(run.checkpoint_dir, keep_every=run.config.keep_every)
    try:
        state = _initial_state(run, model, mngr)
        if int(state.step) >= run.config.num_steps:
            _say(
                run,
                f"{run.workdir} is already trained to step {int(state.step)} "
                f"(num_steps={run.config.num_steps})",
            )
            return TrainResult(state, run.config, False)
        return _loop(run, model, mngr, state, progress=progress, tensorboard=tensorboard)
    finally:
        mngr.wait_until_finished()  # asynchronous saves are complete before we return
        mngr.close()


def _loop(run: runs.Run, model, mngr, state, *, progress, tensorboard) -> TrainResult:
    """Train from ``state`` to ``run.end``, checkpointing into ``mngr``."""
    config, workdir, start = run.config, run.workdir, int(state.step)
    per_dispatch = dispatch.loop_steps(config, run.mesh)
    train_steps = make_train_steps(
        dataclasses.replace(config, steps_per_dispatch=per_dispatch), run.mesh, run.num_shards
    )
    train_x, train_y = device_data(run.dataset, run.mesh, run.num_shards)
    if run.is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_lib.to_dict(config), f, indent=1)

    events = [config.log_every, config.checkpoint_every, config.sample_every]
    grids = (
        hooks.sample_grid_writer(config, model, run.dataset.train_x.shape[1:], run.mesh)
        if config.sample_every
        else None
    )
    window = hooks.MetricsWindow(start, learning_rate(config), config.batch_size)
    sinks = []
    step, interrupted, streak = start, False, 0
    # The first dispatch is one step; later ones as many as fit in dispatch.SECONDS.
    cap = 1
    try:
        if run.is_main:
            sinks = hooks.sinks(
                workdir, start, config.num_steps, progress=progress, tensorboard=tensorboard
            )
        with hooks.StopFlag() as stop:
            # (logged once signals are caught, so a Ctrl-C from here on writes a checkpoint)
            _say(
                run,
                f"training {config.model} on {run.dataset.name} ({len(run.dataset.train_x)} "
                f"examples) on {jax.devices()[0].platform}, {start} -> {config.num_steps} steps",
            )
            while step < run.end:
                # Chunks end on every logging/checkpoint/sample boundary, so those are exact.
                n = min(
                    cap,
                    per_dispatch,
                    run.end - step,
                    *[e - step % e for e in events if e],
                )
                state, sums = train_steps(state, train_x, train_y, n)
                # One dispatch in flight at a time, waited for by polling so that a signal's
                # handler runs meanwhile (a blocking read would hold it until the dispatch
                # ends). This also keeps XLA:CPU's all-reduce from deadlocking, which it does
                # with many multi-device dispatches queued (jax 0.10.2).
                queued = time.perf_counter()  # (after the call: compiling is not timed)
                dispatch.wait_ready(sums)
                cap = dispatch.next_steps(cap, time.perf_counter() - queued, n)
                step += n
                window.add(sums)
                for sink in sinks:
                    sink.advance(n)
                if step % config.log_every == 0 or step == run.end:
                    record = window.record(step, state.opt_state.notfinite_count)
                    for sink in sinks:
                        sink.write(record)
                    if record["nonfinite_skipped"] >= config.max_nonfinite_steps:
                        raise _diverged(step, record["nonfinite_skipped"], _last_good(mngr), True)
                if grids is not None and step % config.sample_every == 0:
                    grids(state.ema_params, _grid_path(workdir, step))
                stop.agree()
                stopping = stop.signal is not None or (run.stops_early and step >= run.end)
                streak = 0
                if step % config.checkpoint_every == 0 or step == config.num_steps or stopping:
                    streak = _checkpoint(run, mngr, step, state)
                if stop.signal is not None:
                    interrupted = True
                    _say(
                        run,
                        # (on a line of its own after the progress bar)
                        f"\nstopped by signal {stop.signal} at step {step}; "
                        + ("checkpoint written" if streak == 0 else "nothing saved"),
                    )
                    break
            if step == config.num_steps and streak:
                raise _diverged(step, streak, _last_good(mngr), False)
    finally:
        for sink in sinks:
            sink.close()
    return TrainResult(state, config, interrupted or step < config.num_steps)
