"""Samplers: the whole reverse chain in one ``jax.jit`` with ``lax.scan``.

The entry point is :func:`sample`. It walks a :class:`~diffusion_jax.schedules.Schedule` from its
last row (pure noise) to row 0 (the data):

* ``method="ddpm"``: ancestral sampling, x_{k-1} = mu~(x_k, x0_hat) + sigma_k z, with
  sigma_k^2 = beta~_k (``variance="small"``) or beta_k (``variance="large"``); no noise is added at
  the last step. On a respaced schedule this is strided ancestral sampling.
* ``method="ddim"``: x_{k-1} = sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1} - s^2) eps_hat + s z
  with s = eta * sqrt(beta~_k); ``eta=0`` is deterministic, ``eta=1`` matches ancestral "small".

Classifier-free guidance uses eps_hat = (1 + w) eps(x, t, c) - w eps(x, t, null): ``w = 0`` is the
plain conditional model, larger ``w`` follows the class more closely. The conditional and
unconditional outputs come from **one** call of the denoiser on the doubled batch; at ``w = 0``
the unconditional half is never built.

What compiles: one XLA program per distinct (denoiser object, sample shape, number of schedule
rows, method, variance, prediction, clip, num_snapshots, guided-or-not, null_label). The guidance
weight, eta, the labels, the key, the parameters' values and the schedule's values are traced, so
sweeping them reuses the compiled program. Pass the *same* denoiser object each time: a new
lambda or ``functools.partial`` per call is a new static argument and recompiles.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, sharding
from diffusion_jax.schedules import Schedule

METHODS = ("ddpm", "ddim")
VARIANCES = ("small", "large")


class SampleResult(NamedTuple):
    """``samples``: (B, ...) float32 x_0 draws (not clipped beyond what ``clip`` asks).
    ``snapshots``: (S, B, ...) the chain's state at S evenly spaced points, from the initial noise
    (index 0) to the final samples (index S-1); None when no snapshots were asked for."""

    samples: jnp.ndarray
    snapshots: jnp.ndarray | None


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


def ancestral_step(schedule: Schedule, k, x, x0, noise, variance: str):
    """One DDPM step from row k to row k-1 (all rows of the batch at the same k, a scalar)."""
    mean, small, _ = diffusion.q_posterior(schedule, x0, x, k)
    var = small if variance == "small" else schedule.betas[k]
    return mean + jnp.where(k > 0, jnp.sqrt(var), 0.0) * noise


def ddim_step(schedule: Schedule, k, x0, eps, noise, eta):
    """One DDIM step from row k to row k-1; at k = 0 it returns x0 exactly."""
    abar_prev = schedule.alpha_bar_prev[k]
    sigma = eta * jnp.sqrt(schedule.posterior_variance[k])
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0))
    return jnp.sqrt(abar_prev) * x0 + direction * eps + sigma * noise


def snapshot_slots(num_steps: int, num_snapshots: int) -> np.ndarray:
    """For each count of completed steps 0..K, the snapshot slot it fills, or S (a spare slot).

    Shape (K + 1,). Slots are evenly spaced and include the initial noise and the final sample.
    """
    slots = np.full(num_steps + 1, num_snapshots, dtype=np.int32)
    if num_snapshots == 1:  # the one frame is the final sample
        slots[num_steps] = 0
    elif num_snapshots:
        done = np.round(np.linspace(0, num_steps, num_snapshots)).astype(np.int64)
        slots[done] = np.arange(num_snapshots)
    return slots


def reverse_step(
    params,
    schedule: Schedule,
    k,
    x,
    key_steps,
    labels,
    w,
    eta,
    *,
    denoise_fn,
    method,
    variance,
    prediction,
    clip,
    guided,
    null_label,
):
    """One step of the reverse chain, from row ``k`` (a scalar) to row k-1: x (B, ...) -> (B, ...).

    The step's noise is drawn from ``fold_in(key_steps, k)``, so a chain built from this function
    (the ``lax.scan`` of :func:`sample`, or a Python loop over a jitted copy) gives the same
    samples for the same key.
    """
    t = jnp.full((x.shape[0],), schedule.timesteps[k], jnp.int32)
    out = guided_output(denoise_fn, params, x, t, labels, w, null_label, guided)
    kk = jnp.full((x.shape[0],), k)
    x0, eps = diffusion.to_x0_eps(schedule, prediction, out, x, kk, clip)
    noise = jax.random.normal(jax.random.fold_in(key_steps, k), x.shape, jnp.float32)
    if method == "ddpm":
        return ancestral_step(schedule, k, x, x0, noise, variance)
    return ddim_step(schedule, k, x0, eps, noise, eta)


STEP_STATIC = ("denoise_fn", "method", "variance", "prediction", "clip", "guided", "null_label")


def initial_noise(key, shape):
    """``(x_T, key_steps)``: the chain's starting noise and the key its steps fold into."""
    key_init, key_steps = jax.random.split(key)
    return jax.random.normal(key_init, shape, jnp.float32), key_steps


