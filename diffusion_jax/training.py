"""Training: Optax optimiser with a parameter EMA, several steps per dispatch, Orbax resume.

:func:`train` is what ``train.py`` runs. Everything random derives from ``config.seed`` by
``fold_in``: the initial parameters, each epoch's data order (from the epoch number) and each
step's noise, timesteps and label dropout (from the step number). A run that is interrupted and
resumed therefore computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import NamedTuple

import jax

from diffusion_jax import checkpoints, data, dispatch, hooks, models, runs, sharding, train_step
from diffusion_jax import config as config_lib
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.optimization import ema_decay_at, learning_rate, make_optimizer
from diffusion_jax.train_step import (
    TrainState,
    device_data,
    init_state,
    make_train_steps,
    step_metrics,
)

# (re-exported: the state and the step program are part of what training offers)
__all__ = [
    "TrainState",
    "TrainResult",
    "TrainingDivergedError",
    "device_data",
    "ema_decay_at",
    "init_state",
    "learning_rate",
    "make_optimizer",
    "make_train_steps",
    "step_metrics",
    "train",
]

logger = logging.getLogger(__name__)
# (raised by train; defined with the run resolution)
ConfigConflictError = runs.ConfigConflictError


class TrainingDivergedError(RuntimeError):
    """The loss stayed non-finite for too many consecutive steps."""


class TrainResult(NamedTuple):
    state: TrainState
    config: config_lib.Config
    interrupted: bool


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
    step, interrupted, streak, pending = start, False, 0, None
    # The first dispatch is one chunk of the program's inner loop (train_step.chunk_steps: one
    # straight-line step on the CPU), which it computes whatever its count; later ones as many
    # whole chunks as fit in dispatch.SECONDS, at most per_dispatch.
    chunk = train_step.chunk_steps(per_dispatch)
    cap = chunk
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
                # Dispatches end on every logging/checkpoint/sample boundary, so those are exact.
                n = dispatch.size(
                    cap, per_dispatch, chunk, run.end - step, *[e - step % e for e in events if e]
                )
                state, sums = train_steps(state, train_x, train_y, n)
                if pending is not None:
                    # Saved while the next dispatch computes: Orbax's copy to the host no
                    # longer leaves the device idle at every checkpoint.
                    streak = _checkpoint(run, mngr, *pending)
                    pending = None
                # One dispatch in flight at a time, waited for by polling so that a signal's
                # handler runs meanwhile (a blocking read would hold it until the dispatch
                # ends). This also keeps XLA:CPU's all-reduce from deadlocking, which it does
                # with many multi-device dispatches queued (jax 0.10.2).
                queued = time.perf_counter()  # (after the call: compiling is not timed)
                dispatch.wait_ready(sums)
                computed = -(-n // chunk) * chunk  # (the steps past n were computed too)
                cap = dispatch.next_steps(cap, time.perf_counter() - queued, computed)
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
                last = stopping or step in (run.end, config.num_steps)
                streak = 0
                if step % config.checkpoint_every == 0 or step == config.num_steps or stopping:
                    if last:
                        streak = _checkpoint(run, mngr, step, state)
                    else:  # the next dispatch takes (donates) state's buffers: save a copy
                        pending = (step, dispatch.snapshot(state))
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
        if pending is not None:  # the dispatch after it failed: the checkpoint is still due
            _checkpoint(run, mngr, *pending)
        for sink in sinks:
            sink.close()
    return TrainResult(state, config, interrupted or step < config.num_steps)
