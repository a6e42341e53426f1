"""The sampler programs the sampling sections of benchmark.py time: one preset's denoiser with
random parameters, its whole chains compiled ahead of time (once per configuration), the FLOPs of
one reverse step taken from them, and the search for the largest batch that fits in device
memory."""

from __future__ import annotations

import dataclasses
import gc

import numpy as np

from benchmarks.common import Report, flops_of, is_oom
from benchmarks.workloads import data_shape

MAX_SEARCH_START = 256


@dataclasses.dataclass
class Sampling:
    """One preset's denoiser with initialised parameters, and the sampler programs compiled for
    it: {(method, steps, guided, batch, unroll, one_device): (compiled, compile_s, call)}."""

    preset: str
    dtype: str
    config: object
    denoise_fn: object
    params: object
    shape: tuple[int, ...]
    mesh: object  # None on one device; else the batch is split over all devices, as generate does
    programs: dict = dataclasses.field(default_factory=dict)
    # FLOPs of one reverse step from the timed chain programs: {(method, guided, batch): flops}
    step_flops: dict = dataclasses.field(default_factory=dict)
    step_convolutions: dict = dataclasses.field(default_factory=dict)  # same keys as step_flops

    @property
    def name(self) -> str:
        return f"{self.preset} {self.dtype}"

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.devices.size


def make_sampling(preset: str, dtype: str) -> Sampling:
    import jax

    from diffusion_jax import config as config_lib
    from diffusion_jax import models, sharding

    config = config_lib.get_config(preset, dtype=dtype)
    model = models.build_model(config)
    shape = data_shape(config)
    params = models.init_params(model, jax.random.PRNGKey(0), (1, *shape))
    # models.denoiser is cached per module: the same object every time, as the sampler wants.
    mesh = sharding.data_mesh() if jax.device_count() > 1 else None
    return Sampling(preset, dtype, config, models.denoiser(model), params, shape, mesh)


def chain_inputs(
    s: Sampling, method, steps: int, guided: bool, batch: int, w, seed, mesh=None, unroll: int = 1
):
    """The ``samplers.ChainCall`` that ``samplers.sample`` runs for this configuration (with a
    ``mesh``: padded and replicated over it)."""
    import jax

    from diffusion_jax import samplers
    from diffusion_jax.schedules import respace

    cfg = s.config
    return samplers.prepare_chain(
        s.denoise_fn,
        s.params,
        respace(cfg.schedule, cfg.num_timesteps, steps),
        jax.random.PRNGKey(seed),
        (batch, *s.shape),
        num_classes=cfg.num_classes,
        labels=np.random.default_rng(seed).integers(0, cfg.num_classes, batch),
        w=w if guided else 0.0,
        eta=0.0,  # deterministic DDIM
        solver=method,
        prediction=cfg.prediction,
        unroll=unroll,
        mesh=mesh,
    )


def chain_program(
    s: Sampling, method, steps, guided, batch, unroll, args, report: Report, one_device=False
):
    """``(compiled, compile_s, call)``, compiled once per configuration; the batch is split over
    ``s.mesh`` unless ``one_device``."""
    mesh = None if one_device else s.mesh
    key = (method, steps, guided, batch, unroll, mesh is None)
    if key not in s.programs:
        call = chain_inputs(s, method, steps, guided, batch, args.guidance, args.seed, mesh, unroll)
        compiled, seconds = call.compile()
        s.programs[key] = (compiled, seconds, call)
        report.compiles.append(
            (
                f"sampler {s.name} {method}-{steps} {'guided' if guided else 'unguided'} "
                f"batch {batch} unroll {unroll}"
                + (f" on {s.num_devices} devices" if mesh is not None else ""),
                seconds,
            )
        )
    return s.programs[key]


def count_convolutions(hlo_text: str) -> int:
    """Convolution ops in a compiled program's HLO text: XLA's own, and on GPUs the cuDNN calls
    they become."""
    return hlo_text.count(" convolution(") + hlo_text.count('custom_call_target="__cudnn$conv')