@functools.partial(
    jax.jit, static_argnames=(*STEP_STATIC, "shape", "num_snapshots", "unroll", "mesh")
)
def _sample_chain(
    params,
    schedule: Schedule,
    key,
    labels,
    w,
    eta,
    *,
    shape,
    num_snapshots,
    unroll,
    mesh,
    **step_static,
):
    num_steps = schedule.num_steps
    x, key_steps = initial_noise(key, shape)
    if mesh is not None:  # the batch split over the mesh's devices; everything follows x
        x = jax.lax.with_sharding_constraint(x, sharding.batch_sharded(mesh))
        labels = jax.lax.with_sharding_constraint(labels, sharding.batch_sharded(mesh))
    slots = jnp.asarray(snapshot_slots(num_steps, num_snapshots))
    # One spare slot absorbs the writes of steps that are not snapshots: no branch in the loop.
    frames = jnp.zeros((num_snapshots + 1,) + shape, jnp.float32).at[slots[0]].set(x)

    def step(carry, k):
        x, frames = carry
        x = reverse_step(params, schedule, k, x, key_steps, labels, w, eta, **step_static)
        frames = frames.at[slots[num_steps - k]].set(x)
        return (x, frames), None

    (x, frames), _ = jax.lax.scan(
        step, (x, frames), jnp.arange(num_steps - 1, -1, -1), unroll=unroll
    )
    return x, frames[:num_snapshots]


@functools.cache
def _jitted_step(static_items):
    return jax.jit(functools.partial(reverse_step, **dict(static_items)))


def sample_python_loop(denoise_fn, params, schedule: Schedule, key, labels, w, eta=0.0, **kw):
    """The chain of :func:`sample` driven from Python, one jitted :func:`reverse_step` per
    dispatch: a baseline for benchmarks (what compiling the whole chain with ``lax.scan`` buys).

    ``labels`` int (B,) and the (B, ...) shape's tail given as ``shape=``; the keyword arguments
    are :func:`reverse_step`'s static ones. Same key, same samples as :func:`sample` (up to
    float rounding). Returns x_0, (B, ...).
    """
    shape = tuple(kw.pop("shape"))
    step = _jitted_step(tuple(sorted(dict(kw, denoise_fn=denoise_fn).items())))
    x, key_steps = initial_noise(key, shape)
    labels, w = jnp.asarray(labels, jnp.int32), jnp.asarray(w, jnp.float32)
    for k in range(schedule.num_steps - 1, -1, -1):
        x = step(params, schedule, jnp.int32(k), x, key_steps, labels, w, jnp.float32(eta))
    return x


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_labels(labels, num_classes: int, batch_size: int | None = None) -> None:
    """Raise ValueError unless ``labels`` is an int (B,) array with values in [0, num_classes].

    ``num_classes`` itself is the null (unconditional) label.
    """
    if labels is None or not _is_concrete(labels):
        return
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
    if batch_size is not None and arr.shape[0] != batch_size:
        raise ValueError(f"labels has {arr.shape[0]} entries but the batch size is {batch_size}")
    if arr.size and (arr.min() < 0 or arr.max() > num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}] ({num_classes} = unconditional), got values "
            f"in [{arr.min()}, {arr.max()}]"
        )


def prepare_chain(
    denoise_fn: Callable,
    params,
    schedule: Schedule,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    num_classes: int,
    labels=None,
    w: float = 0.0,
    method: str = "ddpm",
    variance: str = "small",
    eta: float = 0.0,
    prediction: str = "eps",
    clip: tuple[float, float] | None = (-1.0, 1.0),
    num_snapshots: int = 0,
    unroll: int = 1,
    mesh=None,
):
    """``(args, static)`` such that ``_sample_chain(*args, **static)`` is the chain that
    :func:`sample` runs with these arguments (checked, and padded for a ``mesh``). For tools that
    compile and time the chain themselves (``_sample_chain.lower(*args, **static)``); the result
    has ``static["shape"][0]`` rows, of which the first ``shape[0]`` are the samples."""
    _check_choice("method", method, METHODS)
    _check_choice("variance", variance, VARIANCES)
    diffusion.check_prediction(prediction)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"shape must be (batch, ...) with batch >= 1, got {shape}")
    if not _is_concrete(eta) or float(eta) < 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    if not isinstance(num_snapshots, (int, np.integer)) or not (
        0 <= num_snapshots <= schedule.num_steps + 1
    ):
        raise ValueError(
            f"num_snapshots must be in [0, {schedule.num_steps + 1}] (steps + 1), "
            f"got {num_snapshots!r}"
        )
    w_arr = np.asarray(w, dtype=np.float64)
    if w_arr.ndim > 1 or (w_arr.ndim == 1 and w_arr.shape[0] != shape[0]):
        raise ValueError(f"w must be a number or a ({shape[0]},) array, got shape {w_arr.shape}")
    if not np.all(np.isfinite(w_arr)) or np.any(w_arr < 0):
        raise ValueError(f"w must be finite and >= 0, got {w!r}")
    guided = bool(np.any(w_arr != 0))
    if labels is None:
        if guided:
            raise ValueError("guidance (w > 0) needs labels; pass labels or set w=0")
        labels = jnp.full((shape[0],), num_classes, jnp.int32)
    check_labels(labels, num_classes, shape[0])
    batch, labels = shape[0], jnp.asarray(labels, jnp.int32)
    if mesh is not None:
        # Padding leaves the real samples unchanged: with partitionable threefry (jax's default)
        # the noise of sample i does not depend on the batch size.
        pad = -batch % mesh.devices.size
        shape = (batch + pad, *shape[1:])
        labels = np.concatenate([np.asarray(labels), np.full(pad, num_classes, np.int32)])
        if w_arr.ndim:
            w_arr = np.concatenate([w_arr, np.zeros(pad)])
    args = (params, schedule, key, labels, jnp.asarray(w_arr, jnp.float32), jnp.float32(eta))
    if mesh is not None:
        args = sharding.replicate(args, mesh)
    static = dict(
        denoise_fn=denoise_fn,
        shape=shape,
        method=method,
        variance=variance,
        prediction=prediction,
        clip=None if clip is None else (float(clip[0]), float(clip[1])),
        num_snapshots=int(num_snapshots),
        guided=guided,
        null_label=int(num_classes),
        unroll=int(unroll),
        mesh=mesh,
    )
    return args, static


