"""Guided progressive distillation (Salimans & Ho 2022, arXiv 2202.00512; Meng et al. 2023,
arXiv 2210.03142): the mathematics and the compiled distillation step (the students are sampled
by the ``distilled`` solver of :mod:`diffusion_jax.solvers`).
The rounds, their checkpoints and resuming are in :mod:`diffusion_jax.distill_rounds`.

Notation. A chain of n steps visits n noise *levels* (training timesteps, noisiest first), then
the data. At a level, alpha = sqrt(abar) and sigma = sqrt(1 - abar); the data is the level with
alpha = 1, sigma = 0. A DDIM step (eta = 0) from level s to level u with the predictions
(x0_hat, eps_hat) at s is

    z_u = alpha_u x0_hat + sigma_u eps_hat,     eps_hat = (z_s - alpha_s x0_hat) / sigma_s.

A round's teacher walks N levels; its student walks every second one in N/2 steps, so one
student step t -> t'' replaces the teacher's two steps t -> t' -> t''. The student's target is
the x0 for which one DDIM step t -> t'' lands where the teacher's two steps land (Salimans & Ho,
Algorithm 2):

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t).

When t'' is the data (sigma_t'' = 0, alpha_t'' = 1) this is the teacher's z_t'' itself, with no
division by a vanishing sigma; the denominator is positive whenever t'' is less noisy than t.
The loss is Salimans & Ho's "truncated SNR" weighting of the x0 error, max(SNR_t, 1)
|x0_student - x~|^2 with SNR = alpha^2 / sigma^2: the plain x0 error at the noisy end (where
SNR -> 0 would zero an SNR weight), the eps error (SNR |x0 error|^2 = |eps error|^2) at the clean
end.

The first round's teacher is the classifier-free guided model, (1 + w) out(x, c) - w out(x, null)
(two network calls); every student takes w as an input (``guidance_embedding``), is trained on w
drawn per example from [w_min, w_max], and is sampled with one network call per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import diffusion
from diffusion_jax.config import check_seed
from diffusion_jax.guidance import guided_output
from diffusion_jax.optimization import make_optimizer
from diffusion_jax.schedules import SPACINGS, get_betas, respaced_timesteps
from diffusion_jax.sharding import batch_sharded
from diffusion_jax.train_step import TrainState, apply_gradients, step_metrics

# (params, schedule, z (B, ...), t (B,) timesteps, labels (B,), w (B,)) -> (x0_hat, eps_hat)
Predictor = Callable

STUDENT_PREDICTIONS = ("eps", "x0", "v")


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """A distillation run: ``rounds`` rounds from ``start_steps`` teacher steps placed by
    ``start_spacing`` (one of ``schedules.SPACINGS``; see :func:`start_grid`), each halving
    them and taking ``steps_per_round`` optimiser steps of ``batch_size`` examples (one number for
    every round, or a tuple of one per round: the one-step student is the hardest to fit), with
    w drawn uniformly from [w_min, w_max] per example. The optimiser is training's
    (:func:`~diffusion_jax.optimization.make_optimizer`: clipping, AdamW, warm-up then cosine
    decay over the round), started afresh each round. ``student_prediction``: what the students
    predict: v by default (an eps student's x0 at the noisiest level is its eps error divided by
    sqrt(abar) ~ 0); "" = the teacher's, so that a student starts as the teacher's exact copy.
    ``clip_teacher``: the teacher's x0 is clipped to [-1, 1] at each step, as the samplers do."""

    # the shipped students' recipe (pretrained/mnist5k_cpu_distilled, 32 -> 1 step)
    start_steps: int = 32
    start_spacing: str = "uniform"
    rounds: int = 5
    steps_per_round: int | tuple[int, ...] = (1000, 1000, 1000, 1000, 7000)
    w_min: float = 0.0
    w_max: float = 2.0
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 50
    student_prediction: str = "v"
    clip_teacher: bool = True

    def __post_init__(self):
        if isinstance(self.steps_per_round, list):  # (as JSON gives it back): hashable
            object.__setattr__(self, "steps_per_round", tuple(self.steps_per_round))

    def round_length(self, r: int) -> int:
        """Optimiser steps of round ``r`` (0-based)."""
        if isinstance(self.steps_per_round, tuple):
            return self.steps_per_round[r]
        return self.steps_per_round

    def for_round(self, r: int) -> DistillSettings:
        """These settings with round ``r``'s length as the one ``steps_per_round``: what that
        round's optimiser (its warm-up and cosine decay) and step are built from."""
        return dataclasses.replace(self, steps_per_round=self.round_length(r))

    @property
    def num_steps(self) -> int:
        """The optimiser's schedule length (optimization.learning_rate): one round (of settings
        made by :meth:`for_round` when the rounds' lengths differ)."""
        if isinstance(self.steps_per_round, tuple):
            raise ValueError("the rounds differ in length: use settings.for_round(r)")
        return self.steps_per_round

    def validate(self) -> DistillSettings:
        """ValueError naming the setting and what to do unless every value is usable."""
        for name in ("start_steps", "rounds", "batch_size", "checkpoint_every", "log_every"):
            _check_positive_int(name, getattr(self, name))
        if isinstance(self.steps_per_round, tuple):
            if len(self.steps_per_round) != self.rounds:
                raise ValueError(
                    f"steps_per_round gives {len(self.steps_per_round)} lengths for "
                    f"{self.rounds} rounds (the default is the shipped recipe's, for 5): give "
                    "one number for every round, or one per round (e.g. --rounds 3 "
                    "--steps_per_round 1000,1000,3000)"
                )
            for r, length in enumerate(self.steps_per_round):
                _check_positive_int(f"steps_per_round (round {r})", length)
        else:
            _check_positive_int("steps_per_round", self.steps_per_round)
        _check_nonneg_int("warmup_steps", self.warmup_steps)
        check_seed(self.seed)
        if self.start_steps % 2**self.rounds:
            raise ValueError(
                f"start_steps={self.start_steps} cannot be halved {self.rounds} times: each round "
                f"halves the steps, so start_steps must be a multiple of 2**rounds = "
                f"{2**self.rounds} (e.g. --start_steps 64 --rounds 6 ends at 1 step)"
            )
        for name in ("w_min", "w_max", "lr", "weight_decay", "grad_clip", "ema_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if self.w_min < 0:
            raise ValueError(f"w_min must be >= 0 (guidance weights are >= 0), got {self.w_min}")
        if self.w_min > self.w_max:
            raise ValueError(
                f"the w range is reversed: w_min={self.w_min} > w_max={self.w_max}; give "
                "w_min <= w_max (equal values distil a single guidance weight)"
            )
        if self.lr <= 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError("lr and grad_clip must be > 0 and weight_decay >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.start_spacing not in SPACINGS:
            raise ValueError(
                f"start_spacing must be one of {SPACINGS}, got {self.start_spacing!r}"
            )
        if self.student_prediction not in ("", *STUDENT_PREDICTIONS):
            raise ValueError(
                f"student_prediction must be one of {STUDENT_PREDICTIONS} (or empty for the "
                f"teacher's), got {self.student_prediction!r}"
            )
        return self


def _check_positive_int(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_nonneg_int(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Time grids


def start_grid(
    num_timesteps: int, start_steps: int, spacing: str = "uniform", alpha_bar=None
) -> np.ndarray:
    """The first teacher's levels: ``start_steps`` training timesteps from T-1 (or the log-SNR
    floor's last) to 0 placed by ``spacing`` (:func:`~diffusion_jax.schedules.respaced_timesteps`;
    "logsnr" and "karras" need the training ``alpha_bar`` (T,)), noisiest first. Shape (N,),
    int64. Every student walks a subset of these levels, so they fix the students' grids too."""
    if not 2 <= start_steps <= num_timesteps:
        raise ValueError(
            f"start_steps must be in [2, {num_timesteps}] (the teacher was trained with "
            f"T={num_timesteps} timesteps), got {start_steps}"
        )
    return respaced_timesteps(num_timesteps, start_steps, spacing, alpha_bar)[::-1].copy()


def student_grid(grid: np.ndarray, steps: int) -> np.ndarray:
    """The levels of an ``steps``-step chain distilled from ``grid`` (N,): every (N/steps)-th
    level from the first, so each student level is one of its teacher's. Shape (steps,)."""
    n = len(grid)
    if steps < 1 or n % steps:
        raise ValueError(
            f"a {steps}-step student cannot be distilled from a {n}-step grid: the steps must "
            f"divide {n} (halving it each round: {n // 2}, {n // 4}, ...)"
        )
    return np.asarray(grid)[:: n // steps]


class Levels(NamedTuple):
    """A chain's levels: ``timesteps`` (n,) int32, noisiest first, and ``alpha``, ``sigma``
    (n + 1,) float32 with the data (1, 0) last. Computed in float64, stored in float32."""

    timesteps: jnp.ndarray
    alpha: jnp.ndarray
    sigma: jnp.ndarray


def levels(schedule_name: str, num_timesteps: int, timesteps) -> Levels:
    """The :class:`Levels` of ``timesteps`` (noisiest first) on the training schedule."""
    abar = np.cumprod(1.0 - get_betas(schedule_name, num_timesteps))[np.asarray(timesteps)]
    abar = np.append(abar, 1.0)
    return Levels(
        jnp.asarray(np.asarray(timesteps, np.int32)),
        jnp.asarray(np.sqrt(abar), jnp.float32),
        jnp.asarray(np.sqrt(1.0 - abar), jnp.float32),
    )


# ---------------------------------------------------------------------------------------------
# Predictions, the target and the loss


@functools.cache
def predictor(denoise_fn, prediction: str, clip=None, guided: bool = False, null_label: int = 0):
    """``predict(params, schedule, z, t, labels, w) -> (x0_hat, eps_hat)``, each like z (B, ...).

    ``denoise_fn(params, z, t, labels[, w=w])`` is a network's output of type ``prediction``;
    ``schedule`` the *training* schedule (rows are timesteps). ``guided``: the classifier-free
    guided output at weight w (B,) from two calls (a teacher without a w input); else w is fed
    to the network (a student). ``clip``: (lo, hi) for x0_hat, eps_hat recomputed to match.
    Cached, so the same arguments give the same function (a static argument of jit)."""
    diffusion.check_prediction(prediction)

    def predict(params, schedule, z, t, labels, w):
        if guided:
            out = guided_output(denoise_fn, params, z, t, labels, w, null_label, True)
        else:
            out = denoise_fn(params, z, t, labels, w=w)
        return diffusion.to_x0_eps(schedule, prediction, out, z, t, clip)

    return predict


def _col(c: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """(B,) -> (B, 1, ...) broadcasting against x (B, ...)."""
    return jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim))


def ddim_move(x0, eps, alpha_u, sigma_u):
    """DDIM's (eta = 0) next state at level u: alpha_u x0 + sigma_u eps; x0, eps (B, ...),
    alpha_u, sigma_u (B,)."""
    return _col(alpha_u, x0) * x0 + _col(sigma_u, x0) * eps


def target_x0(z_t, z_t2, alpha_t, sigma_t, alpha_t2, sigma_t2):
    """The x0 whose DDIM step t -> t'' takes ``z_t`` to ``z_t2`` (both (B, ...); coefficients
    (B,)): (z_t'' - r z_t) / (alpha_t'' - r alpha_t) with r = sigma_t'' / sigma_t (0 at the
    data, where the target is z_t'' itself)."""
    r = sigma_t2 / sigma_t
    return (z_t2 - _col(r, z_t) * z_t) / _col(alpha_t2 - r * alpha_t, z_t)


def distill_target(teacher: Predictor, params, schedule, teacher_levels: Levels, z, i, labels, w):
    """The student's x0 target at the student's level i (B,) ints in [0, N/2), i.e. teacher
    level 2i, for z (B, ...): the teacher's two DDIM steps 2i -> 2i+1 -> 2i+2 (the last may be
    the data), then :func:`target_x0`. Returns (x~, z_t'') (B, ...)."""
    a, s, ts = teacher_levels.alpha, teacher_levels.sigma, teacher_levels.timesteps
    j = 2 * i
    x0, eps = teacher(params, schedule, z, ts[j], labels, w)
    z1 = ddim_move(x0, eps, a[j + 1], s[j + 1])
    x0, eps = teacher(params, schedule, z1, ts[j + 1], labels, w)
    z2 = ddim_move(x0, eps, a[j + 2], s[j + 2])
    return target_x0(z, z2, a[j], s[j], a[j + 2], s[j + 2]), z2


def truncated_snr_weight(alpha, sigma):
    """max(SNR, 1) with SNR = alpha^2 / sigma^2: (B,) -> (B,)."""
    return jnp.maximum(jnp.square(alpha) / jnp.square(sigma), 1.0)


class Batch(NamedTuple):
    """A distillation batch: z (B, ...) at the student's levels, their timesteps t (B,), labels
    (B,), weights w (B,), the targets x~ (B, ...) and the loss weights max(SNR, 1) (B,)."""

    z: jnp.ndarray
    t: jnp.ndarray
    labels: jnp.ndarray
    w: jnp.ndarray
    target: jnp.ndarray
    weight: jnp.ndarray


def distill_batch(
    teacher: Predictor, teacher_params, schedule, teacher_levels: Levels, x_data, labels, key,
    w_range: tuple[float, float],
) -> Batch:
    """The :class:`Batch` of data x_data (B, ...), labels (B,): a student level, a noise and a
    w ~ U[w_min, w_max] per example from ``key``, and the teacher's targets. It does not depend
    on the student, so the step computes it outside the gradient."""
    k_level, k_eps, k_w = jax.random.split(key, 3)
    batch = x_data.shape[0]
    num_levels = teacher_levels.timesteps.shape[0] // 2  # the student's steps
    i = jax.random.randint(k_level, (batch,), 0, num_levels)
    w = jax.random.uniform(k_w, (batch,), minval=w_range[0], maxval=w_range[1])
    j = 2 * i
    alpha, sigma = teacher_levels.alpha[j], teacher_levels.sigma[j]
    z = ddim_move(x_data, jax.random.normal(k_eps, x_data.shape), alpha, sigma)
    target, _ = distill_target(teacher, teacher_params, schedule, teacher_levels, z, i, labels, w)
    return Batch(
        z, teacher_levels.timesteps[j], labels, w, target, truncated_snr_weight(alpha, sigma)
    )


def student_loss(student: Predictor, params, schedule, b: Batch):
    """The truncated-SNR weighted x0 loss, mean over the batch of max(SNR, 1) times the mean
    squared error of the student's x0 against the target: a float32 scalar."""
    x0, _ = student(params, schedule, b.z, b.t, b.labels, b.w)
    error = jnp.mean(jnp.square(x0 - b.target).reshape(x0.shape[0], -1), axis=1)
    return jnp.mean(b.weight * error)


# ---------------------------------------------------------------------------------------------
# Students from teachers, and the compiled step


def graft(teacher_params, student_params):
    """The student's parameters with every parameter the teacher has copied from it: the
    w-embedding (which only the student has) keeps its initialisation. ValueError if a teacher
    parameter is missing from the student or has another shape (another architecture)."""
    flat_t = traverse_util.flatten_dict(jax.device_get(teacher_params))
    flat_s = traverse_util.flatten_dict(student_params)
    for path, value in flat_t.items():
        if path not in flat_s or flat_s[path].shape != value.shape:
            raise ValueError(
                f"the teacher's parameter {'/'.join(path)} {value.shape} has no match in the "
                "student: the student must be the teacher's network plus a w-embedding"
            )
    merged = {**flat_s, **{p: jnp.asarray(v) for p, v in flat_t.items()}}
    return traverse_util.unflatten_dict(merged)


def init_state(settings: DistillSettings, params) -> TrainState:
    """Step 0 of a round: copies of ``params`` (the step donates its state's buffers, and
    ``params`` may be the teacher's) as parameters and EMA, and a fresh optimiser state. Made
    by one jitted program (not leaf by leaf)."""
    return _init_program(settings)(params)


@functools.lru_cache(maxsize=8)
def _init_program(settings: DistillSettings):
    optimizer = make_optimizer(settings)

    @jax.jit
    def init(params):
        params = jax.tree_util.tree_map(jnp.copy, params)
        ema = jax.tree_util.tree_map(jnp.copy, params)
        return TrainState(
            step=jnp.int32(0), params=params, opt_state=optimizer.init(params), ema_params=ema
        )

    return init


@functools.lru_cache(maxsize=8)
def make_distill_step(
    settings: DistillSettings, student: Predictor, teacher: Predictor, mesh=None
):
    """A jitted ``step(state, teacher_params, schedule, teacher_levels, data_x, data_y,
    base_key) -> (state, metrics)``: one optimiser step on a batch drawn (with replacement) from
    data_x (M, ...), data_y (M,); every draw from ``fold_in(base_key, state.step)``, so a
    resumed round repeats an uninterrupted one. ``metrics``: loss and gradient norm (float32).
    ``settings`` give one round's length (:meth:`DistillSettings.for_round`). ``mesh``: split
    the batch over its devices (the arguments replicated on it, ``sharding.replicate``); the
    draws are the same with or without it (partitionable threefry).
    Cached per (settings, student, teacher, mesh), so a resumed run in the same process reuses
    it."""
    optimizer = make_optimizer(settings)
    w_range = (float(settings.w_min), float(settings.w_max))

    def split(a):  # the teacher's and the student's work follow the batch's sharding
        return a if mesh is None else jax.lax.with_sharding_constraint(a, batch_sharded(mesh))

    def step(state, teacher_params, schedule, teacher_levels, data_x, data_y, base_key):
        key = jax.random.fold_in(base_key, state.step)
        k_data, k_loss = jax.random.split(key)
        idx = jax.random.randint(k_data, (settings.batch_size,), 0, data_x.shape[0])
        # (the teacher's batch does not depend on the student: outside the gradient)
        batch = distill_batch(
            teacher, teacher_params, schedule, teacher_levels, split(data_x[idx]),
            split(data_y[idx]), k_loss, w_range,
        )
        loss, grads = jax.value_and_grad(lambda p: student_loss(student, p, schedule, batch))(
            state.params
        )
        new = apply_gradients(state, grads, optimizer, settings.ema_decay)
        return new, step_metrics(loss, grads)

    return jax.jit(step, donate_argnums=(0,))
