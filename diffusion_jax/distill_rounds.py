"""Distillation rounds on disk: :func:`distill` runs (or resumes) the rounds of
:mod:`diffusion_jax.distillation` from a trained teacher checkpoint. The students are sampled
like any checkpoint (``generation.load_for_sampling``, with the ``distilled`` solver).

Layout of ``OUT``: ``distill.json`` (the teacher and the settings; a different run is refused),
and per round r (0-based) ``round_r/checkpoints/STEP/{state,ema,meta}`` (Orbax, as training
writes them) with ``round_r/metrics.jsonl``. Round r distils ``start_steps / 2**r`` teacher steps
into half as many; its teacher is the guided original (r = 0) or round r-1's EMA student, and its
student starts from the teacher's parameters (round 0 adds the zero-initialised w-embedding).
A round's ``meta`` holds the student's config (the teacher's, with the student's prediction) and
a ``distill`` record: the round, its steps and their timesteps, the w range and the teacher.

Round r takes ``settings.round_length(r)`` optimiser steps; resuming may change the length of a
round that has no checkpoint yet (nothing else). With several local devices (the CPU's cores,
``cli.use_cpu_cores``; GPUs) every step's batch is split over them, parameters replicated.

Everything random derives from ``settings.seed``: round r's key is ``fold_in(seed, r)``, step s
of it draws from ``fold_in(fold_in(round key, 1), s)``, so an interrupted round resumes to the
result of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import (
    checkpoints,
    data,
    datasets,
    dispatch,
    distillation,
    generation,
    hooks,
    models,
    sharding,
)
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.schedules import get_betas, make_schedule

logger = logging.getLogger("diffusion_jax.training")

RECORD = checkpoints.DISTILL_RECORD


class DistillResult(NamedTuple):
    """``path``: the last finished round's folder (None if none finished); ``rounds_done``;
    ``interrupted``: a signal (or ``stop_after``) ended the run after writing a checkpoint."""

    path: str | None
    rounds_done: int
    interrupted: bool


def _check_out(out: str, record: dict) -> None:
    """Refuse an ``out`` that holds something else, or a distillation with other settings."""
    path = os.path.join(out, RECORD)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        # (runs from before start_spacing existed were all uniform)
        old["settings"] = {"start_spacing": "uniform", **old.get("settings", {})}
        if old != record and not _only_unstarted_rounds_differ(out, old, record):
            diff = sorted(
                k for k in set(old["settings"]) | set(record["settings"])
                if old["settings"].get(k) != record["settings"].get(k)
            )
            diff = [k for k in ("teacher", "teacher_step") if old.get(k) != record[k]] + diff
            raise workdir_lib.WorkdirError(
                f"{out!r} holds a distillation run with different settings ({', '.join(diff)}): "
                "nothing was changed. Resume it with its own flags, or choose a new --workdir."
            )
    elif os.path.isdir(out) and os.listdir(out):
        raise workdir_lib.WorkdirError(
            f"{out!r} exists and is not a distillation run (no {RECORD}); choose a new or empty "
            "--workdir so nothing in it is overwritten"
        )
    elif os.path.exists(out) and not os.path.isdir(out):
        raise workdir_lib.WorkdirError(f"--workdir {out!r} is a file, not a folder")


def _only_unstarted_rounds_differ(out: str, old: dict, record: dict) -> bool:
    """True when ``record`` differs from ``old`` only in the length of rounds with no checkpoint
    yet: a longer last round can follow finished ones without running them again (a started
    round's learning-rate decay depends on its length, so its length is fixed)."""
    diff = {k for k in old | record if k != "settings" and old.get(k) != record.get(k)}
    settings = set(old["settings"]) | set(record["settings"])
    diff |= {k for k in settings if old["settings"].get(k) != record["settings"].get(k)}
    if diff != {"steps_per_round"}:
        return False
    before = checkpoints.round_lengths(old["settings"])
    now = checkpoints.round_lengths(record["settings"])
    changed = [r for r in range(len(now)) if before[r] != now[r]]
    if any(checkpoints.saved_steps(checkpoints.round_folder(out, r)) for r in changed):
        return False
    logger.info(
        f"{out}: the length of round(s) {', '.join(map(str, changed))}, not started yet, "
        f"changes from {[before[r] for r in changed]} to {[now[r] for r in changed]} steps"
    )
    return True


def _round_record(r, grid, settings, teacher_path, steps) -> dict:
    return {
        "round": r,
        "steps": steps,
        "timesteps": [int(t) for t in distillation.student_grid(grid, steps)],
        "teacher_steps": 2 * steps,
        "w_min": settings.w_min,
        "w_max": settings.w_max,
        "teacher": teacher_path,
        "guidance_embedding": True,
    }


def distill(
    out: str,
    teacher_path: str,
    settings: distillation.DistillSettings,
    *,
    dataset: data.Dataset | None = None,
    stop_after: int | None = None,
) -> DistillResult:
    """Run or resume the distillation of the checkpoint at ``teacher_path`` into ``out``.

    ``dataset``: the examples z is made from (default: the teacher's data set). ``stop_after``:
    behave as if signalled once this many optimiser steps (over all rounds) are done (tests).
    Messages (a line every ``log_every`` steps and one per round) go to the training logger.
    """
    settings.validate()
    out = os.path.abspath(out)
    teacher = generation.load_for_sampling(teacher_path)  # CheckpointError if there is none
    tconfig = teacher.config
    alpha_bar = np.cumprod(1.0 - get_betas(tconfig.schedule, tconfig.num_timesteps))
    grid = distillation.start_grid(
        tconfig.num_timesteps, settings.start_steps, settings.start_spacing, alpha_bar
    )
    teacher_path = os.path.abspath(teacher_path)
    # (through JSON, so that it compares equal to the record read back from distill.json)
    record = json.loads(json.dumps({
        "teacher": teacher_path,
        "teacher_step": int(teacher.step),
        "settings": dataclasses.asdict(settings),
    }))
    mesh = None
    if jax.local_device_count() > 1:  # e.g. the CPU's cores as devices (cli.use_cpu_cores)
        mesh = sharding.data_mesh(jax.local_devices())
        sharding.check_batch_size(settings.batch_size, mesh)
    _check_out(out, record)
    _warn_eps_student(settings.student_prediction or tconfig.prediction, tconfig, grid)
    with workdir_lib.workdir_lock(out):
        with open(os.path.join(out, RECORD), "w") as f:
            json.dump(record, f, indent=1)
        dataset = dataset or datasets.load_dataset(tconfig)
        return _rounds(out, teacher, teacher_path, grid, settings, dataset, stop_after, mesh)


def _place(tree, mesh):
    """``tree``'s arrays copied whole onto every device of ``mesh`` (None: the default
    device). Orbax restores arrays with a sharding of its own, and a step fed a mix of
    placements compiles a second time at its second call."""
    tree = jax.device_get(tree)
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, tree)
    return sharding.replicate(tree, mesh)


