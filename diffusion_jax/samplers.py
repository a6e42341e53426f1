"""Samplers: the whole reverse chain in one ``jax.jit`` with ``lax.scan``.

The entry point is :func:`sample` (``prepare_chain(...).run()``). It walks a
:class:`~diffusion_jax.schedules.Schedule` from its last row (pure noise) to row 0 (the data) with
one of the solvers (update rules) registered in :mod:`diffusion_jax.solvers`, chosen in a
:class:`SamplerSettings`. Each step calls the denoiser once, turns its output into (x0_hat,
eps_hat) (:func:`diffusion_jax.diffusion.to_x0_eps`, with fixed clipping or dynamic thresholding
of x0_hat) and hands them to the solver, whose carry rides along in the scan.

Classifier-free guidance uses eps_hat = (1 + w) eps(x, t, c) - w eps(x, t, null): ``w = 0`` is the
plain conditional model, larger ``w`` follows the class more closely. The conditional and
unconditional outputs come from **one** call of the denoiser on the doubled batch; at ``w = 0``
the unconditional half is never built. ``guidance_scale`` (K,) multiplies ``w`` row by row
(a guidance interval or schedule, :mod:`diffusion_jax.guidance`).

What compiles: one XLA program per distinct (denoiser object, sample shape, number of schedule
rows, :class:`SamplerSettings`, guided-or-not, null_label, mesh). The guidance weights, eta,
the labels, the key, the parameters' values and the schedule's values are traced, so sweeping them
reuses the compiled program. Pass the *same* denoiser object each time: a new lambda or
``functools.partial`` per call is a new static argument and recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, sharding, solvers
from diffusion_jax.guidance import guided_output
from diffusion_jax.schedules import Schedule

SOLVERS = tuple(solvers.SOLVERS)  # the registered solvers' names
VARIANCES = solvers.VARIANCES


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Everything about a chain that is fixed when it compiles (hashable, so a static argument).

    solver: a registered solver (``solvers.SOLVERS``), by name or as the object; kept as the
      object, so ``settings.solver.init(x)`` and ``settings.solver.name`` work.
    variance: "small" (beta~) or "large" (beta), for ``ddpm``.
    prediction: what the network predicts, one of ``diffusion.PREDICTIONS``.
    clip: clip predicted x_0 to this range (the data range is [-1, 1]); None disables.
    threshold: if set, dynamic thresholding of predicted x_0 at this quantile of |x_0| per sample
      (Saharia et al. use 0.995) instead of ``clip``.
    num_snapshots: how many evenly spaced states of the chain to return (0 = none).
    unroll: ``lax.scan`` unroll factor (a speed knob; results are identical).
    """

    solver: str | solvers.Solver = "ddpm"
    variance: str = "small"
    prediction: str = "eps"
    clip: tuple[float, float] | None = (-1.0, 1.0)
    threshold: float | None = None
    num_snapshots: int = 0
    unroll: int = 1

    def __post_init__(self):
        if not isinstance(self.solver, solvers.Solver):
            object.__setattr__(self, "solver", solvers.get(self.solver))
        if self.variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {self.variance!r}")
        diffusion.check_prediction(self.prediction)
        if self.clip is not None:
            lo, hi = (float(c) for c in self.clip)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"clip must be (lo, hi) with finite lo < hi, got {self.clip!r}")
            object.__setattr__(self, "clip", (lo, hi))
        if self.threshold is not None:
            if not 0.0 < float(self.threshold) <= 1.0:
                raise ValueError(
                    "threshold is a quantile of |x0| in (0, 1] (e.g. 0.995), "
                    f"got {self.threshold!r}"
                )
            object.__setattr__(self, "threshold", float(self.threshold))
        for name, low in (("num_snapshots", 0), ("unroll", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))


class Timing(NamedTuple):
    """Seconds spent compiling the chain ahead of time and running it (timed to completion)."""

    compile_s: float
    sample_s: float


