"""Orbax checkpoints of a training run, and reading them back for sampling.

Layout: ``WORKDIR/checkpoints/STEP/{state,ema,meta}``. ``state`` holds what resuming needs
(step, parameters, optimizer state), ``ema`` the averaged parameters that sampling and evaluation
use (restored alone, without the optimizer state), ``meta`` a JSON record with the project marker
and the resolved config. The manager keeps the latest ``max_to_keep`` checkpoints for resuming
and every checkpoint whose step is a multiple of ``keep_every`` for good.

A distillation run (``distill.py``) holds ``distill.json`` and one such workdir per round,
``round_R``; :func:`student_path` picks a round by its students' step count, and a student's
``meta`` adds a ``distill`` record.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from typing import Any, NamedTuple

import orbax.checkpoint as ocp

from diffusion_jax import config as config_lib

PROJECT = "diffusion_jax"
FORMAT_VERSION = 1
SUBDIR = "checkpoints"
DISTILL_RECORD = "distill.json"  # what marks a distillation run's folder


class Checkpoint(NamedTuple):
    """A checkpoint opened for sampling (``generation.load_for_sampling``): the run's config,
    its network (a Flax module), the EMA parameters, the shape of one example and the step."""

    config: config_lib.Config
    model: Any
    params: Any
    data_shape: tuple[int, ...]
    step: int
    # a distilled student's record (its steps, timesteps, w range, teacher); None for a model
    # trained by train.py
    distill: dict | None = None


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or not ours; the message says what to do."""


def manager(directory: str, keep_every: int = 0, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A CheckpointManager over ``directory`` (the ``checkpoints`` folder), created if missing."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_every or None, create=True
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def check_space(directory: str, trees, step: int) -> None:
    """OSError (no space) unless the disk of ``directory`` has room for the arrays of ``trees``
    with a margin: Orbax's background threads would otherwise fail half-way through the write
    with thousands of lines of tracebacks."""
    import jax

    need = sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(trees))
    need = int(1.5 * need) + (1 << 20)  # files, metadata and OCDBT overhead
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"not enough space for the checkpoint of step {step} (about {need / 1e6:.1f} MB "
            f"needed, {free / 1e6:.1f} MB free); nothing was written: free some space and resume "
            "(earlier checkpoints are intact)",
            directory,
        )