def _warn_eps_student(prediction: str, config, grid) -> None:
    """Warn when an eps-predicting student starts where sqrt(abar) is tiny: its x0 there,
    (z - sigma eps) / alpha, is its eps error times 1 / alpha, and that level's x0 loss swamps
    the others (Salimans & Ho's reason for v-prediction)."""
    alpha = float(distillation.levels(config.schedule, config.num_timesteps, grid[:1]).alpha[0])
    if prediction == "eps" and alpha < 0.05:
        logger.warning(
            f"the students predict eps, and at the first level (t={int(grid[0])}) sqrt(abar) = "
            f"{alpha:.1e}: their x0 there is their eps error times {1 / alpha:.0e}, which the "
            "x0 loss cannot fit; consider --student_prediction v"
        )


def _rounds(out, teacher, teacher_path, grid, settings, dataset, stop_after, mesh):
    tconfig = teacher.config
    prediction = settings.student_prediction or tconfig.prediction
    sconfig = dataclasses.replace(tconfig, prediction=prediction)
    smodel = models.build_model(sconfig, guidance_embedding=True)
    schedule = make_schedule(tconfig.schedule, tconfig.num_timesteps)
    clip = (-1.0, 1.0) if settings.clip_teacher else None
    guided_teacher = distillation.predictor(
        models.denoiser(teacher.model), tconfig.prediction, clip, True, tconfig.null_label
    )
    student_teacher = distillation.predictor(models.denoiser(smodel), prediction, clip)
    student = distillation.predictor(models.denoiser(smodel), prediction)
    data = _place((dataset.train_x.astype(np.float32), dataset.train_y.astype(np.int32)), mesh)
    base = jax.random.PRNGKey(settings.seed)
    teacher_params, done, last = _place(teacher.params, mesh), 0, None
    for r in range(settings.rounds):
        rsettings = settings.for_round(r)
        steps = settings.start_steps // 2 ** (r + 1)
        rec = _round_record(r, grid, settings, teacher_path, steps)
        folder = checkpoints.round_folder(out, r)
        mngr = checkpoints.manager(os.path.join(folder, checkpoints.SUBDIR), max_to_keep=2)
        try:
            key = jax.random.fold_in(base, r)
            if r == 0:
                init = models.init_params(
                    smodel, jax.random.fold_in(key, 0), (1, *teacher.data_shape)
                )
                start_params = _place(distillation.graft(teacher_params, init), mesh)
            else:
                start_params = teacher_params
            state = distillation.init_state(rsettings, start_params)
            saved = mngr.latest_step()
            if saved is not None:
                directory = os.path.join(folder, checkpoints.SUBDIR)
                part = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
                restored, ema = checkpoints.restore_train(
                    mngr, directory, saved, part, state.ema_params
                )
                state = _place(distillation.TrainState(ema_params=ema, **restored), mesh)
            if int(state.step) < rsettings.steps_per_round:
                teacher_grid = distillation.student_grid(grid, 2 * steps)
                levels = distillation.levels(tconfig.schedule, tconfig.num_timesteps, teacher_grid)
                step_fn = distillation.make_distill_step(
                    rsettings, student, guided_teacher if r == 0 else student_teacher, mesh
                )
                budget = None if stop_after is None else stop_after - done
                args = _place((schedule, levels, jax.random.fold_in(key, 1)), mesh)
                state, stopped = _loop(
                    rsettings, mngr, folder, r, rec, sconfig, teacher.data_shape, state,
                    (teacher_params, args[0], args[1], *data, args[2]), step_fn, budget,
                )
                done += int(state.step) - (saved or 0)
                if stopped:
                    return DistillResult(last, r, True)
            else:
                logger.info(f"round {r}: done earlier ({2 * steps} -> {steps} steps)")
            teacher_params, last = state.ema_params, folder
        finally:
            mngr.wait_until_finished()
            mngr.close()
    return DistillResult(last, settings.rounds, False)


