"""Classifier-free guidance: the guided output, and how strong the guidance is at each step.

The guided output is (1 + w) out(x, t, c) - w out(x, t, null) (:func:`guided_output`). The
weight may change along the chain: :func:`guidance_scale` gives, for each row of a chain, the
factor its step multiplies ``w`` by:

* an interval [t_lo, t_hi] of training timesteps outside which the factor is 0, so only the
  middle of the chain is guided (Kynkaanniemi et al. 2024, "Applying guidance in a limited
  interval improves sample and distribution quality": guidance at high noise costs diversity
  and at low noise does little);
* a schedule in t: ``constant`` (1), ``linear`` (2 (1 - t / (T-1)), rising as the chain nears
  the data, the "linear" scheduler of Wang et al. 2024) or ``reverse_linear`` (2 t / (T-1)).
  Both ramps average 1 over t = 0..T-1, so a given ``w`` spends the same guidance in all.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("constant", "linear", "reverse_linear")


def guidance_scale(
    timesteps, num_timesteps: int, interval: tuple[int, int] | None = None, schedule="constant"
) -> np.ndarray:
    """The factor of ``w`` at each row of a chain: timesteps (K,) ints in [0, T-1] -> (K,)
    float64, zero outside the inclusive ``interval`` (None = everywhere)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"guidance schedule must be one of {SCHEDULES}, got {schedule!r}")
    t = np.asarray(timesteps, np.float64)
    last = max(int(num_timesteps) - 1, 1)
    if schedule == "constant":
        scale = np.ones_like(t)
    elif schedule == "linear":
        scale = 2.0 * (1.0 - t / last)
    else:
        scale = 2.0 * t / last
    if interval is not None:
        lo, hi = check_interval(interval, num_timesteps)
        scale = np.where((t >= lo) & (t <= hi), scale, 0.0)
    return scale


def check_interval(interval, num_timesteps: int) -> tuple[int, int]:
    """``(lo, hi)`` as ints with 0 <= lo <= hi <= T-1; ValueError saying what is wrong."""
    try:
        lo, hi = (int(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"a guidance interval is two timesteps LO,HI, got {interval!r}") from None
    if not 0 <= lo <= hi <= num_timesteps - 1:
        raise ValueError(
            f"the guidance interval must satisfy 0 <= LO <= HI <= {num_timesteps - 1} "
            f"(training timesteps, T = {num_timesteps}), got {lo},{hi}"
        )
    return lo, hi


def guided_output(denoise_fn, params, x, t, labels, w, null_label: int, guided: bool):
    """The denoiser's output with classifier-free guidance, (1 + w) out_c - w out_u.

    Combining raw outputs equals combining eps: every conversion to eps is affine in the output
    at fixed x_t and the weights (1 + w, -w) sum to one. ``guided`` is static: when False the
    unconditional branch is not traced at all. Shapes: x (B, ...), t and labels (B,), w scalar
    or (B,).
    """
    if not guided:
        return denoise_fn(params, x, t, labels).astype(jnp.float32)
    batch = x.shape[0]
    both = denoise_fn(
        params,
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([labels, jnp.full_like(labels, null_label)]),
    ).astype(jnp.float32)
    cond, uncond = both[:batch], both[batch:]
    w = jnp.reshape(jnp.asarray(w, jnp.float32), (-1,) + (1,) * (x.ndim - 1))
    return (1.0 + w) * cond - w * uncond
