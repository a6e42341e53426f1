"""Noise schedules and respacing.

Conventions used throughout the library:

* The training chain has ``T`` steps. Timesteps are **0-indexed**: ``t = 0`` is the least noisy
  level (DDPM's ``x_1``) and ``t = T - 1`` the noisiest (DDPM's ``x_T``). ``x_0`` (the data) has no
  index of its own: ``alpha_bar_prev[0] == 1``.
* A :class:`Schedule` holds one row per step of the chain it describes, all float32 arrays of
  shape ``(K,)``. For the training schedule ``K == T``; a respaced schedule (see :func:`respace`)
  keeps ``K < T`` of the training timesteps and stores their original indices in ``timesteps``,
  which is what the network is conditioned on.
* Every derived quantity is computed once in float64 numpy and only then stored as float32, so
  that products such as ``alpha_bar`` do not accumulate float32 rounding.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULES = ("linear", "cosine", "sigmoid")

# Betas at (or above) 1 would destroy the signal in one step and make 1 - beta = 0; every
# schedule is clipped here, as in Nichol & Dhariwal (2021).
MAX_BETA = 0.999


@struct.dataclass
class Schedule:
    """Per-step coefficients of a (possibly respaced) diffusion chain; every field has shape (K,).

    ``betas[k]`` is the variance of the step from row ``k - 1`` to row ``k`` (from the data for
    ``k = 0``). ``posterior_*`` describe q(x_{k-1} | x_k, x_0) on this chain. ``model_mean_coef*``
    are the posterior-mean coefficients of the *training* chain at ``timesteps[k]``: a network
    trained to predict the posterior mean predicts those, whatever chain the sampler walks.
    """

    timesteps: jnp.ndarray  # int32, indices into the training chain (what the network sees)
    betas: jnp.ndarray
    alphas: jnp.ndarray
    alpha_bar: jnp.ndarray
    alpha_bar_prev: jnp.ndarray
    sqrt_alpha_bar: jnp.ndarray
    sqrt_one_minus_alpha_bar: jnp.ndarray
    sqrt_recip_alpha_bar: jnp.ndarray
    sqrt_recipm1_alpha_bar: jnp.ndarray
    posterior_variance: jnp.ndarray  # beta_tilde; exactly 0 at k = 0
    posterior_log_variance_clipped: jnp.ndarray  # log beta_tilde with row 0 replaced by row 1
    posterior_mean_coef1: jnp.ndarray  # multiplies x_0
    posterior_mean_coef2: jnp.ndarray  # multiplies x_k
    model_mean_coef1: jnp.ndarray
    model_mean_coef2: jnp.ndarray

    @property
    def num_steps(self) -> int:
        """K, the number of steps of this chain."""
        return self.betas.shape[0]


def _check_num_timesteps(num_timesteps) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps}")
    return int(num_timesteps)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear betas (1e-4 .. 0.02 at T=1000), scaled by 1000/T. Shape (T,), float64.

    The scaling keeps the total noise of the chain (and so sqrt(alpha_bar_T) ~ 0.006) roughly
    independent of T; for T <= 20 the largest betas reach the 0.999 clip.
    """
    scale = 1000.0 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    return np.minimum(betas, MAX_BETA)


def _betas_from_alpha_bar_fn(alpha_bar_fn, num_timesteps: int) -> np.ndarray:
    """betas_t = 1 - abar(t/T) / abar((t-1)/T), clipped; abar_fn maps [0, 1] -> (0, 1]."""
    grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = alpha_bar_fn(grid)
    abar = abar / abar[0]
    betas = 1.0 - abar[1:] / abar[:-1]
    return np.clip(betas, 0.0, MAX_BETA)