class SampleResult(NamedTuple):
    """``samples``: (B, ...) float32 x_0 draws (not clipped beyond what ``clip`` asks).
    ``snapshots``: (S, B, ...) the chain's state at S evenly spaced points, from the initial noise
    (index 0) to the final samples (index S-1); None when no snapshots were asked for.
    ``timing``: a :class:`Timing` when the chain was timed, else None."""

    samples: jnp.ndarray
    snapshots: jnp.ndarray | None
    timing: Timing | None = None


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
    carry,
    key_steps,
    labels,
    w,
    eta,
    *,
    denoise_fn,
    settings: SamplerSettings,
    guided: bool,
    null_label: int,
):
    """One step of the reverse chain from row ``k`` (a scalar) to row k-1: ``(x, carry)`` ->
    ``(x, carry)`` with x (B, ...) and the solver's carry.

    ``w`` holds the guidance weights of every row, (K, B) (or (K, 1)); row k's are used. The
    step's key is ``fold_in(key_steps, k)``, so a chain built from this function (the
    ``lax.scan`` of :func:`sample`, or :func:`sample_python_loop`) gives the same samples for the
    same key.
    """
    t = jnp.full((x.shape[0],), schedule.timesteps[k], jnp.int32)
    if settings.solver.student:  # w is the network's input: one call, no doubled batch
        w_k = jnp.broadcast_to(w[k], t.shape)
        out = denoise_fn(params, x, t, labels, w=w_k).astype(jnp.float32)
    else:
        out = guided_output(denoise_fn, params, x, t, labels, w[k], null_label, guided)
    kk = jnp.full((x.shape[0],), k)
    x0, eps = diffusion.to_x0_eps(
        schedule, settings.prediction, out, x, kk, settings.clip, settings.threshold
    )
    step_in = solvers.StepInput(
        schedule, k, x, x0, eps, jax.random.fold_in(key_steps, k), eta, settings.variance
    )
    return settings.solver.step(step_in, carry)


STEP_STATIC = ("denoise_fn", "settings", "guided", "null_label")


def initial_noise(key, shape, x_init=None):
    """``(x_T, key_steps)``: the chain's starting noise (``x_init`` if given, else drawn from
    ``key``) and the key its steps fold into."""
    key_init, key_steps = jax.random.split(key)
    if x_init is not None:
        return jnp.asarray(x_init, jnp.float32), key_steps
    return jax.random.normal(key_init, shape, jnp.float32), key_steps


@functools.partial(jax.jit, static_argnames=(*STEP_STATIC, "shape", "mesh"))
def _sample_chain(
    params, schedule: Schedule, key, labels, w, eta, x_init, *, shape, mesh, **step_static
):
    settings = step_static["settings"]
    num_steps, num_snapshots = schedule.num_steps, settings.num_snapshots
    x, key_steps = initial_noise(key, shape, x_init)
    if mesh is not None:  # the batch split over the mesh's devices; everything follows x
        x = jax.lax.with_sharding_constraint(x, sharding.batch_sharded(mesh))
        labels = jax.lax.with_sharding_constraint(labels, sharding.batch_sharded(mesh))
    slots = jnp.asarray(snapshot_slots(num_steps, num_snapshots))
    # One spare slot absorbs the writes of steps that are not snapshots: no branch in the loop.
    frames = jnp.zeros((num_snapshots + 1,) + shape, jnp.float32).at[slots[0]].set(x)

    def step(state, k):
        x, carry, frames = state
        x, carry = reverse_step(
            params, schedule, k, x, carry, key_steps, labels, w, eta, **step_static
        )
        frames = frames.at[slots[num_steps - k]].set(x)
        return (x, carry, frames), None

    init = (x, settings.solver.init(x), frames)
    (x, _, frames), _ = jax.lax.scan(
        step, init, jnp.arange(num_steps - 1, -1, -1), unroll=settings.unroll
    )
    return x, frames[:num_snapshots]