def save(
    mngr: ocp.CheckpointManager, step: int, state, ema_params, config, data_shape, extra_meta=None
) -> None:
    """Start an (asynchronous) save; call ``mngr.wait_until_finished()`` before exiting.

    ``data_shape`` is the shape of one example, e.g. (28, 28, 1), recorded for sampling.
    ``extra_meta`` (a JSON-able dict, e.g. distillation's ``{"distill": record}``) is added to
    the meta record. Waits for the previous save, then refuses (OSError) before writing anything
    if the disk is nearly full.
    """
    # The previous save may still be writing in the background: measure the space it leaves.
    mngr.wait_until_finished()
    check_space(str(mngr.directory), (state, ema_params), step)
    meta = {
        "project": PROJECT,
        "format": FORMAT_VERSION,
        "step": int(step),
        "config": config_lib.to_dict(config),
        "data_shape": [int(d) for d in data_shape],
        **(extra_meta or {}),
    }
    mngr.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            ema=ocp.args.StandardSave(ema_params),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def _step_folders(directory: str) -> list[int]:
    """The steps of ``directory`` that look like our checkpoints (a numbered folder holding at
    least one of our items), sorted; [] for a missing or unreadable folder."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        int(d)
        for d in names
        if d.isdigit()
        and any(os.path.isdir(os.path.join(directory, d, k)) for k in ("meta", "ema", "state"))
    )


def _not_a_run(path: str) -> CheckpointError:
    """The error for a folder that holds nothing of ours (empty, or unrelated files)."""
    return CheckpointError(
        f"{path!r} is not a {PROJECT} run: it holds no {PROJECT} checkpoints ({SUBDIR}/STEP/ "
        f"folders written by train.py). Pass the --workdir a training run was given (or one "
        f"of its {SUBDIR}/STEP folders), or train one with `python train.py --workdir NEW`."
    )


def resolve(path: str) -> tuple[str, int | None]:
    """``(checkpoints_dir, step or None for the latest)`` for a workdir, its ``checkpoints``
    folder, or one step's folder inside it (a distillation run: its fewest-step student's)."""
    path = os.path.abspath(student_path(path))
    parent, base = os.path.split(path)
    if not os.path.exists(path):
        steps = _step_folders(parent)
        if base.isdigit() and (steps or os.path.basename(parent) == SUBDIR):
            # a step of an existing checkpoints folder, not a new workdir to train in
            raise CheckpointError(
                f"step {int(base)} does not exist in {parent!r}; its checkpoints are steps "
                f"{steps or 'none'}: pass one of those folders, or the workdir for the latest."
            )
        raise CheckpointError(
            f"no checkpoint at {path!r}: the path does not exist. Train one with "
            f"`python train.py --workdir {path}` or pass the workdir of an existing run."
        )
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a file; pass a training workdir or checkpoint folder")
    if os.path.isdir(os.path.join(path, SUBDIR)):
        return os.path.join(path, SUBDIR), None
    if base.isdigit() and os.path.isdir(os.path.join(path, "meta")):
        return parent, int(base)
    if _step_folders(path):
        return path, None
    raise _not_a_run(path)


def _pick_step(mngr: ocp.CheckpointManager, directory: str, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(
            f"{directory!r} holds no finished checkpoints (its run stopped before the first "
            "save): resume training there with train.py, or pass another run's --workdir"
        )
    if step is None:
        return max(steps)
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory!r}; have {steps}")
    return step


def _fallback(directory: str, step: int, all_steps) -> str:
    """What to do when checkpoint ``step`` cannot be used: which folder to move aside, and
    which earlier checkpoint to resume or sample from."""
    others = sorted(s for s in all_steps if s != step)
    here = os.path.join(directory, str(step))
    if not others:
        return f"It is the only checkpoint in {directory!r}: train again in a new --workdir."
    previous = os.path.join(directory, str(others[-1]))
    return (
        f"Move {here!r} out of {directory!r} to resume from step {others[-1]}, or sample from "
        f"--workdir {previous}."
    )


def _first_line(e: Exception) -> str:
    """An Orbax/TensorStore error cut to its first line (their later lines hold raw specs and
    advice, such as strict=False, that does not apply here)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    shapes = re.match(
        r"Requested shape: (\(.*?\)) is not compatible with the stored shape: "
        r"(\(.*?\))",
        first,
    )
    if shapes:  # Orbax goes on to advise strict=False, which would restore a cut-down array
        return f"an array saved with shape {shapes[2]} is requested with shape {shapes[1]}"
    return f"{type(e).__name__}: {first[:200]}"


def _restore(mngr, directory: str, step: int, **items):
    missing = [k for k in items if not os.path.isdir(os.path.join(directory, str(step), k))]
    if "state" in missing and "ema" not in missing:
        raise CheckpointError(
            f"{os.path.join(directory, str(step))!r} holds only EMA parameters (a checkpoint "
            "made for sampling, like the shipped one): it cannot be resumed. Sample from it with "
            "sample.py, or train in a new --workdir."
        )
    try:
        return mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - Orbax raises many types; all mean "cannot read"
        raise CheckpointError(
            f"checkpoint {os.path.join(directory, str(step))!r} could not be read "
            f"({_first_line(e)}): it is incomplete or damaged, or was written for another model "
            f"configuration. {_fallback(directory, step, mngr.all_steps())}"
        ) from e


def _check_finite(tree, directory: str, step: int, all_steps) -> None:
    """CheckpointError unless every floating-point array of ``tree`` is finite: Orbax restores
    damaged bytes or a diverged run's values without complaint, and they would be sampled into
    black images or resumed into every later checkpoint."""
    import jax
    import numpy as np

    def local(leaf):  # this process's copy (the restored arrays are replicated)
        return np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)

    bad = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if np.issubdtype(local(leaf).dtype, np.inexact) and not np.all(np.isfinite(local(leaf)))
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {os.path.join(directory, str(step))!r} holds non-finite values in "
            f"{len(bad)} array(s) (e.g. {bad[0]}): it is damaged. "
            + _fallback(directory, step, all_steps)
        )