def chain_step_flops(s: Sampling, compiled, method: str, guided: bool, batch: int):
    """FLOPs of one reverse step (all devices together) from the timed chain program itself:
    XLA's cost analysis counts the body of its ``lax.scan`` (one step at unroll 1) once, plus
    the initial noise outside the loop (0.2% of a step of the tiny preset at batch 4). Recorded
    with the program's convolution count for :func:`~benchmarks.sampling_bench.guidance_check`.
    """
    flops = flops_of(compiled)
    flops = None if flops is None else flops * s.num_devices  # the cost of one device's share
    key = (method, guided, batch)
    s.step_flops[key] = flops
    s.step_convolutions[key] = count_convolutions(compiled.as_text())
    return flops


def step_flops(s: Sampling, method: str, guided: bool, batch: int, args) -> float | None:
    """FLOPs of one reverse step from a separate compile of the loop-free jitted step of
    ``samplers.sample_python_loop`` (a reference for tests: the benchmark itself uses
    :func:`chain_step_flops`)."""
    import jax.numpy as jnp

    from diffusion_jax import samplers

    call = chain_inputs(s, method, 2, guided, batch, args.guidance, args.seed)
    params, schedule, rng_key, labels, w, eta, _ = call.args
    x = jnp.zeros(call.static["shape"], jnp.float32)
    carry = call.static["settings"].solver.init(x)
    compiled = (
        samplers.jitted_step(call)
        .lower(params, schedule, jnp.int32(1), x, carry, rng_key, labels, w, eta)
        .compile()
    )
    return flops_of(compiled)


def sampler_batches(s: Sampling, guided: bool, args, notes: list[str], may_search) -> list[int]:
    """The batch sizes of ``args.sample_batch_sizes``, "max" replaced by the largest that fits
    (searched only where ``may_search(what)`` allows: the run's time budget)."""
    import jax

    batches = [b for b in args.sample_batch_sizes if b != "max"]
    if "max" not in args.sample_batch_sizes:
        return batches
    cap = args.max_batch_cap
    if cap is None:
        if jax.devices()[0].platform == "cpu":
            note = 'batch "max" skipped on CPU (pass --max_batch_cap to search up to a limit)'
            if note not in notes:
                notes.append(note)
            return batches
        cap = 65536
    what = f"max batch search for {s.name} {'guided' if guided else 'unguided'}"
    if not may_search(what):
        notes.append(f"{what}: not run (budget spent)")
        return batches
    best, probes = find_max_batch(s, guided, cap, args)
    notes.append(f"{what}: {best} (cap {cap}; probes: {', '.join(probes)})")
    return sorted(set(batches) | {best})


def find_max_batch(s: Sampling, guided: bool, cap: int, args) -> tuple[int, list[str]]:
    """The largest power-of-two batch (from 256 by doubling, or halving if 256 fails, at most
    ``cap``) whose sampler program compiles and runs without running out of device memory.

    Probed with a 2-step DDIM chain: a chain's memory does not grow with its length (no
    snapshots), and an ancestral step needs what a DDIM step needs.
    """
    import jax

    probes = []

    def fits(batch: int) -> bool:
        call = chain_inputs(s, "ddim", 2, guided, batch, args.guidance, args.seed, s.mesh)
        try:
            compiled, _ = call.compile()
            jax.block_until_ready(compiled(*call.args))
            probes.append(f"{batch} ok")
            return True
        except Exception as e:
            if not is_oom(e):
                raise
            probes.append(f"{batch} out of memory")
            return False
        finally:
            gc.collect()

    batch = min(MAX_SEARCH_START, cap)
    if fits(batch):
        while batch * 2 <= cap and fits(batch * 2):
            batch *= 2
        return batch, probes
    while batch > 1:
        batch //= 2
        if fits(batch):
            return batch, probes
    raise RuntimeError(f"even batch 1 runs out of memory for {s.name}")
