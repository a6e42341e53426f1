"""Inpainting with a trained model: fill the unknown part of images consistently with the known
part (Lugmayr et al. 2022, RePaint), in one jitted ``lax.scan``.

At each step from row k to row k-1 the unknown part takes an ancestral reverse step (guided if
asked), the known part is the original forward-noised to row k-1, and the two are merged by the
mask. Merging alone ignores that the known part constrains the unknown one; RePaint's resampling
lets information flow back: the merged x_{k-1} is diffused forward to row k again
(x_k = sqrt(alpha_k) x_{k-1} + sqrt(beta_k) z) and the step repeated, ``resample`` times in all
(jump length 1). At row 0 the known part is the original itself, so it is returned exactly.

Masks are 1 (or True) where the pixel is known.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, samplers
from diffusion_jax.schedules import Schedule

MASKS = ("top", "bottom", "left", "right", "centre", "random")


def make_mask(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A named mask for one example of ``shape`` (H, W, C): 1 = known, float32, same shape.

    ``top`` keeps the top half (the bottom is filled), ``bottom``, ``left`` and ``right``
    likewise; ``centre`` hides the central half-size square; ``random`` hides half the pixels
    (one draw from ``seed``, shared by the channels).
    """
    if name not in MASKS:
        raise ValueError(f"mask must be one of {MASKS} or a file, got {name!r}")
    if len(shape) != 3:
        raise ValueError(f"named masks are for images (H, W, C), got shape {shape}")
    h, w, c = shape
    mask = np.ones((h, w), np.float32)
    if name == "top":
        mask[h // 2 :] = 0
    elif name == "bottom":
        mask[: h // 2] = 0
    elif name == "left":
        mask[:, w // 2 :] = 0
    elif name == "right":
        mask[:, : w // 2] = 0
    elif name == "centre":
        mask[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = 0
    else:
        mask = (np.random.default_rng(seed).random((h, w)) < 0.5).astype(np.float32)
    return np.repeat(mask[:, :, None], c, axis=2)


def check_mask(mask, example_shape: tuple[int, ...]) -> np.ndarray:
    """A mask for examples of ``example_shape``: the same shape (or (H, W) for (H, W, 1)) with
    values 0 and 1 only; ValueError saying what is wrong otherwise."""
    mask = np.asarray(mask)
    if mask.shape != tuple(example_shape) and mask.shape + (1,) != tuple(example_shape):
        raise ValueError(
            f"the mask has shape {mask.shape}; the images are {tuple(example_shape)} (or give "
            f"{tuple(example_shape[:-1])} for one channel)"
        )
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError("the mask must hold only 0 (to fill) and 1 (known)")
    return mask.reshape(example_shape).astype(np.float32)


def _forward_one_step(schedule: Schedule, k, x_prev, noise):
    """x_k ~ q(x_k | x_{k-1}) on ``schedule``'s chain (from the data when k = 0)."""
    return jnp.sqrt(schedule.alphas[k]) * x_prev + jnp.sqrt(schedule.betas[k]) * noise


@functools.partial(
    jax.jit, static_argnames=("denoise_fn", "settings", "guided", "null_label", "resample")
)
def _inpaint_chain(
    params,
    schedule,
    key,
    images,
    mask,
    labels,
    w,
    *,
    denoise_fn,
    settings,
    guided,
    null_label,
    resample,
):
    num_steps = schedule.num_steps
    known = mask > 0.5
    x, key_steps = samplers.initial_noise(key, images.shape)
    # one scan over (row, repeat) pairs: each iteration is one reverse step (one network call)
    rows = jnp.repeat(jnp.arange(num_steps - 1, -1, -1), resample)
    repeats = jnp.tile(jnp.arange(resample), num_steps)
    step_kw = dict(denoise_fn=denoise_fn, settings=settings, guided=guided, null_label=null_label)

    def step(x, inputs):
        i, k, r = inputs
        key_i = jax.random.fold_in(key_steps, i)
        # (reverse_step folds the row into its key; the repeat index makes each repeat differ)
        x_prev, _ = samplers.reverse_step(
            params, schedule, k, x, (), key_i, labels, w, 0.0, **step_kw
        )
        k_prev = jnp.maximum(k - 1, 0)
        noised = diffusion.q_sample(
            schedule, images, jnp.full((images.shape[0],), k_prev), _normal(key_i, 1, x)
        )
        known_prev = jnp.where(k > 0, noised, images)  # row -1 is the data itself
        x_prev = jnp.where(known, known_prev, x_prev)
        again = _forward_one_step(schedule, k, x_prev, _normal(key_i, 2, x))
        return jnp.where(r < resample - 1, again, x_prev), None

    x, _ = jax.lax.scan(step, x, (jnp.arange(rows.shape[0]), rows, repeats))
    return x


def _normal(key, tag: int, like):
    return jax.random.normal(jax.random.fold_in(key, tag), like.shape, jnp.float32)


def inpaint(
    denoise_fn,
    params,
    schedule: Schedule,
    key: jax.Array,
    images,
    mask,
    *,
    num_classes: int,
    labels=None,
    w: float = 0.0,
    resample: int = 1,
    **settings,
) -> jnp.ndarray:
    """Fill the unknown part of ``images`` (B, ...) in [-1, 1] where ``mask`` (the shape of one
    image, or of the batch) is 0; returns (B, ...), equal to ``images`` exactly where the mask
    is 1.

    ``labels`` (B,) and ``w`` as in :func:`~diffusion_jax.samplers.prepare_chain` (None:
    unconditional); ``resample``: RePaint's repeats per step (1 = plain replacement, no
    resampling), each costing one more network call per step. ``settings``: further keywords of
    ``prepare_chain`` (``settings``, ``guidance_scale``, or
    :class:`~diffusion_jax.samplers.SamplerSettings` fields such as ``prediction``, ``clip``,
    ``variance``); the solver is ancestral, which the resampling needs (it re-noises).
    """
    images = np.asarray(images, np.float32)
    if images.ndim < 2:
        raise ValueError(f"images must be (batch, ...), got shape {images.shape}")
    mask = np.asarray(mask, np.float32)
    if mask.shape != images.shape:
        mask = np.broadcast_to(check_mask(mask, images.shape[1:]), images.shape)
    elif not np.all((mask == 0) | (mask == 1)):
        raise ValueError("the mask must hold only 0 (to fill) and 1 (known)")
    if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)) or resample < 1:
        raise ValueError(f"resample must be an integer >= 1, got {resample!r}")
    call = samplers.prepare_chain(
        denoise_fn,
        params,
        schedule,
        key,
        images.shape,
        num_classes=num_classes,
        labels=labels,
        w=w,
        solver="ddpm",
        **settings,
    )
    params, schedule, key, labels, w, _, _ = call.args
    static = call.static
    return _inpaint_chain(
        params,
        schedule,
        key,
        jnp.asarray(images),
        jnp.asarray(mask),
        labels,
        w,
        denoise_fn=denoise_fn,
        settings=static["settings"],
        guided=static["guided"],
        null_label=static["null_label"],
        resample=int(resample),
    )