# Adam's moments obey |mu| <= sqrt((1-b1)^2 / (1-b2) / (1 - b1^2/b2)) * sqrt(nu) (Cauchy-Schwarz
# over the gradients' history), 7.3 * sqrt(nu) for optax's defaults b1=0.9, b2=0.999; the margin
# and the absolute slack (float32 squares of gradients below 1e-19 flush to 0) keep every state a
# real run writes inside the bound, while damaged bytes land outside it almost surely.
_MU_OVER_SQRT_NU = 8.0
_MU_SLACK = 1e-6


def _adam_states(tree):
    """The Adam states (anything with ``mu``, ``nu`` and ``count``) inside ``tree``."""
    get = (lambda t, k: t[k]) if isinstance(tree, dict) else getattr
    if all(_has(tree, k) for k in ("mu", "nu", "count")):
        yield get(tree, "mu"), get(tree, "nu"), get(tree, "count")
        return
    if isinstance(tree, dict):
        children = tree.values()
    else:
        children = tree if isinstance(tree, (list, tuple)) else ()
    for child in children:
        yield from _adam_states(child)


def _has(tree, key: str) -> bool:
    return key in tree if isinstance(tree, dict) else hasattr(tree, key)


def _optimizer_fault(state) -> str | None:
    """What is impossible in a restored training ``state`` ({step, params, opt_state}), or None.
    Finite values can still be damage that no update could have produced: a negative second
    moment (whose square root makes every later update NaN), a first moment too large for its
    second moment, or an update count outside [0, step]."""
    import jax
    import numpy as np

    def local(leaf):
        return np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)

    step = int(local(state["step"]))
    for mu, nu, count in _adam_states(state["opt_state"]):
        if not 0 <= int(local(count)) <= step:
            return f"an optimizer update count of {int(local(count))} at step {step}"
        for m, n in zip(jax.tree_util.tree_leaves(mu), jax.tree_util.tree_leaves(nu), strict=True):
            m, n = local(m), local(n)
            if np.any(n < 0):
                return "negative second moments (Adam's nu) in the optimizer state"
            if np.any(np.abs(m) > _MU_OVER_SQRT_NU * np.sqrt(n) + _MU_SLACK):
                return "first moments (Adam's mu) too large for their second moments"
    return None


def read_meta(mngr, directory: str, step: int) -> tuple[config_lib.Config, tuple[int, ...]]:
    """``(config, data_shape)`` stored with ``step``, after checking the checkpoint is ours."""
    return _parse_meta(
        _restore(mngr, directory, step, meta=ocp.args.JsonRestore()).meta, directory, step
    )


