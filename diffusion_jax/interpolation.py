"""Interpolations with a trained model: one class morphing into the next under fixed noise, and
spherical interpolation between two starting noises for a fixed class.

**Class morph.** Between classes a and b at mixing weight m, the denoiser's output is
(1 - m) out(x, t, a) + m out(x, t, b): for eps (a scaled score) that is the score of the
normalised geometric mixture p(x | a)^(1-m) p(x | b)^m, the same construction classifier-free
guidance applies between the conditional and unconditional models. It needs no access to the
network's class embedding (so it works for any denoiser and any prediction type, as every
conversion to eps is affine in the output), it is exactly the plain class-a (class-b) model at
m = 0 (m = 1), and it moves continuously with m. Under one starting noise and a deterministic
sampler (``ddim`` with eta = 0, ``dpmpp2m``) the frames therefore change smoothly.

**Noise interpolation.** Gaussian noise in high dimension concentrates on a sphere, and a
straight line between two draws passes well inside it (its midpoint has norm ~0.71 of theirs,
a "noise" the model never saw); :func:`slerp` follows the sphere instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers


def slerp(z0: jnp.ndarray, z1: jnp.ndarray, alphas) -> jnp.ndarray:
    """Spherical interpolation: z0, z1 (...) and alphas (F,) in [0, 1] -> (F, ...).

    Falls back to the straight line when the two are (nearly) parallel.
    """
    z0, z1 = jnp.asarray(z0, jnp.float32), jnp.asarray(z1, jnp.float32)
    a = jnp.asarray(alphas, jnp.float32).reshape((-1,) + (1,) * z0.ndim)
    cos = jnp.sum(z0 * z1) / (jnp.linalg.norm(z0) * jnp.linalg.norm(z1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    safe = jnp.where(sin > 1e-6, sin, 1.0)
    spherical = (jnp.sin((1.0 - a) * theta) * z0 + jnp.sin(a * theta) * z1) / safe
    return jnp.where(sin > 1e-6, spherical, (1.0 - a) * z0 + a * z1)


@functools.cache
def class_mixing(denoise_fn):
    """A denoiser with the signature the samplers expect whose ``params`` are
    ``{"net": params, "other": (B,) int, "mix": (B,) float}``: each row's output is
    (1 - mix) out(x, t, label) + mix out(x, t, other). Rows asking for the null label (the
    unconditional half of a guided batch, which is twice as long) pass through unmixed. Other
    keywords (a student's ``w``, (B,)) go to both calls. Cached, so the samplers see the same
    object and do not recompile."""

    def mixed(params, x, t, labels, **kw):
        other, mix = params["other"], params["mix"]
        reps = x.shape[0] // other.shape[0]  # 2 inside a guided step
        other, mix = jnp.tile(other, reps), jnp.tile(mix, reps)
        null = labels == params["null_label"]
        both = denoise_fn(
            params["net"],
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([labels, jnp.where(null, labels, other)]),
            **{k: jnp.concatenate([v, v]) for k, v in kw.items()},
        ).astype(jnp.float32)
        first, second = both[: x.shape[0]], both[x.shape[0] :]
        m = jnp.where(null, 0.0, mix).reshape((-1,) + (1,) * (x.ndim - 1))
        return (1.0 - m) * first + m * second

    return mixed


def morph_path(classes, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(from_labels, to_labels, mix)``, each (N,): ``frames`` frames from each class of
    ``classes`` towards the next (mix 0, 1/frames, ...), then the last class itself (mix 0)."""
    classes = [int(c) for c in classes]
    if len(classes) < 2:
        raise ValueError(f"a morph needs at least two classes, got {classes}")
    if frames < 1:
        raise ValueError(f"frames per transition must be >= 1, got {frames}")
    a, b, m = [], [], []
    for c0, c1 in zip(classes[:-1], classes[1:], strict=True):
        a += [c0] * frames
        b += [c1] * frames
        m += list(np.arange(frames) / frames)
    a, b, m = a + [classes[-1]], b + [classes[-1]], m + [0.0]
    return np.array(a, np.int32), np.array(b, np.int32), np.array(m, np.float32)


def class_morph(
    denoise_fn,
    params,
    schedule,
    key: jax.Array,
    data_shape: tuple[int, ...],
    classes,
    *,
    num_classes: int,
    frames: int = 8,
    w: float = 0.0,
    **sample_kw,
) -> samplers.SampleResult:
    """Frames of ``classes[0]`` morphing into ``classes[1]``, then into ``classes[2]``...:
    ``frames`` per transition plus the last class, (N, *data_shape), all from the one starting
    noise that ``key`` gives. ``sample_kw`` go to :func:`~diffusion_jax.samplers.sample` (choose
    a deterministic ``solver``: any but ``ddpm``, ``ddim`` with ``eta = 0``)."""
    samplers.check_labels(np.asarray(classes, np.int64), num_classes - 1)
    start, end, mix = morph_path(classes, frames)
    key_noise, key_chain = jax.random.split(key)
    noise = jax.random.normal(key_noise, (1, *data_shape), jnp.float32)
    mixed_params = {"net": params, "other": end, "mix": mix, "null_label": num_classes}
    return samplers.sample(
        class_mixing(denoise_fn),
        mixed_params,
        schedule,
        key_chain,
        (len(start), *data_shape),
        num_classes=num_classes,
        labels=start,
        w=w,
        x_init=jnp.broadcast_to(noise, (len(start), *data_shape)),
        **sample_kw,
    )


def noise_interpolation(
    denoise_fn,
    params,
    schedule,
    key: jax.Array,
    data_shape: tuple[int, ...],
    label: int,
    *,
    num_classes: int,
    frames: int = 8,
    w: float = 0.0,
    **sample_kw,
) -> samplers.SampleResult:
    """``frames`` samples of class ``label`` whose starting noises move along the sphere from
    one draw to another (:func:`slerp`), (frames, *data_shape)."""
    samplers.check_labels(np.array([label]), num_classes - 1)
    if frames < 2:
        raise ValueError(f"an interpolation needs at least 2 frames, got {frames}")
    k0, k1, key_chain = jax.random.split(key, 3)
    z0, z1 = (jax.random.normal(k, data_shape, jnp.float32) for k in (k0, k1))
    return samplers.sample(
        denoise_fn,
        params,
        schedule,
        key_chain,
        (frames, *data_shape),
        num_classes=num_classes,
        labels=np.full(frames, label, np.int32),
        w=w,
        x_init=slerp(z0, z1, np.linspace(0.0, 1.0, frames)),
        **sample_kw,
    )