class ChainCall(NamedTuple):
    """A checked chain, ready to compile or run: ``_sample_chain(*args, **static)``.

    ``args`` = (params, schedule, key, labels, w, eta, x_init), padded and replicated for a mesh
    (``w`` the guidance weights per row and sample, (K, B) or (K, 1); ``x_init`` None unless the
    chain starts from given noise); the chain has ``static["shape"][0]`` rows, of which the first
    ``batch`` are the samples."""

    args: tuple
    static: dict
    batch: int

    def lower(self):
        """The chain lowered for XLA (for FLOPs, HLO text, ahead-of-time compiling)."""
        return _sample_chain.lower(*self.args, **self.static)

    def compile(self):
        """``(compiled, seconds)``: the chain compiled ahead of time (not kept in the jit
        cache); call ``compiled(*self.args)``."""
        start = time.perf_counter()
        compiled = self.lower().compile()
        return compiled, time.perf_counter() - start

    def result(self, outputs) -> SampleResult:
        """The chain's raw outputs as a :class:`SampleResult`, padding rows removed."""
        samples, frames = outputs
        if samples.shape[0] != self.batch:
            samples, frames = samples[: self.batch], frames[:, : self.batch]
        return SampleResult(samples, frames if self.static["settings"].num_snapshots else None)

    def run(self, compiled=None) -> SampleResult:
        """Run the chain (through the jit cache, or the given ahead-of-time program)."""
        outputs = (
            _sample_chain(*self.args, **self.static) if compiled is None else compiled(*self.args)
        )
        return self.result(outputs)

    def timed(self) -> SampleResult:
        """Compile ahead of time and run once: the result with its :class:`Timing`. The
        compiled program is not kept in the jit cache."""
        compiled, compile_s = self.compile()
        start = time.perf_counter()
        outputs = jax.block_until_ready(compiled(*self.args))
        sample_s = time.perf_counter() - start
        return self.result(outputs)._replace(timing=Timing(compile_s, sample_s))


@functools.cache
def _jitted_step(static_items):
    return jax.jit(functools.partial(reverse_step, **dict(static_items)))


def jitted_step(call: ChainCall):
    """:func:`reverse_step` of ``call``'s chain, jitted alone (one step per dispatch):
    ``step(params, schedule, k, x, carry, key_steps, labels, w, eta) -> (x, carry)``."""
    return _jitted_step(tuple(sorted((k, call.static[k]) for k in STEP_STATIC)))


def sample_python_loop(call: ChainCall) -> jnp.ndarray:
    """The chain of ``call`` driven from Python, one jitted :func:`reverse_step` per dispatch: a
    baseline for benchmarks (what compiling the whole chain with ``lax.scan`` buys). Same
    samples as :func:`sample` for the same key (up to float rounding). Returns x_0, (batch, ...);
    ``call`` must be prepared without a mesh."""
    params, schedule, key, labels, w, eta, x_init = call.args
    step = jitted_step(call)
    x, key_steps = initial_noise(key, call.static["shape"], x_init)
    carry = call.static["settings"].solver.init(x)
    for k in range(schedule.num_steps - 1, -1, -1):
        x, carry = step(params, schedule, jnp.int32(k), x, carry, key_steps, labels, w, eta)
    return x[: call.batch]


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


