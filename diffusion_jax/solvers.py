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
* ``dpmpp3m``: DPM-Solver++(3M) (same paper), the multistep third-order solver: x0_hat taken as
  the quadratic in u = (lambda - lambda_k) / h through rows k, k+1, k+2, x0_hat_k + b1 u + b2 u^2,
  and e^lambda times it integrated exactly: x_{k-1} = (sigma_{k-1} / sigma_k) x_k - alpha_{k-1}
  ((e^{-h} - 1) x0_hat_k - h phi_2 b1 - 2 h phi_3 b2), with h phi_2 = 1 + (e^{-h} - 1) / h and
  2 h phi_3 = 1 - 2 phi_2 (phi_n the exponential integrator's phi functions at -h). The first
  step is first order, the second ``dpmpp2m``'s; on chains shorter than ``LOWER_ORDER_FINAL``
  rows the step into row 0 is first order and the one before at most second
  (:func:`multistep_order`).
* ``unipc``: UniPC (Zhao et al. 2023, arXiv 2302.04867) in data-prediction form with B(h) =
  e^h - 1 ("bh2"), UniP-2 + UniC. The network's x0_hat at the predicted x_k first corrects the
  step that led there (UniC, no extra call): from the corrected x_{k+1},
  x^c_k = (sigma_k / sigma_{k+1}) x^c_{k+1} - alpha_k (e^{-h} - 1) (x0_hat_{k+1} + sum_m a_m D_m
  / r_m) with D_m = x0_hat(lambda_{k+1} + r_m h) - x0_hat_{k+1}, the new point at r = 1 and the
  one before at r = -h_{k+2} / h; the a_m solve UniC's order conditions R a = g (g_n = n! hh
  phi_{n+1}(hh) / B(hh), hh = -h), and with the new point alone (after a first-order step) a =
  1/2. The predictor then steps from x^c_k: UniP-2, whose single coefficient 1/2 makes it
  ``dpmpp2m``'s step, first order where ``dpmpp2m``'s is. Third order; no corrector after the
  last step (x0_hat of the predicted row 0 is the sample).
* ``ipndm``: iPNDM (Zhang & Chen 2022, the DEIS paper, arXiv 2204.13902): DDIM's ODE dy/drho =
  eps in y = x / alpha, rho = sigma / alpha, stepped by Adams-Bashforth on eps_hat with the
  even-step weights of order min(4, steps taken + 1): y_{k-1} = y_k + (rho_{k-1} - rho_k)
  sum_j c_j eps_hat_{k+j} (c = 1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24).
  Order one is DDIM; the last step is x0_hat.
* ``distilled``: a distilled student's own chain (:mod:`diffusion_jax.distillation`): DDIM with
  eta = 0 on the time grid the student was distilled for, the guidance weight w fed to the
  network as an input (one call per step, no doubled batch). It needs a student checkpoint
  (``distill.py``); :func:`diffusion_jax.plans.resolve` takes its grid from the checkpoint.

Which row is first or last, and the order of a multistep step, are decided with ``jnp.where``,
never ``lax.cond`` (a conditional inside a scan stalls GPUs).
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
    ``student``: it samples a distilled student, whose network takes w as an input, on the
    student's own time grid (no spacing, no guidance interval or schedule).
    """

    name = ""
    summary = ""
    default_steps: int | None = None
    spacing = "uniform"
    stochastic = False
    student = False

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


def multistep_order(k, num_steps: int, max_order: int):
    """The order of a multistep rule's step from row k: one more than the rows already visited
    (the history it has), at most ``max_order``; on chains shorter than ``LOWER_ORDER_FINAL`` rows
    also at most k, so the step into row 0 is first order and the one before at most second."""
    order = jnp.minimum(max_order, num_steps - k)
    return jnp.where(num_steps < LOWER_ORDER_FINAL, jnp.minimum(order, k), order)


def lambda_step(sched: Schedule, k):
    """``(abar_k, abar_{k-1}, h)`` of the step from row k, h = lambda_{k-1} - lambda_k > 0.

    Row 0 steps into the data (abar = 1, lambda = inf); there abar_{k-1} is abar_k and h = 1, which
    keeps the arithmetic finite: the solvers return x0_hat instead, the limit of the first-order
    update as sigma -> 0."""
    abar = sched.alpha_bar[k]
    abar_next = jnp.where(k > 0, sched.alpha_bar_prev[k], abar)
    h = jnp.where(k > 0, half_log_snr(abar_next) - half_log_snr(abar), 1.0)
    return abar, abar_next, h


def first_order(abar, abar_next, h, x, d):
    """The exponential-integrator step of the data-prediction ODE with x0_hat held at d:
    (sigma_next / sigma) x - alpha_next (e^{-h} - 1) d. Shapes as x."""
    sigma_ratio = jnp.sqrt((1.0 - abar_next) / (1.0 - abar))
    return sigma_ratio * x - jnp.sqrt(abar_next) * jnp.expm1(-h) * d


def dpmpp2m_d(x0, x0_prev, h, h_prev):
    """DPM-Solver++(2M)'s D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev, r = h_prev / h."""
    half_over_r = 0.5 * h / h_prev
    return (1.0 + half_over_r) * x0 - half_over_r * x0_prev


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
        abar, abar_next, h = lambda_step(s.schedule, s.k)
        order = multistep_order(s.k, s.schedule.num_steps, 2)
        d = jnp.where(order == 1, s.x0, dpmpp2m_d(s.x0, x0_prev, h, h_prev))
        x_next = first_order(abar, abar_next, h, s.x, d)
        return jnp.where(s.k > 0, x_next, s.x0), (s.x0, h)


