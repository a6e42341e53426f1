"""The update rules of the reverse chain, as objects in one registry.

A solver moves the chain from row k of a :class:`~diffusion_jax.schedules.Schedule` to row k-1,
given the denoiser's (guided, clipped) predictions x0_hat and eps_hat at row k. It owns a *carry*:
whatever it keeps between steps (nothing for one-step rules, the previous prediction for a
multistep one). :mod:`diffusion_jax.samplers` runs any of them inside the same jitted
``lax.scan``; adding a solver means adding a class here and an entry in ``SOLVERS``.

* ``ddpm``: ancestral sampling, x_{k-1} = mu~(x_k, x0_hat) + sigma_k z with sigma_k^2 = beta~_k
  (``variance="small"``) or beta_k (``"large"``); no noise at the last step. On a respaced
  schedule this is strided ancestral sampling.
* ``ddim``: x_{k-1} = sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1} - s^2) eps_hat + s z with
  s = eta sqrt(beta~_k); ``eta = 0`` is deterministic, ``eta = 1`` matches ancestral "small".
* ``dpmpp2m``: DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2), the multistep
  second-order solver of the probability-flow ODE in data-prediction form. With
  lambda = log(alpha / sigma), alpha = sqrt(abar), sigma = sqrt(1 - abar) and h = lambda_{k-1} -
  lambda_k:  x_{k-1} = (sigma_{k-1} / sigma_k) x_k - alpha_{k-1} (e^{-h} - 1) D, where
  D = (1 + 1/(2r)) x0_hat_k - 1/(2r) x0_hat_{k+1} and r = h_prev / h. The first step is first
  order (D = x0_hat_k, there is no history yet), as is the step into row 0 on chains shorter than
  ``LOWER_ORDER_FINAL`` rows; the last step, into the data (sigma = 0), is x0_hat itself.

Which row is first or last is decided with ``jnp.where``, never ``lax.cond`` (a conditional
inside a scan stalls GPUs).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.schedules import Schedule

VARIANCES = ("small", "large")
# What is done to the predicted x0 at each step: clip to [-1, 1], dynamic thresholding, nothing.
X0_MODES = ("clip", "threshold", "none")
# Saharia et al. (2022)'s quantile of |x0| for dynamic thresholding.
THRESHOLD_QUANTILE = 0.995

# DPM-Solver++'s recommendation: on chains of fewer than 10 steps the step into the last noise
# level is first order, which keeps very short chains stable.
LOWER_ORDER_FINAL = 10


class StepInput(NamedTuple):
    """What every solver step sees. ``k`` is a scalar int row (the chain walks K-1 .. 0); ``x``,
    ``x0`` and ``eps`` are (B, ...): the state at row k and the denoiser's predictions there;
    ``key`` is this step's PRNG key; ``eta`` a traced scalar; ``variance`` a static string."""

    schedule: Schedule
    k: jnp.ndarray
    x: jnp.ndarray
    x0: jnp.ndarray
    eps: jnp.ndarray
    key: jax.Array
    eta: jnp.ndarray
    variance: str


@dataclasses.dataclass(frozen=True)
class Solver:
    """A reverse-chain update rule. Subclasses set the class fields and define :meth:`step`.

    ``default_steps``: the chain length to use when none is asked for (None = every training
    step); ``spacing``: the respacing it is meant to run on (``schedules.SPACINGS``);
    ``stochastic``: whether it draws noise (and so whether ``eta`` or ``variance`` matter).
    """

    name = ""
    summary = ""
    default_steps: int | None = None
    spacing = "uniform"
    stochastic = False

    def init(self, x: jnp.ndarray):
        """The carry before the first step (a pytree; () when the rule keeps nothing)."""
        return ()

    def step(self, s: StepInput, carry):
        """``(x at row k-1, new carry)``."""
        raise NotImplementedError

    def tag(self, steps: int, eta: float = 0.0) -> str:
        """A short name for file names, e.g. ``ddim50_eta0.5``."""
        return f"{self.name}{steps}"


@dataclasses.dataclass(frozen=True)
class Ancestral(Solver):
    name = "ddpm"
    summary = "ancestral (DDPM) sampling; strided on a respaced chain"
    stochastic = True

    def step(self, s: StepInput, carry):
        noise = jax.random.normal(s.key, s.x.shape, jnp.float32)
        mean, small, _ = diffusion.q_posterior(s.schedule, s.x0, s.x, s.k)
        var = small if s.variance == "small" else s.schedule.betas[s.k]
        return mean + jnp.where(s.k > 0, jnp.sqrt(var), 0.0) * noise, carry


