"""The forward process q, its posterior, and conversions between what a network predicts.

All functions are pure and shape-polymorphic: ``x`` arrays are ``(B, ...)`` (NHWC images or
``(B, D)`` vectors) and ``k`` is an int array of shape ``(B,)`` indexing rows of a
:class:`~diffusion_jax.schedules.Schedule`. Data live in [-1, 1].

A network can be trained to predict one of ``PREDICTIONS``:

* ``"eps"``: the noise in x_k = sqrt(abar) x_0 + sqrt(1 - abar) eps;
* ``"x0"``: the clean data;
* ``"v"``: v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022);
* ``"mean"``: the posterior mean of q(x_{k-1} | x_k, x_0) of the *training* chain.

:func:`to_x0_eps` turns any of them into the pair (x_0, eps) that the samplers use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v", "mean")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def take(coef: jnp.ndarray, k: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """``coef[k]`` reshaped to broadcast against ``x``: (K,), (B,), (B, ...) -> (B, 1, ...)."""
    k = jnp.asarray(k)
    return coef[k].reshape(k.shape + (1,) * (x.ndim - k.ndim))


def q_sample(schedule: Schedule, x0: jnp.ndarray, k: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """A draw of x_k ~ q(x_k | x_0) given the standard normal ``eps``: same shape as ``x0``."""
    return (
        take(schedule.sqrt_alpha_bar, k, x0) * x0
        + take(schedule.sqrt_one_minus_alpha_bar, k, x0) * eps
    )


def q_posterior(schedule: Schedule, x0, x_k, k):
    """q(x_{k-1} | x_k, x_0) on ``schedule``'s chain: ``(mean, variance, log_variance_clipped)``.

    ``mean`` has the shape of ``x0``; the variances broadcast against it. At k = 0 the variance
    is 0 and x_{-1} means the data itself.
    """
    mean = (
        take(schedule.posterior_mean_coef1, k, x0) * x0
        + take(schedule.posterior_mean_coef2, k, x0) * x_k
    )
    var = take(schedule.posterior_variance, k, x0)
    log_var = take(schedule.posterior_log_variance_clipped, k, x0)
    return mean, var, log_var


def x0_from_eps(schedule: Schedule, x_k, k, eps):
    return (
        take(schedule.sqrt_recip_alpha_bar, k, x_k) * x_k
        - take(schedule.sqrt_recipm1_alpha_bar, k, x_k) * eps
    )


def eps_from_x0(schedule: Schedule, x_k, k, x0):
    return (take(schedule.sqrt_recip_alpha_bar, k, x_k) * x_k - x0) / take(
        schedule.sqrt_recipm1_alpha_bar, k, x_k
    )


def v_from_x0_eps(schedule: Schedule, x0, eps, k):
    return (
        take(schedule.sqrt_alpha_bar, k, x0) * eps
        - take(schedule.sqrt_one_minus_alpha_bar, k, x0) * x0
    )


def x0_from_v(schedule: Schedule, x_k, k, v):
    return (
        take(schedule.sqrt_alpha_bar, k, x_k) * x_k
        - take(schedule.sqrt_one_minus_alpha_bar, k, x_k) * v
    )


def model_mean_from_x0(schedule: Schedule, x_k, k, x0):
    """The training chain's posterior mean at ``schedule.timesteps[k]`` (what "mean" predicts)."""
    return (
        take(schedule.model_mean_coef1, k, x_k) * x0 + take(schedule.model_mean_coef2, k, x_k) * x_k
    )


def x0_from_model_mean(schedule: Schedule, x_k, k, mean):
    return (mean - take(schedule.model_mean_coef2, k, x_k) * x_k) / take(
        schedule.model_mean_coef1, k, x_k
    )


def target(schedule: Schedule, prediction: str, x0, x_k, k, eps):
    """What a network with output type ``prediction`` should output for (x_0, x_k, eps)."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(schedule, x0, eps, k)
    return model_mean_from_x0(schedule, x_k, k, x0)


def to_x0_eps(
    schedule: Schedule,
    prediction: str,
    output: jnp.ndarray,
    x_k: jnp.ndarray,
    k: jnp.ndarray,
    clip: tuple[float, float] | None = None,
    threshold: float | None = None,
):
    """Turn a network ``output`` (same shape as ``x_k``) into the pair ``(x0_hat, eps_hat)``.

    With ``clip=(lo, hi)`` the predicted x_0 is clipped to the data range; with ``threshold`` (a
    quantile in (0, 1]) it is dynamically thresholded instead (:func:`dynamic_threshold`, which
    assumes data in [-1, 1]). Either way eps is recomputed from the new x_0, so that the two stay
    consistent with x_k.
    """
    check_prediction(prediction)
    output = output.astype(jnp.float32)
    if prediction == "eps":
        eps, x0 = output, x0_from_eps(schedule, x_k, k, output)
    elif prediction == "x0":
        x0 = output
        eps = eps_from_x0(schedule, x_k, k, x0)
    elif prediction == "v":
        x0 = x0_from_v(schedule, x_k, k, output)
        eps = (
            take(schedule.sqrt_one_minus_alpha_bar, k, x_k) * x_k
            + take(schedule.sqrt_alpha_bar, k, x_k) * output
        )
    else:
        x0 = x0_from_model_mean(schedule, x_k, k, output)
        eps = eps_from_x0(schedule, x_k, k, x0)
    if threshold is not None:
        x0 = dynamic_threshold(x0, threshold)
    elif clip is not None:
        x0 = jnp.clip(x0, clip[0], clip[1])
    if threshold is not None or clip is not None:
        eps = eps_from_x0(schedule, x_k, k, x0)
    return x0, eps


def dynamic_threshold(x0: jnp.ndarray, quantile: float) -> jnp.ndarray:
    """Saharia et al. (2022)'s dynamic thresholding of predicted data in [-1, 1]: (B, ...) -> same.

    Per sample, s = max(1, the ``quantile`` of |x0|); x0 is clipped to [-s, s] and divided by s.
    A sample already inside [-1, 1] is unchanged; one that overshoots is pulled back into the range
    without flattening its extremes to a wall of +-1 as fixed clipping does at large guidance.
    """
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, quantile, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def sample_timesteps(key: jax.Array, batch_size: int, num_steps: int) -> jnp.ndarray:
    """Rows k uniform over all ``num_steps`` steps of a chain: int32, shape (B,)."""
    return jax.random.randint(key, (batch_size,), 0, num_steps, dtype=jnp.int32)