@dataclasses.dataclass(frozen=True)
class DPMSolverPP3M(Solver):
    name = "dpmpp3m"
    summary = "DPM-Solver++(3M), deterministic multistep third order"
    default_steps: int | None = 20
    spacing = "logsnr"

    def init(self, x):
        # (x0_hat at rows k+1 and k+2, the steps h that led to rows k and k+1)
        return jnp.zeros_like(x), jnp.zeros_like(x), jnp.float32(1.0), jnp.float32(1.0)

    def step(self, s: StepInput, carry):
        x1, x2, h1, h2 = carry
        abar, abar_next, h = lambda_step(s.schedule, s.k)
        order = multistep_order(s.k, s.schedule.num_steps, 3)
        # x0_hat as a quadratic in u = (lambda - lambda_k) / h through rows k, k+1, k+2 (at
        # u = 0, -r0, -r0 - r1): x0 + b1 u + b2 u^2, from divided differences.
        r0, r1 = h1 / h, h2 / h
        d0, d1 = (s.x0 - x1) / r0, (x1 - x2) / r1
        b2 = (d0 - d1) / (r0 + r1)
        b1 = d0 + r0 * b2
        # e^lambda times that quadratic integrated exactly: alpha_next (h phi_2(-h) b1 +
        # 2 h phi_3(-h) b2) on top of the first-order step, with h phi_2(-h) = 1 + (e^{-h} - 1)/h
        # and 2 h phi_3(-h) = 1 - 2 phi_2(-h).
        h_phi2 = 1.0 + jnp.expm1(-h) / h
        third = jnp.sqrt(abar_next) * (h_phi2 * b1 + (1.0 - 2.0 * h_phi2 / h) * b2)
        d = jnp.where(order == 1, s.x0, dpmpp2m_d(s.x0, x1, h, h1))
        x_next = first_order(abar, abar_next, h, s.x, d)
        x_next = jnp.where(order == 3, first_order(abar, abar_next, h, s.x, s.x0) + third, x_next)
        return jnp.where(s.k > 0, x_next, s.x0), (s.x0, x1, h, h1)


def unic_coefficients(h, r_old):
    """UniC-2's (a_old, a_new) for the differences at r_old < 0 and at 1 (in units of the step h):
    the solution of [[1, 1], [r_old, 1]] a = (g_1, g_2), g_n = n! hh phi_{n+1}(hh) / B(hh) with
    hh = -h (the data-prediction step) and B(hh) = e^{hh} - 1 (the "bh2" variant)."""
    hh = -h
    b = jnp.expm1(hh)
    phi1 = b / hh
    phi2 = (phi1 - 1.0) / hh
    g1 = (phi1 - 1.0) / b
    g2 = 2.0 * (phi2 - 0.5) / b
    a_old = (g1 - g2) / (1.0 - r_old)
    return a_old, g1 - a_old