def _settings(settings: SamplerSettings | None, overrides: dict) -> SamplerSettings:
    settings = SamplerSettings() if settings is None else settings
    fields = {f.name for f in dataclasses.fields(SamplerSettings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown sampler setting(s) {unknown}; the settings are {sorted(fields)}")
    return dataclasses.replace(settings, **overrides) if overrides else settings


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
    eta: float = 0.0,
    guidance_scale=None,
    x_init=None,
    settings: SamplerSettings | None = None,
    mesh=None,
    **overrides,
) -> ChainCall:
    """The reverse chain of ``schedule`` drawing ``shape[0]`` samples, checked and ready to run
    (:meth:`ChainCall.run`, what :func:`sample` does), time, compile or inspect.

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
      eta: DDIM noise scale in [0, 1] (0 = deterministic); traced, so sweeping it does not
        recompile.
      guidance_scale: (K,) factors >= 0 of ``w`` per row of ``schedule`` (a guidance interval
        or schedule, :func:`diffusion_jax.guidance.guidance_scale`); None = 1 everywhere.
      x_init: (B, ...) noise to start the chain from instead of drawing it from ``key`` (e.g.
        the same noise for every sample, or interpolated noises); the steps' noise still comes
        from ``key``.
      settings: a :class:`SamplerSettings` (default: ancestral, small variance, eps, clip to
        [-1, 1]); any of its fields may also be given as a keyword (``solver="ddim"``,
        ``clip=None``, ...), which overrides ``settings``.
      mesh: a ``jax.sharding.Mesh`` (e.g. ``sharding.data_mesh()``) to split the batch over its
        devices, parameters replicated; the batch is padded to a multiple of the device count.
        The same key gives the same samples with or without a mesh. The results are then global
        arrays (use ``sharding.to_host`` when the mesh spans several processes).
    """
    settings = _settings(settings, overrides)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"shape must be (batch, ...) with batch >= 1, got {shape}")
    if not _is_concrete(eta) or not 0 <= float(eta) <= 1:  # > 1: noise beyond the posterior's
        raise ValueError(f"eta must be in [0, 1] (1 = ancestral's noise), got {eta!r}")
    if settings.num_snapshots > schedule.num_steps + 1:
        raise ValueError(
            f"num_snapshots must be in [0, {schedule.num_steps + 1}] (steps + 1), "
            f"got {settings.num_snapshots!r}"
        )
    w_rows = _row_weights(w, guidance_scale, schedule.num_steps, shape[0])
    weighted = bool(np.any(w_rows != 0))
    # a student takes w as an input: no unconditional branch to compile
    guided = weighted and not settings.solver.student
    if labels is None:
        if weighted:
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
        if w_rows.shape[1] > 1:
            w_rows = np.concatenate([w_rows, np.zeros((w_rows.shape[0], pad))], axis=1)
    if x_init is not None:
        x_init = np.asarray(x_init, np.float32)
        if x_init.shape != (batch, *shape[1:]):
            raise ValueError(
                f"x_init must have the sample shape {(batch, *shape[1:])}, got {x_init.shape}"
            )
        if mesh is not None:
            x_init = np.concatenate([x_init, np.zeros((shape[0] - batch, *shape[1:]), np.float32)])
    w_rows, eta = jnp.asarray(w_rows, jnp.float32), jnp.float32(eta)
    args = (params, schedule, key, labels, w_rows, eta, x_init)
    if mesh is not None:
        args = sharding.replicate(args, mesh)
    static = dict(
        denoise_fn=denoise_fn,
        shape=shape,
        settings=settings,
        guided=guided,
        null_label=int(num_classes),
        mesh=mesh,
    )
    return ChainCall(args, static, batch)


def _row_weights(w, guidance_scale, num_steps: int, batch: int) -> np.ndarray:
    """The guidance weight of every row and sample, (K, B) (or (K, 1) for one shared ``w``)."""
    w_arr = np.asarray(w, dtype=np.float64)
    if w_arr.ndim > 1 or (w_arr.ndim == 1 and w_arr.shape[0] != batch):
        raise ValueError(f"w must be a number or a ({batch},) array, got shape {w_arr.shape}")
    if not np.all(np.isfinite(w_arr)) or np.any(w_arr < 0):
        raise ValueError(f"w must be finite and >= 0, got {w!r}")
    scale = np.ones(num_steps) if guidance_scale is None else np.asarray(guidance_scale, float)
    if scale.shape != (num_steps,) or not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise ValueError(
            f"guidance_scale must be ({num_steps},) finite factors >= 0 (one per row of the "
            f"schedule), got shape {scale.shape}"
        )
    return scale[:, None] * np.reshape(w_arr, (1, -1))


def sample(*args, timed: bool = False, **kwargs) -> SampleResult:
    """Draw samples: ``prepare_chain(*args, **kwargs).run()`` (arguments as
    :func:`prepare_chain`). ``timed``: compile ahead of time and run once, the result carrying
    its :class:`Timing` (that compiled program is not kept in the jit cache).

    Returns:
      A :class:`SampleResult` of float32 arrays.
    """
    call = prepare_chain(*args, **kwargs)
    return call.timed() if timed else call.run()