@dataclasses.dataclass(frozen=True)
class DDIM(Solver):
    name = "ddim"
    summary = "DDIM; eta = 0 deterministic, eta = 1 like ancestral"
    default_steps: int | None = 50
    stochastic = True

    def step(self, s: StepInput, carry):
        noise = jax.random.normal(s.key, s.x.shape, jnp.float32)
        abar_prev = s.schedule.alpha_bar_prev[s.k]
        sigma = s.eta * jnp.sqrt(s.schedule.posterior_variance[s.k])
        direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0))
        return jnp.sqrt(abar_prev) * s.x0 + direction * s.eps + sigma * noise, carry

    def tag(self, steps: int, eta: float = 0.0) -> str:
        return f"{self.name}{steps}" + (f"_eta{eta:g}" if eta else "")


def half_log_snr(alpha_bar):
    """lambda = log(alpha / sigma) = (log abar - log(1 - abar)) / 2, elementwise."""
    return 0.5 * (jnp.log(alpha_bar) - jnp.log1p(-alpha_bar))


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(Solver):
    name = "dpmpp2m"
    summary = "DPM-Solver++(2M), deterministic multistep second order"
    default_steps: int | None = 20
    # Evenly spaced in t, the last steps (near the data) stay ~0.35 or more apart in lambda
    # however many steps there are, and the second-order extrapolation overshoots there.
    spacing = "logsnr"

    def init(self, x):
        # (x0_hat of the previous step, that step's h); unused on the first step.
        return jnp.zeros_like(x), jnp.float32(1.0)

    def step(self, s: StepInput, carry):
        x0_prev, h_prev = carry
        sched, k = s.schedule, s.k
        last_row = sched.num_steps - 1
        abar = sched.alpha_bar[k]
        # Row 0 steps into the data (abar = 1, lambda = inf); keep the arithmetic finite there and
        # return x0_hat instead, the limit of the first-order update as sigma -> 0.
        abar_next = jnp.where(k > 0, sched.alpha_bar_prev[k], abar)
        h = half_log_snr(abar_next) - half_log_snr(abar)
        h = jnp.where(k > 0, h, 1.0)
        r = h_prev / h
        second = (1.0 + 0.5 / r) * s.x0 - (0.5 / r) * x0_prev
        first_order = (k == last_row) | ((k == 1) & (sched.num_steps < LOWER_ORDER_FINAL))
        d = jnp.where(first_order, s.x0, second)
        sigma_ratio = jnp.sqrt((1.0 - abar_next) / (1.0 - abar))
        x_next = sigma_ratio * s.x - jnp.sqrt(abar_next) * jnp.expm1(-h) * d
        return jnp.where(k > 0, x_next, s.x0), (s.x0, h)


SOLVERS: dict[str, Solver] = {s.name: s for s in (Ancestral(), DDIM(), DPMSolverPP2M())}
METHODS = tuple(SOLVERS)
# What sample.py uses when no --sampler is given: at its 20 steps it matched DDIM-50 on the
# shipped model (docs/RESULTS.md).
RECOMMENDED = "dpmpp2m"


def get(name: str) -> Solver:
    """The registered solver called ``name``; ValueError listing the choices otherwise."""
    if name not in SOLVERS:
        raise ValueError(f"method must be one of the registered samplers {METHODS}, got {name!r}")
    return SOLVERS[name]


def x0_settings(mode: str, quantile: float = THRESHOLD_QUANTILE) -> dict:
    """The ``clip`` and ``threshold`` sampler settings of an x0 mode in ``X0_MODES``."""
    if mode not in X0_MODES:
        raise ValueError(f"x0 must be one of {X0_MODES}, got {mode!r}")
    return dict(
        clip=None if mode == "none" else (-1.0, 1.0),
        threshold=quantile if mode == "threshold" else None,
    )


def default_steps(name: str, num_timesteps: int) -> int:
    """The chain length of solver ``name`` when none is given, capped at T."""
    steps = get(name).default_steps
    return num_timesteps if steps is None else min(steps, num_timesteps)