@dataclasses.dataclass(frozen=True)
class UniPC(Solver):
    name = "unipc"
    summary = "UniPC (bh2): UniP-2 predictor + UniC corrector, third order, no extra calls"
    default_steps: int | None = 20
    spacing = "logsnr"

    def init(self, x):
        # (corrected x at row k+1, x0_hat at rows k+1 and k+2, the steps h into rows k and k+1)
        z = jnp.zeros_like(x)
        return z, z, z, jnp.float32(1.0), jnp.float32(1.0)

    def step(self, s: StepInput, carry):
        xc1, x1, x2, h1, h2 = carry
        sched, k, num_steps = s.schedule, s.k, s.schedule.num_steps
        # UniC: redo the step that led to row k (from the corrected x at row k+1, base x0_hat
        # x1) with x0_hat at row k, which the network just gave for the predicted x: UniC-1
        # (coefficient 1/2) after a first-order predictor, else UniC-2.
        abar1, abar = sched.alpha_bar[jnp.minimum(k + 1, num_steps - 1)], sched.alpha_bar[k]
        a_old, a_new = unic_coefficients(h1, -h2 / h1)
        unic2 = a_old * (x1 - x2) * (h1 / h2) + a_new * (s.x0 - x1)
        unic = jnp.where(multistep_order(k + 1, num_steps, 2) == 1, 0.5 * (s.x0 - x1), unic2)
        xc = first_order(abar1, abar, h1, xc1, x1 + unic)
        xc = jnp.where(k < num_steps - 1, xc, s.x)
        # UniP-2 with B(h) = e^{-h} - 1 and its one coefficient 1/2 is DPM-Solver++(2M).
        abar, abar_next, h = lambda_step(sched, k)
        order = multistep_order(k, num_steps, 2)
        d = jnp.where(order == 1, s.x0, dpmpp2m_d(s.x0, x1, h, h1))
        x_next = first_order(abar, abar_next, h, xc, d)
        return jnp.where(k > 0, x_next, s.x0), (xc, s.x0, x1, h, h1)


# Adams-Bashforth coefficients for evenly spaced steps, orders 1-4 (newest eps first).
ADAMS_BASHFORTH = (
    (1.0, 0.0, 0.0, 0.0),
    (3 / 2, -1 / 2, 0.0, 0.0),
    (23 / 12, -16 / 12, 5 / 12, 0.0),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


@dataclasses.dataclass(frozen=True)
class IPNDM(Solver):
    name = "ipndm"
    summary = "iPNDM: Adams-Bashforth up to 4th order on eps in DDIM's ODE variable"
    default_steps: int | None = 20
    # Its coefficients assume even steps in rho = sigma / alpha, yet "karras" (a grid in rho) did
    # worse than "logsnr" at 5-15 steps: on Gaussian data (output std off by +7.5% vs +5% at 10
    # steps, cosine T = 1000) and on the shipped model (10 steps, w = 1, 40 samples: RMS distance
    # to the ODE solution 0.21 vs 0.10, and karras left visible noise).
    spacing = "logsnr"

    def init(self, x):
        # eps_hat at rows k+1, k+2, k+3
        return jnp.zeros((3,) + x.shape, jnp.float32)

    def step(self, s: StepInput, carry):
        sched, k = s.schedule, s.k
        order = jnp.minimum(4, sched.num_steps - k)
        coefs = jnp.asarray(ADAMS_BASHFORTH, jnp.float32)[order - 1]
        history = jnp.concatenate([s.eps[None], carry])
        eps_ab = jnp.tensordot(coefs, history, axes=1)
        # x_{k-1} = alpha_{k-1} (x_k / alpha_k + (rho_{k-1} - rho_k) eps_ab), written so that
        # x_k / alpha_k (huge at the noisy end) is never formed: x_k / alpha_k = x0 + rho_k eps.
        abar_next = sched.alpha_bar_prev[k]
        rho = jnp.sqrt((1.0 - sched.alpha_bar[k]) / sched.alpha_bar[k])
        x_next = (
            jnp.sqrt(abar_next) * (s.x0 + rho * (s.eps - eps_ab))
            + jnp.sqrt(1.0 - abar_next) * eps_ab
        )
        return jnp.where(k > 0, x_next, s.x0), history[:3]


@dataclasses.dataclass(frozen=True)
class Distilled(DDIM):
    name = "distilled"
    summary = "a distilled student's DDIM steps, w as its input (distill.py's checkpoints)"
    default_steps: int | None = None
    stochastic = False
    student = True

    def step(self, s: StepInput, carry):
        # the student was trained to match its teacher's deterministic (eta = 0) steps
        return super().step(s._replace(eta=jnp.zeros_like(s.eta)), carry)


SOLVERS: dict[str, Solver] = {
    s.name: s
    for s in (Ancestral(), DDIM(), DPMSolverPP2M(), DPMSolverPP3M(), UniPC(), IPNDM(), Distilled())
}
METHODS = tuple(SOLVERS)
# the solvers of a model trained by train.py (all but a distilled student's)
TRAINED = tuple(name for name, solver in SOLVERS.items() if not solver.student)
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