def sample(
    denoise_fn: Callable,
    params,
    schedule: Schedule,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    num_classes: int,
    labels=None,
    w: float = 0.0,
    method: str = "ddpm",
    variance: str = "small",
    eta: float = 0.0,
    prediction: str = "eps",
    clip: tuple[float, float] | None = (-1.0, 1.0),
    num_snapshots: int = 0,
    unroll: int = 1,
    mesh=None,
    timing: dict | None = None,
) -> SampleResult:
    """Draw ``shape[0]`` samples by running the reverse chain of ``schedule`` on the device.

    Args:
      denoise_fn: ``fn(params, x_t, t, labels) -> output`` with x_t (B, ...), t int32 (B,)
        training timesteps (``schedule.timesteps``, 0 = least noisy), labels int32 (B,).
      params: whatever ``denoise_fn`` takes (a pytree).
      schedule: the chain to walk: the training schedule, or ``respace(...)`` of it for
        fewer-step sampling.
      key: a PRNG key; the same key gives the same samples.
      shape: (B, ...) of the samples, e.g. (B, 28, 28, 1).
      num_classes: the number of classes; ``num_classes`` is also the null label.
      labels: int (B,) labels in [0, num_classes], per sample; None samples unconditionally.
      w: guidance weight >= 0, a Python number or a (B,) array of numbers (must be concrete: it
        decides whether the unconditional branch is compiled in). 0 = no guidance.
      method: "ddpm" (ancestral) or "ddim".
      variance: "small" (beta~) or "large" (beta) for "ddpm".
      eta: DDIM noise scale >= 0 (0 = deterministic).
      prediction: what the network predicts, one of ``diffusion.PREDICTIONS``.
      clip: clip predicted x_0 to this range (the data range is [-1, 1]); None disables.
      num_snapshots: how many evenly spaced states of the chain to return (0 = none).
      unroll: ``lax.scan`` unroll factor (a speed knob; results are identical).
      mesh: a ``jax.sharding.Mesh`` (e.g. ``sharding.data_mesh()``) to split the batch over its
        devices, parameters replicated; the batch is padded to a multiple of the device count.
        The same key gives the same samples with or without a mesh. The results are then global
        arrays (use ``sharding.to_host`` when the mesh spans several processes).
      timing: if a dict, the chain is compiled ahead of time and run once, and the dict receives
        ``compile_s`` and ``sample_s`` (seconds, the run timed to completion). That compiled
        program is not kept in the jit cache.

    Returns:
      A :class:`SampleResult` of float32 arrays.
    """
    args, static = prepare_chain(
        denoise_fn,
        params,
        schedule,
        key,
        shape,
        num_classes=num_classes,
        labels=labels,
        w=w,
        method=method,
        variance=variance,
        eta=eta,
        prediction=prediction,
        clip=clip,
        num_snapshots=num_snapshots,
        unroll=unroll,
        mesh=mesh,
    )
    batch = int(shape[0])
    if timing is None:
        samples, frames = _sample_chain(*args, **static)
    else:
        start = time.perf_counter()
        compiled = _sample_chain.lower(*args, **static).compile()
        timing["compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        samples, frames = jax.block_until_ready(compiled(*args))
        timing["sample_s"] = time.perf_counter() - start
    if samples.shape[0] != batch:
        samples, frames = samples[:batch], frames[:, :batch]
    return SampleResult(samples, frames if num_snapshots else None)