def cosine_betas(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: abar(u) = cos^2(pi/2 (u + s) / (1 + s)). Shape (T,)."""
    return _betas_from_alpha_bar_fn(
        lambda u: np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2, num_timesteps
    )


def sigmoid_betas(
    num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> np.ndarray:
    """Sigmoid schedule (Jabri et al. 2022): abar(u) falls as a rescaled sigmoid. Shape (T,).

    Spends more steps at middle noise levels than the cosine schedule; ``tau`` sharpens it.
    """

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
    return _betas_from_alpha_bar_fn(
        lambda u: (v_end - sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start),
        num_timesteps,
    )


_BETA_FNS = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}


def _chain_coefficients(alpha_bar: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 coefficients of the chain whose cumulative products are ``alpha_bar`` (K,)."""
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    alphas = alpha_bar / alpha_bar_prev
    betas = 1.0 - alphas
    posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    # Row 0 has zero posterior variance; borrow row 1 for the log so it stays finite (a
    # one-step chain has no row 1 and never adds noise, so any finite value will do).
    log_var = np.log(np.append(posterior_variance[1:2], posterior_variance[1:]))
    if alpha_bar.shape[0] == 1:
        log_var = np.zeros(1)
    return dict(
        betas=betas,
        alphas=alphas,
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        sqrt_alpha_bar=np.sqrt(alpha_bar),
        sqrt_one_minus_alpha_bar=np.sqrt(1.0 - alpha_bar),
        sqrt_recip_alpha_bar=np.sqrt(1.0 / alpha_bar),
        sqrt_recipm1_alpha_bar=np.sqrt(1.0 / alpha_bar - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=log_var,
        posterior_mean_coef1=betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar),
        posterior_mean_coef2=(1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar),
    )


def _schedule(timesteps: np.ndarray, alpha_bar: np.ndarray, training_alpha_bar: np.ndarray):
    """The Schedule visiting ``timesteps`` of the training chain with cumulative ``alpha_bar``."""
    coefs = _chain_coefficients(alpha_bar)
    training = _chain_coefficients(training_alpha_bar)
    coefs["model_mean_coef1"] = training["posterior_mean_coef1"][timesteps]
    coefs["model_mean_coef2"] = training["posterior_mean_coef2"][timesteps]
    fields = {k: jnp.asarray(np.asarray(v, dtype=np.float32)) for k, v in coefs.items()}
    return Schedule(timesteps=jnp.asarray(np.asarray(timesteps, dtype=np.int32)), **fields)


def get_betas(name: str, num_timesteps: int) -> np.ndarray:
    """The float64 betas of a named schedule. Shape (T,)."""
    if name not in _BETA_FNS:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    return _BETA_FNS[name](_check_num_timesteps(num_timesteps))


def make_schedule(name: str, num_timesteps: int) -> Schedule:
    """The training schedule: ``name`` in ``SCHEDULES``, ``num_timesteps`` (T) >= 1 steps."""
    alpha_bar = np.cumprod(1.0 - get_betas(name, num_timesteps))
    return _schedule(np.arange(alpha_bar.shape[0]), alpha_bar, alpha_bar)


SPACINGS = ("uniform", "logsnr", "quadratic", "karras")
# The spacings placed by the log-SNR of the training chain, which stop at its floor LOGSNR_MIN.
SNR_SPACINGS = ("logsnr", "karras")
# Karras et al. (2022)'s rho: sigma^(1/rho) evenly spaced; 7 is their choice for every dataset.
KARRAS_RHO = 7.0


# The noisy end of the "logsnr" spacing: half log-SNR -5.1, where sqrt(alpha_bar) ~ 0.006 (the
# level DDPM's linear schedule ends at). Below it a chain only walks pure noise: the cosine
# schedule's last ten steps fall to half log-SNR -9.9, where x0 predicted from eps is the noise
# magnified by 1 / sqrt(alpha_bar) ~ 2e4, and the logsnr spacing would put a third of its steps
# there (diffusers' DPM-Solver clips lambda at the same value for the same reason).
LOGSNR_MIN = -10.2


def _distinct(timesteps: np.ndarray, last: int) -> np.ndarray:
    """Rounded increasing timesteps made strictly increasing, the first 0 and the last ``last``.

    Where rounding made neighbours collide (dense ends of a non-uniform spacing) each is pushed
    just past the one before; a second pass from the top keeps the last at ``last``.
    """
    t = np.round(timesteps).astype(np.int64)
    t[0] = 0
    for i in range(1, len(t)):
        t[i] = max(t[i], t[i - 1] + 1)
    t[-1] = last
    for i in range(len(t) - 2, -1, -1):
        t[i] = min(t[i], t[i + 1] - 1)
    return t


def _log_snr(alpha_bar: np.ndarray) -> np.ndarray:
    """log(abar / (1 - abar)) in float64, decreasing in t. Shape as ``alpha_bar``."""
    abar = np.asarray(alpha_bar, np.float64)
    return np.log(abar) - np.log1p(-abar)


def _floor_last(logsnr: np.ndarray) -> int:
    """The last timestep whose log-SNR is at least ``LOGSNR_MIN`` (t = 0 whatever its value)."""
    return int(np.nonzero(logsnr >= min(LOGSNR_MIN, logsnr[0]))[0][-1])


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = KARRAS_RHO):
    """Karras et al. (2022), eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho)
    - sigma_max^(1/rho)))^rho for i = 0 .. N-1 (noisiest first). Shape (N,), float64; N >= 2."""
    i = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + i * (lo - hi)) ** rho