def _loop(settings, mngr, folder, r, rec, sconfig, data_shape, state, args, step_fn, budget):
    """Round ``r`` from ``state`` to ``steps_per_round``; ``(state, stopped)``."""
    start, end = int(state.step), settings.steps_per_round
    sink = hooks.JsonlSink(os.path.join(folder, "metrics.jsonl"), start)
    logger.info(
        f"round {r}: {rec['teacher_steps']} -> {rec['steps']} steps, step {start}/{end}, "
        f"w in [{settings.w_min:g}, {settings.w_max:g}]"
    )
    losses, t0, timed = [], None, 0
    step = start
    with hooks.StopFlag() as stop:
        while step < end:
            state, metrics = step_fn(state, *args)
            dispatch.wait_ready(metrics)  # polling: a signal's handler runs meanwhile
            step += 1
            if t0 is None:
                t0 = time.perf_counter()  # after the first step, which compiles
            else:
                timed += 1
            losses.append(float(metrics["loss"]))
            stopping = stop.signal is not None or (budget is not None and step - start >= budget)
            if step % settings.log_every == 0 or step == end:
                speed = (time.perf_counter() - t0) / timed if timed else float("nan")
                mean = float(np.mean(losses))
                sink.write({"step": step, "loss": mean, "s_per_step": speed, "time": time.time()})
                logger.info(
                    f"round {r}: step {step}/{end} loss {mean:.5f} "
                    f"({speed:.2f} s/step after compiling)"
                )
                losses = []
            if step % settings.checkpoint_every == 0 or step == end or stopping:
                # What resuming restores; the EMA (what is sampled) is saved apart, as in training.
                part = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
                extra = {"distill": rec}
                checkpoints.save(mngr, step, part, state.ema_params, sconfig, data_shape, extra)
            if stopping:
                why = f"signal {stop.signal}" if stop.signal is not None else "stop_after"
                logger.info(f"round {r}: stopped by {why} at step {step}; checkpoint written")
                return state, True
    logger.info(f"round {r} done: {rec['steps']}-step student in {folder}")
    return state, False
