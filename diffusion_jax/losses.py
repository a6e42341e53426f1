"""Training losses, with the label dropout that classifier-free guidance needs.

A *denoiser* here is any callable ``denoise_fn(params, x_t, t, labels, **kwargs) -> output`` with
``x_t`` of shape (B, ...), ``t`` int32 (B,) training timesteps in [0, T-1] and ``labels`` int32 (B,)
in [0, num_classes], where ``num_classes`` itself is the *null* (unconditional) label.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.schedules import Schedule

LOSS_TYPES = ("l2", "l1")
WEIGHTINGS = ("simple", "vlb", "min_snr")


def min_snr_weight(snr: jnp.ndarray, gamma: float, prediction: str) -> jnp.ndarray:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv 2303.09556) for a network that
    predicts ``prediction``: the x0-space weight min(SNR, gamma), expressed in the space the loss
    is computed in (eps: / SNR; v: / (SNR + 1); x0: as is). Same shape as ``snr``.

    It caps the weight of the low-noise steps, which are easy and dominate the x0-space error,
    so that steps at different noise levels stop competing for the gradient.
    """
    clipped = jnp.minimum(snr, gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1.0)
    if prediction == "x0":
        return clipped
    raise ValueError(f"min_snr weighting applies to eps, v or x0 prediction, not {prediction!r}")


def check_loss_config(prediction: str, loss_type: str, weighting: str) -> None:
    diffusion.check_prediction(prediction)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "vlb" and prediction != "mean":
        raise ValueError(
            "weighting='vlb' (the 1/(2 sigma_t^2)-weighted loss) applies to prediction='mean' "
            f"only; use weighting='simple' for prediction={prediction!r}"
        )
    if weighting == "min_snr" and prediction == "mean":
        raise ValueError(
            "weighting='min_snr' applies to prediction eps, v or x0; use weighting='vlb' or "
            "'simple' for prediction='mean'"
        )


def drop_labels(key: jax.Array, labels: jnp.ndarray, p_uncond: float, null_label: int):
    """Replace each label by ``null_label`` with probability ``p_uncond``. (B,) -> (B,) int32."""
    mask = jax.random.bernoulli(key, p_uncond, labels.shape)
    # jnp.where, not slicing by a traced count: this must work under jit.
    return jnp.where(mask, jnp.int32(null_label), labels.astype(jnp.int32))


def diffusion_loss(
    denoise_fn: Callable,
    params,
    schedule: Schedule,
    key: jax.Array,
    x0: jnp.ndarray,
    labels: jnp.ndarray | None,
    *,
    null_label: int,
    prediction: str = "eps",
    loss_type: str = "l2",
    weighting: str = "simple",
    p_uncond: float = 0.1,
    min_snr_gamma: float = 5.0,
    **denoise_kwargs,
):
    """The mean training loss over a batch, and per-example losses.

    Args:
      schedule: the *training* schedule (K == T rows, ``timesteps == arange(T)``).
      x0: clean data in [-1, 1], shape (B, ...).
      labels: int (B,) class labels in [0, null_label), or None for an unconditional model.
      null_label: the label meaning "no class" (the number of classes).
      prediction: what the network outputs, one of ``diffusion.PREDICTIONS``.
      loss_type: "l2" (squared error) or "l1", averaged over the non-batch axes.
      weighting: "simple" (unweighted, Ho et al.'s L_simple) or, for ``prediction="mean"``,
        "vlb": the squared error of the mean divided by 2 sigma_t^2 with sigma_t^2 = beta_t;
        or "min_snr" (eps, v and x0 prediction): :func:`min_snr_weight` with ``min_snr_gamma``.
      p_uncond: probability of replacing a label by ``null_label`` (classifier-free guidance).
      denoise_kwargs: passed to ``denoise_fn`` (e.g. ``rngs`` for dropout).

    Returns:
      ``(loss, per_example)``: a float32 scalar and a (B,) array.
    """
    check_loss_config(prediction, loss_type, weighting)
    batch = x0.shape[0]
    key_t, key_eps, key_drop = jax.random.split(key, 3)
    k = diffusion.sample_timesteps(key_t, batch, schedule.num_steps)
    eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
    x_t = diffusion.q_sample(schedule, x0, k, eps)
    if labels is None:
        labels = jnp.full((batch,), null_label, jnp.int32)
    elif p_uncond > 0:
        labels = drop_labels(key_drop, labels, p_uncond, null_label)
    output = denoise_fn(params, x_t, schedule.timesteps[k], labels, **denoise_kwargs)
    err = output.astype(jnp.float32) - diffusion.target(schedule, prediction, x0, x_t, k, eps)
    err = jnp.square(err) if loss_type == "l2" else jnp.abs(err)
    per_example = err.reshape(batch, -1).mean(axis=1)
    if weighting == "vlb":
        per_example = per_example / (2.0 * schedule.betas[k])
    elif weighting == "min_snr":
        snr = jnp.square(schedule.sqrt_alpha_bar[k] / schedule.sqrt_one_minus_alpha_bar[k])
        per_example = per_example * min_snr_weight(snr, min_snr_gamma, prediction)
    return per_example.mean(), per_example