def respaced_timesteps(
    num_timesteps: int, num_steps: int, spacing: str = "uniform", alpha_bar=None
) -> np.ndarray:
    """K distinct training timesteps, increasing. Shape (K,), int.

    ``spacing`` chooses where the K steps go:

    * ``"uniform"``: evenly spaced in t (DDIM's default);
    * ``"quadratic"``: t_i = (T-1) (i / (K-1))^2, dense near the data (the DDIM paper's CIFAR
      setting);
    * ``"logsnr"``: evenly spaced in log-SNR = log(abar / (1 - abar)) (DPM-Solver's choice: equal
      steps of its variable lambda = log-SNR / 2), from t = 0 up to the last timestep whose
      log-SNR is at least ``LOGSNR_MIN`` (T-1 itself when the schedule ends above it, as the
      linear one does);
    * ``"karras"``: Karras et al. (2022)'s grid, sigma^(1/7) evenly spaced (:func:`karras_sigmas`)
      in sigma = sqrt((1 - abar) / abar) = exp(-log-SNR / 2), between the same two ends as
      ``"logsnr"``: sparser than it near the data, denser at middle noise levels (rho -> infinity
      would give "logsnr").

    "logsnr" and "karras" (``SNR_SPACINGS``) need ``alpha_bar``, the training chain's (T,); their
    targets are mapped to fractional timesteps by interpolating log-SNR linearly between
    integers, then rounded (neighbours that collide are pushed apart, see :func:`_distinct`).

    For K >= 2 both ends are included (0 and T-1, or the floor's last step); K = 1 keeps only the
    last (one jump from noise to data). K = T gives every timestep for "uniform" and "quadratic".
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer in [1, {num_timesteps}], got {num_steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    last = num_timesteps - 1
    if spacing in SNR_SPACINGS:
        if alpha_bar is None or np.shape(alpha_bar) != (num_timesteps,):
            raise ValueError(
                f"spacing={spacing!r} needs the training alpha_bar of shape ({num_timesteps},)"
            )
        logsnr = _log_snr(alpha_bar)
        last = _floor_last(logsnr)
    if not 1 <= num_steps <= last + 1:
        where = "" if last == num_timesteps - 1 else f", {last + 1} above the log-SNR floor"
        raise ValueError(
            f"num_steps must be in [1, {last + 1}] (the training chain has {num_timesteps} "
            f"steps{where}), got {num_steps}"
        )
    if num_steps == 1:
        return np.array([last], np.int64)
    u = np.linspace(0.0, 1.0, num_steps)
    if spacing == "uniform":
        # Spacing (T-1)/(K-1) >= 1, so rounding alone keeps the K values distinct.
        return np.round(np.linspace(last, 0, num_steps))[::-1].astype(np.int64)
    if spacing == "quadratic":
        return _distinct(last * u**2, last)
    if spacing == "logsnr":
        targets = logsnr[0] + u * (logsnr[last] - logsnr[0])
    else:  # karras: sigma = exp(-logsnr / 2), its grid reversed to run from t = 0
        sigmas = karras_sigmas(np.exp(-logsnr[0] / 2), np.exp(-logsnr[last] / 2), num_steps)
        targets = -2.0 * np.log(sigmas[::-1])
    # The fractional timestep of each target, interpolating log-SNR linearly between integers.
    frac = np.interp(-targets, -logsnr[: last + 1], np.arange(last + 1, dtype=np.float64))
    return _distinct(frac, last)


def max_steps(name: str, num_timesteps: int, spacing: str = "uniform") -> int:
    """The most steps :func:`respace` can keep with ``spacing``: T, or for the
    ``SNR_SPACINGS`` the timesteps at or above ``LOGSNR_MIN``."""
    if spacing not in SNR_SPACINGS:
        return _check_num_timesteps(num_timesteps)
    return _floor_last(_log_snr(np.cumprod(1.0 - get_betas(name, num_timesteps)))) + 1


def respace(name: str, num_timesteps: int, num_steps: int, spacing: str = "uniform") -> Schedule:
    """The training schedule ``(name, T)`` restricted to ``num_steps`` (K) of its steps, placed by
    ``spacing`` (one of ``SPACINGS``, see :func:`respaced_timesteps`).

    The cumulative alpha_bar of the kept timesteps is unchanged; the betas of the shorter chain are
    recomputed from it (beta'_k = 1 - abar[s_k] / abar[s_{k-1}]), so its forward marginals are
    exactly those of the full chain. K = T returns the full schedule.
    """
    alpha_bar = np.cumprod(1.0 - get_betas(name, num_timesteps))
    keep = respaced_timesteps(num_timesteps, num_steps, spacing, alpha_bar)
    return _schedule(keep, alpha_bar[keep], alpha_bar)


def on_timesteps(name: str, num_timesteps: int, timesteps) -> Schedule:
    """The training schedule ``(name, T)`` walked on the given training ``timesteps`` (distinct,
    decreasing: the noisiest first, e.g. ``(999, 600, 300, 0)``): the chain :func:`respace`
    builds when its spacing places the same timesteps, so both give the same samples."""
    keep = np.asarray(timesteps, np.int64)[::-1]  # a schedule's rows go from the data upwards
    if keep.ndim != 1 or keep.size == 0 or np.any(np.diff(keep) <= 0):
        raise ValueError(f"timesteps must be distinct and decreasing, got {list(timesteps)}")
    if keep[0] < 0 or keep[-1] > _check_num_timesteps(num_timesteps) - 1:
        raise ValueError(f"timesteps must be in [0, {num_timesteps - 1}], got {list(timesteps)}")
    alpha_bar = np.cumprod(1.0 - get_betas(name, num_timesteps))
    return _schedule(keep, alpha_bar[keep], alpha_bar)