def _parse_meta(meta, directory: str, step: int) -> tuple[config_lib.Config, tuple[int, ...]]:
    if not isinstance(meta, dict) or meta.get("project") != PROJECT:
        raise CheckpointError(f"{directory!r} step {step} is not a {PROJECT} checkpoint")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory!r} step {step} has checkpoint format {meta.get('format')}, "
            f"this version reads format {FORMAT_VERSION}"
        )
    try:
        return config_lib.from_dict(meta["config"]), tuple(int(d) for d in meta["data_shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory!r} step {step} has an unreadable config: {e}") from e


def restore_train(mngr, directory: str, step: int, state_target, ema_target):
    """(state, ema_params) of ``step``, structured like the targets."""
    r = _restore(
        mngr,
        directory,
        step,
        state=ocp.args.StandardRestore(state_target),
        ema=ocp.args.StandardRestore(ema_target),
    )
    _check_finite((r.state, r.ema), directory, step, mngr.all_steps())
    fault = _optimizer_fault(r.state)
    if fault:
        raise CheckpointError(
            f"checkpoint {os.path.join(directory, str(step))!r} holds {fault}, which training "
            f"cannot produce: it is damaged and cannot be resumed. "
            + _fallback(directory, step, mngr.all_steps())
        )
    return r.state, r.ema


def open_for_sampling(path: str):
    """``(mngr, directory, step, config, data_shape, distill)`` for the checkpoint at ``path``
    (``distill``: a student's record, or None)."""
    directory, step = resolve(path)
    mngr = manager(directory)
    step = _pick_step(mngr, directory, step)
    meta = _restore(mngr, directory, step, meta=ocp.args.JsonRestore()).meta
    config, data_shape = _parse_meta(meta, directory, step)
    return mngr, directory, step, config, data_shape, meta.get("distill") or None


def read_config(path: str) -> tuple[config_lib.Config, tuple[int, ...]]:
    """``(config, data_shape)`` of the checkpoint at ``path`` (see :func:`resolve`)."""
    mngr, _, _, config, data_shape, _ = open_for_sampling(path)
    mngr.close()
    return config, data_shape


def read_student(path: str) -> dict | None:
    """The ``distill`` record of the checkpoint at ``path`` if it is a distilled student, else
    None."""
    mngr, *_, record = open_for_sampling(path)
    mngr.close()
    return record


def round_folder(out: str, r: int) -> str:
    """Round ``r``'s workdir in the distillation run ``out``."""
    return os.path.join(out, f"round_{r}")


def students(path: str) -> dict[int, str] | None:
    """{steps: round workdir} of the finished rounds of the distillation run at ``path`` (None
    if ``path`` is not one); CheckpointError if its record is unreadable."""
    record = os.path.join(path, DISTILL_RECORD)
    if not os.path.isfile(record):
        return None
    try:
        with open(record) as f:
            settings = json.load(f)["settings"]
        start, rounds = int(settings["start_steps"]), int(settings["rounds"])
        lengths = round_lengths(settings)
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"{record!r} is unreadable ({e}): is {path!r} a distill.py run?"
        raise CheckpointError(why) from None
    return {
        start // 2 ** (r + 1): round_folder(path, r)
        for r in range(rounds)
        if lengths[r] in saved_steps(round_folder(path, r))
    }


def round_lengths(settings: dict) -> list[int]:
    """The optimiser steps of each round of a distillation record's ``settings``, whose
    ``steps_per_round`` is one number for all rounds or a list of one per round. ValueError
    unless it gives exactly one length per round."""
    rounds, value = int(settings["rounds"]), settings["steps_per_round"]
    lengths = [int(v) for v in value] if isinstance(value, list) else [int(value)] * rounds
    if len(lengths) != rounds:
        raise ValueError(f"steps_per_round {value} does not give one length per round")
    return lengths


def saved_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints saved in ``workdir`` (a training or round folder), sorted."""
    return _step_folders(os.path.join(workdir, SUBDIR))


def student_path(path: str, steps: int | None = None) -> str:
    """``path`` itself unless it is a distillation run's folder; then the workdir of its round
    whose students take ``steps`` steps (None: the last finished round, the fewest steps).
    Only finished rounds count; an unfinished round's folder can be passed itself.
    CheckpointError naming the step counts it has when none matches."""
    done = students(path)
    if done is None:
        return path
    if not done:
        raise CheckpointError(
            f"the distillation run {path!r} has no student yet (no round is finished): run "
            "distill.py on it to the end of its first round, or pass a round_R folder"
        )
    if steps is None:
        return done[min(done)]
    if steps not in done:
        raise CheckpointError(
            f"the distillation run {path!r} has students of {sorted(done, reverse=True)} steps, "
            f"not {steps}: pass one of those to --steps"
        )
    return done[steps]


def on_this_device(target):
    """A restore target of shapes (``jax.ShapeDtypeStruct``) placed on this process's first
    device. Without a placement Orbax reuses the one saved, and arrays saved replicated over
    several devices (training or distilling on a mesh, e.g. the CPU's cores) would not load in
    a process with fewer."""
    import jax

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target
    )


def restore_ema(mngr, directory: str, step: int, ema_target):
    """Only the EMA parameters of ``step`` (the optimizer state is not read), on this process's
    first device whatever devices they were saved from."""
    target = on_this_device(ema_target)
    ema = _restore(mngr, directory, step, ema=ocp.args.StandardRestore(target)).ema
    _check_finite(ema, directory, step, mngr.all_steps())
    return ema
