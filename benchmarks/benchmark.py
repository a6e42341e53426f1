r"""Benchmarks of diffusion_jax: training throughput, sampling throughput, FLOPs, compile times.

What it measures (each section prints a markdown table; all of them, with a header naming the
machine, the library versions and the command line, go to one markdown file):

1. Training throughput (steps/s, images/s) per preset, batch size and activation dtype, with
   the bfloat16 / float32 speed ratio. Synthetic data of the preset's image shape, so no data
   set is needed.
2. FLOPs per training step and per sampler step from XLA's cost analysis of the compiled
   programs, the achieved TFLOP/s and the fraction of the device's peak.
3. Sampling throughput: 1000-step ancestral (DDPM) and 50-step DDIM, each guided and unguided,
   at several batch sizes up to the largest that fits in device memory, with the issue's
   targets (one image in 1000 ancestral steps under 1 s; 10,000 guided DDIM-50 samples under
   15 s, both on an H100).
4. The chain driven from Python (one jitted step per dispatch) against the compiled lax.scan.
5. lax.scan unroll factors of the DDIM sampler.
6. Compile times of the train step and of every sampler program.

Parameters are random (freshly initialised), which changes nothing about the speed.

Run it from the repository root:

  # GPU/TPU: the full set, written to docs/BENCHMARKS.md
  python benchmarks/benchmark.py

  # CPU: a small smoke run, printed only
  JAX_PLATFORMS=cpu python benchmarks/benchmark.py --presets tiny --quick --out -

  # CPU: the cpu preset, small sizes
  JAX_PLATFORMS=cpu python benchmarks/benchmark.py --presets cpu --quick \
      --train_batch_sizes 16 --sample_batch_sizes 1 --out docs/BENCHMARKS_cpu.md

Everything that was run (batch sizes, step counts, repeats, skipped parts) is printed in the
output; nothing is chosen silently per platform except that the "max" batch search runs on CPU
only when --max_batch_cap is given (host memory has no clean out-of-memory error).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback

import numpy as np

from diffusion_jax import cli

# Peak dense throughput in TFLOP/s, (device_kind substring, bfloat16, float32); first match wins,
# matched case-insensitively. float32 is the non-tensor-core rate; None: not listed (TPUs run
# float32 matmuls as bfloat16 passes at default precision, so their bfloat16 peak is used).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),  # SXM
    ("H200", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("TPU v4", 275.0, None),
    ("TPU v5 lite", 197.0, None),
    ("TPU v5e", 197.0, None),
    ("TPU v5p", 459.0, None),
    ("TPU v5", 459.0, None),
)

DEFAULTS = dict(
    repeats=5,
    ddpm_steps=1000,
    train_batch_sizes=[64, 128, 256],
    sample_batch_sizes=[1, 16, 256, "max"],
    unroll_factors=[1, 2, 4, 8],
)
QUICK = dict(
    repeats=3,
    ddpm_steps=100,
    train_batch_sizes=[16, 64],
    sample_batch_sizes=[1, 16],
    unroll_factors=[1, 4],
)
SECTIONS = ("train", "sample", "loop", "unroll")
DTYPES = ("float32", "bfloat16")
MAX_SEARCH_START = 256
MIN_TIMED_STEPS = 10
TARGET_SAMPLES = 10_000

# ---------------------------------------------------------------- command line


_int_list = cli.list_type(int, name="the value", minimum=1, example="1,64")


def _batch_list(text: str) -> list:
    """Comma-separated batch sizes; the word "max" stands for the largest that fits."""
    parts = cli.list_type(name="the value")(text)
    numbers = _int_list(",".join(p for p in parts if p != "max")) if set(parts) - {"max"} else []
    return sorted(set(numbers)) + (["max"] if "max" in parts else [])


_names = cli.list_type(name="the value")


def _str_list(choices):
    return cli.list_type(name="the value", choices=choices)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults except None/False ones (those say their default in the help text), and
    keeps the epilog's line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__[__doc__.index("Run it from") : __doc__.index("Everything that was run")]
    p = argparse.ArgumentParser(
        description="Benchmark training and sampling of diffusion_jax on the local device(s): "
        "throughput, FLOPs and fraction of peak, sampler latency, compile times.",
        epilog=examples.rstrip(),
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--presets",
        "--preset",
        type=_names,
        default=["mnist", "cpu"],
        help="comma-separated config presets to benchmark (names of diffusion_jax.config.PRESETS)",
    )
    p.add_argument(
        "--sections",
        type=_str_list(SECTIONS),
        default=list(SECTIONS),
        help="which sections to run (the compile-time table covers whatever ran)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller defaults for a smoke run: "
        + ", ".join(f"{k}={v}" for k, v in QUICK.items())
        + " (explicit flags still win)",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--train_batch_sizes",
        type=_int_list,
        default=None,
        help=f"training batch sizes (default {DEFAULTS['train_batch_sizes']})",
    )
    g.add_argument(
        "--dtypes",
        type=_str_list(DTYPES),
        default=list(DTYPES),
        help="activation dtypes for training (the bf16/f32 ratio needs both)",
    )
    g.add_argument(
        "--steps_per_dispatch",
        type=int,
        default=None,
        help="optimizer steps per dispatch (default: the preset's own value)",
    )
    g.add_argument(
        "--num_examples",
        type=int,
        default=4096,
        help="synthetic training images held on the device (at least the batch size)",
    )
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--sample_batch_sizes",
        type=_batch_list,
        default=None,
        help='sampling batch sizes; "max" = the largest that fits (default '
        f"{DEFAULTS['sample_batch_sizes']})",
    )
    g.add_argument(
        "--sample_dtypes",
        type=_str_list(DTYPES),
        default=["float32"],
        help="activation dtypes of the denoiser for the sampling sections",
    )
    g.add_argument(
        "--ddpm_steps",
        type=int,
        default=None,
        help=f"steps of the ancestral chain (default {DEFAULTS['ddpm_steps']}, the full "
        "schedule; capped at the preset's num_timesteps)",
    )
    g.add_argument("--ddim_steps", type=int, default=50, help="steps of the DDIM chain")
    g.add_argument("--guidance", type=float, default=1.0, help="guidance weight w when guided")
    g.add_argument(
        "--max_batch_cap",
        type=int,
        default=None,
        help='upper limit of the "max" batch search (default 65536 on GPU/TPU; on CPU the '
        "search runs only when this is given)",
    )
    g.add_argument(
        "--run_budget_s",
        type=float,
        default=30.0,
        help="a sampler run expected to take longer than this (extrapolated from the previous "
        "batch size) is timed on a shorter chain of the same kind and scaled to the full one",
    )
    g.add_argument(
        "--loop_batch_sizes",
        type=_int_list,
        default=[1, 16],
        help="batch sizes of the Python-loop vs lax.scan comparison (guided DDIM)",
    )
    g.add_argument(
        "--unroll_factors",
        type=_int_list,
        default=None,
        help=f"lax.scan unroll factors to compare (default {DEFAULTS['unroll_factors']})",
    )
    g.add_argument(
        "--unroll_batch_size", type=int, default=16, help="batch size of the unroll comparison"
    )
    g = p.add_argument_group("timing and output")
    g.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per measurement; the median is reported (default {DEFAULTS['repeats']})",
    )
    g.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    g.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="peak TFLOP/s of one device for the fraction-of-peak columns (default: looked up "
        "from the device kind for known GPUs/TPUs; n/a otherwise)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and keys")
    g.add_argument(
        "--out",
        default="docs/BENCHMARKS.md",
        help='markdown file to write ("-" = print only)',
    )
    g.add_argument("--no_write", action="store_true", help="print only, write no file")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def parse_args(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    from diffusion_jax.config import PRESETS  # (imports jax: not needed for --help)

    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {tuple(PRESETS)}")
    for name in DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, (QUICK if args.quick else DEFAULTS)[name])
    for name in ("repeats", "ddim_steps", "ddpm_steps", "num_examples", "unroll_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.steps_per_dispatch is not None and args.steps_per_dispatch < 1:
        parser.error("--steps_per_dispatch must be >= 1")
    if args.no_write or args.out == "-":
        args.out = None
    elif os.path.exists(args.out) and not args.overwrite:
        parser.error(
            f"{args.out} exists; pass --overwrite to replace it, choose another --out, "
            "or use --out - to print only"
        )
    elif os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder; give a file name")
    return args


# ---------------------------------------------------------------- small helpers


class Report:
    """Markdown parts, printed as they are added and joined for the output file."""

    def __init__(self):
        self.parts: list[str] = []
        self.compiles: list[tuple[str, float]] = []  # (what, seconds) for the compile table
        self.failed: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        print(text + "\n", flush=True)

    def markdown(self) -> str:
        return "\n\n".join(self.parts) + "\n"


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, spec: str = ".3g", prefix: str = "") -> str:
    """``value`` formatted, "n/a" for None or NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return prefix + format(value, spec)


def percent(part, whole) -> str:
    if part is None or not whole:
        return "n/a"
    return f"{100 * part / whole:.1f}%"


def compile_timed(fn, *args, **kwargs):
    """``(compiled, seconds)``: ``fn`` (a jitted function) lowered and compiled ahead of time."""
    start = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def median_seconds(run, repeats: int, warmup: int, budget_s: float | None = None):
    """``(median, count)`` of the wall time of ``run()`` to completion over ``repeats`` runs after
    ``warmup`` untimed ones. A warm-up longer than ``budget_s`` leaves a single timed run."""
    import jax

    for _ in range(warmup):
        start = time.perf_counter()
        jax.block_until_ready(run())
        if budget_s is not None and time.perf_counter() - start > budget_s:
            repeats = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def flops_of(compiled) -> float | None:
    """The "flops" entry of XLA's cost analysis (a dict, or a list of one dict per program in
    some jax versions); None where there is none.

    XLA counts a while loop's body once, not once per iteration: only loop-free programs give
    the FLOPs of the work they do.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # not implemented on some backends
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or analysis.get("flops") is None:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ---------------------------------------------------------------- environment and peaks


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def peak_for(args, dtype: str) -> tuple[float | None, str]:
    """``(peak TFLOP/s of one device or None, how it was chosen)`` for runs in ``dtype``."""
    import jax

    if args.peak_tflops is not None:
        return args.peak_tflops, f"{args.peak_tflops:g} (--peak_tflops)"
    kind = jax.devices()[0].device_kind.lower()
    for name, bf16, f32 in PEAK_TFLOPS:
        if name.lower() in kind:
            if dtype == "bfloat16" or f32 is None:
                return bf16, f"{bf16:g} ({name} bf16)"
            return f32, f"{f32:g} ({name} f32)"
    return None, "n/a"


def header(args, argv) -> str:
    import jax

    dev = jax.devices()[0]
    lines = [
        "# diffusion_jax benchmarks",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S}",
        f"- device: {dev.device_kind} (platform {dev.platform}), {jax.device_count()} device(s)",
    ]
    if dev.platform == "cpu":
        lines.append(f"- CPU: {cpu_model()}, os.cpu_count() = {os.cpu_count()}")
    lines += [
        f"- python {platform.python_version()}, jax {_version('jax')}, jaxlib "
        f"{_version('jaxlib')}, flax {_version('flax')}, optax {_version('optax')}",
        f"- command: `{shlex.join(['python', sys.argv[0], *argv])}`",
    ]
    env = {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS") if k in os.environ}
    if env:
        lines.append("- environment: " + ", ".join(f"`{k}={v}`" for k, v in env.items()))
    peaks = {d: peak_for(args, d)[1] for d in ("float32", "bfloat16")}
    lines += [
        f"- settings: presets {args.presets}, sections {args.sections}, repeats {args.repeats} "
        f"(median reported) after {args.warmup} warm-up run(s), seed {args.seed}"
        + (", --quick" if args.quick else ""),
        f"- training: batch sizes {args.train_batch_sizes}, dtypes {args.dtypes}, steps per "
        + (
            "dispatch: each preset's own"
            if args.steps_per_dispatch is None
            else f"dispatch {args.steps_per_dispatch}"
        )
        + f", {args.num_examples} synthetic examples",
        f"- sampling: ancestral {args.ddpm_steps} steps, DDIM {args.ddim_steps} steps (both "
        f"capped at a preset's num_timesteps), batch sizes {args.sample_batch_sizes}, guidance "
        f"w = {args.guidance:g}, denoiser dtypes {args.sample_dtypes}, run budget "
        f"{args.run_budget_s:g} s; Python loop vs scan at {args.loop_batch_sizes}; unroll "
        f"{args.unroll_factors} at batch {args.unroll_batch_size}",
        f"- peak TFLOP/s per device used for the %-of-peak columns: f32 {peaks['float32']}, "
        f"bf16 {peaks['bfloat16']}",
    ]
    if peaks["float32"] == "n/a":
        lines.append(
            "- note: no peak is known for this device (pass --peak_tflops), so the "
            "fraction-of-peak columns read n/a"
        )
    elif args.peak_tflops is None and dev.platform == "gpu":
        lines.append(
            "- note: the f32 peak is the non-tensor-core rate; XLA may run float32 convolutions "
            "and matmuls on TF32 tensor cores, so f32 runs can exceed 100%"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- configs and data


def data_shape(config) -> tuple[int, ...]:
    """Shape of one example as the data loader would give it (without batch)."""
    if config.dataset == "toy2d":
        return (2,)
    size = config.image_size or 28  # MNIST, Fashion-MNIST and the 5k digits are 28x28x1
    return (size, size, 1)


def train_config(preset: str, dtype: str, batch: int, steps_per_dispatch: int | None):
    from diffusion_jax import config as config_lib

    overrides = dict(batch_size=batch, dtype=dtype)
    if steps_per_dispatch is not None:
        overrides["steps_per_dispatch"] = steps_per_dispatch
    return config_lib.get_config(preset, **overrides)


# ---------------------------------------------------------------- training


def bench_train(preset: str, dtype: str, batch: int, args, mesh, report: Report) -> dict:
    """Time one training configuration; returns a row's values."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax import data, models, sharding, training

    config = train_config(preset, dtype, batch, args.steps_per_dispatch)
    sharding.check_batch_size(batch, mesh)
    shape = data_shape(config)
    # Synthetic data laid out on the devices as training.train lays out a real data set: one
    # shard per process, each device holding its shard's examples.
    rng = np.random.default_rng(args.seed)
    num = max(args.num_examples, batch)
    synthetic = data.Dataset(
        "synthetic",
        rng.uniform(-1, 1, (num, *shape)).astype(np.float32),
        rng.integers(0, config.num_classes, num).astype(np.int32),
        np.zeros((0, *shape), np.float32),
        np.zeros((0,), np.int32),
        config.num_classes,
    )
    num_shards = jax.process_count()
    train_x, train_y = training.device_data(synthetic, mesh, num_shards)
    model, optimizer = models.build_model(config), training.make_optimizer(config)
    state = training.init_state(config, model, optimizer, (1, *shape))
    state = sharding.replicate(state, mesh)

    steps = config.steps_per_dispatch
    count = jnp.int32(steps)
    fn = training.make_train_steps(config, mesh, num_shards)
    compiled, compile_s = compile_timed(fn, state, train_x, train_y, count)
    label = f"train {preset} {dtype} batch {batch} ({steps} step(s)/dispatch)"
    report.compiles.append((label, compile_s))
    # The same input state every run: each dispatch does the same work, and no output placement
    # has to match the compiled program's input placement.
    median, runs = median_seconds(
        lambda: compiled(state, train_x, train_y, count), args.repeats, args.warmup
    )

    # FLOPs per step come from a loop-free program (one step per dispatch): XLA's cost analysis
    # counts a fori_loop body once whatever the trip count. The count includes everything the
    # step does: the forward pass, the backward pass, the optimizer (AdamW, clipping) and EMA
    # updates, and the batch gather and random draws.
    if steps == 1:
        one_step, flops_compile_s = compiled, 0.0
    else:
        single = dataclasses.replace(config, steps_per_dispatch=1)
        one_step, flops_compile_s = compile_timed(
            training.make_train_steps(single, mesh, num_shards),
            state,
            train_x,
            train_y,
            jnp.int32(1),
        )
        report.compiles.append(
            (f"train {preset} {dtype} batch {batch} (1 step/dispatch, for FLOPs)", flops_compile_s)
        )
    flops = flops_of(one_step)
    # An SPMD program's cost analysis describes one device's share of the batch.
    flops_step = None if flops is None else flops * mesh.devices.size
    steps_per_s = steps / median
    return dict(
        preset=preset,
        dtype=dtype,
        batch=batch,
        steps=steps,
        compile_s=compile_s,
        runs=runs,
        step_ms=1e3 * median / steps,
        steps_per_s=steps_per_s,
        images_per_s=batch * steps_per_s,
        flops_step=flops_step,
        tflops=None if flops_step is None else flops_step * steps_per_s / 1e12,
    )


def train_section(args, report: Report) -> None:
    from diffusion_jax import sharding

    mesh = sharding.data_mesh()
    ndev = mesh.devices.size
    report.add(
        f"Synthetic data: {args.num_examples} uniform random examples in [-1, 1] of the preset's "
        f"shape with random labels, placed on a {ndev}-device data mesh as `training.train` "
        "places a data set (each batch is split over the devices). Times are per dispatch to "
        "completion (`jax.block_until_ready`); "
        "compile = lower + compile ahead of time. FLOPs from XLA's cost analysis of a one-step "
        "program: forward + backward pass + optimizer and EMA update"
        + (f", summed over the {ndev} devices" if ndev > 1 else "")
        + "."
    )
    rows, results = [], []
    for preset in args.presets:
        for dtype in args.dtypes:
            peak, peak_text = peak_for(args, dtype)
            for batch in args.train_batch_sizes:
                if batch % ndev:
                    reason = f"skipped: not divisible by the {ndev} devices"
                    rows.append([preset, dtype, batch, reason] + [""] * 9)
                    continue
                r = bench_train(preset, dtype, batch, args, mesh, report)
                results.append(r)
                rows.append(
                    [
                        preset,
                        dtype,
                        batch,
                        r["steps"],
                        fmt(r["compile_s"], ".1f"),
                        fmt(r["step_ms"], ".4g"),
                        fmt(r["steps_per_s"], ".4g"),
                        fmt(r["images_per_s"], ".4g"),
                        fmt(None if r["flops_step"] is None else r["flops_step"] / batch / 1e9),
                        fmt(r["tflops"], ".3g"),
                        peak_text,
                        percent(r["tflops"], None if peak is None else peak * ndev),
                        r["runs"],
                    ]
                )
    report.add(
        md_table(
            [
                "preset",
                "dtype",
                "batch",
                "steps/dispatch",
                "compile s",
                "ms/step",
                "steps/s",
                "images/s",
                "GFLOP/image (fwd+bwd+opt)",
                "TFLOP/s",
                "peak TFLOP/s/device",
                "% of peak",
                "timed runs",
            ],
            rows,
        )
    )
    report.add(ratio_table(results))


def ratio_table(results: list[dict]) -> str:
    """bfloat16 / float32 training speed at equal preset and batch size."""
    by_key = {(r["preset"], r["batch"], r["dtype"]): r for r in results}
    rows = []
    for (preset, batch, dtype), r in by_key.items():
        base = by_key.get((preset, batch, "float32"))
        if dtype == "bfloat16" and base is not None:
            rows.append(
                [
                    preset,
                    batch,
                    fmt(base["images_per_s"], ".4g"),
                    fmt(r["images_per_s"], ".4g"),
                    f"{r['images_per_s'] / base['images_per_s']:.2f}x",
                ]
            )
    if not rows:
        return "bf16/f32 speed ratio: n/a (needs both --dtypes float32,bfloat16)"
    return "**bf16 / f32 training speed**\n\n" + md_table(
        ["preset", "batch", "f32 images/s", "bf16 images/s", "bf16/f32"], rows
    )


# ---------------------------------------------------------------- sampling setup


@dataclasses.dataclass
class Sampling:
    """One preset's denoiser with initialised parameters, and the sampler programs compiled for
    it: {(method, steps, guided, batch, unroll, one_device): (compiled, compile_s, args, static)}
    and the FLOPs of one reverse step: {(method, guided, batch): flops}."""

    preset: str
    dtype: str
    config: object
    denoise_fn: object
    params: object
    shape: tuple[int, ...]
    mesh: object  # None on one device; else the batch is split over all devices, as generate does
    programs: dict = dataclasses.field(default_factory=dict)
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
        method=method,
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


def step_flops(s: Sampling, method: str, guided: bool, batch: int, args) -> float | None:
    """FLOPs of one reverse step: the loop-free jitted step of ``samplers.sample_python_loop``."""
    import jax.numpy as jnp

    from diffusion_jax import samplers

    key = (method, guided, batch)
    if key not in s.step_flops:
        call = chain_inputs(s, method, 2, guided, batch, args.guidance, args.seed)
        params, schedule, rng_key, labels, w, eta, _ = call.args
        x = jnp.zeros(call.static["shape"], jnp.float32)
        carry = call.static["settings"].solver.init(x)
        compiled = (
            samplers.jitted_step(call)
            .lower(params, schedule, jnp.int32(1), x, carry, rng_key, labels, w, eta)
            .compile()
        )
        s.step_flops[key] = flops_of(compiled)
        s.step_convolutions[key] = compiled.as_text().count(" convolution(")
    return s.step_flops[key]


def guidance_check(s: Sampling) -> str:
    """Evidence from the compiled programs that a guided step calls the denoiser once, on the
    doubled batch: as many convolutions as an unguided step, and twice its FLOPs."""
    lines = []
    for (method, guided, batch), convs in sorted(s.step_convolutions.items()):
        other = (method, not guided, batch)
        if guided and other in s.step_convolutions:
            ratio = s.step_flops[(method, True, batch)] / s.step_flops[other]
            lines.append(
                f"- {method} batch {batch}: the compiled guided step has {convs} convolution ops, "
                f"the unguided one {s.step_convolutions[other]}; guided / unguided FLOPs = "
                f"{ratio:.3f}"
            )
    if not lines:
        return ""
    return "One denoiser call per guided step (the doubled batch):\n" + "\n".join(lines)


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


def sampler_batches(s: Sampling, guided: bool, args, notes: list[str]) -> list[int]:
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
    best, probes = find_max_batch(s, guided, cap, args)
    notes.append(
        f"max batch for {s.name} {'guided' if guided else 'unguided'}: {best} "
        f"(cap {cap}; probes: {', '.join(probes)})"
    )
    return sorted(set(batches) | {best})


# ---------------------------------------------------------------- sampling throughput


def time_sampler(s: Sampling, method, steps, guided, batch, args, report, previous=None) -> dict:
    """Time one chain. ``previous`` (the last result of the same sampler at a smaller batch)
    predicts the run time; beyond --run_budget_s a shorter chain is timed and scaled."""
    timed_steps = steps
    if previous is not None:
        per_step = previous["seconds"] / previous["timed_steps"]
        expected = per_step * steps * batch / previous["batch"]
        if expected > args.run_budget_s:
            timed_steps = max(
                min(steps, MIN_TIMED_STEPS), int(steps * args.run_budget_s / expected)
            )
    compiled, compile_s, call = chain_program(
        s, method, timed_steps, guided, batch, 1, args, report
    )
    seconds, runs = median_seconds(
        lambda: compiled(*call.args), args.repeats, args.warmup, args.run_budget_s
    )
    flops = step_flops(s, method, guided, batch, args)
    full_s = seconds * steps / timed_steps
    return dict(
        method=method,
        steps=steps,
        guided=guided,
        batch=batch,
        timed_steps=timed_steps,
        compile_s=compile_s,
        seconds=seconds,
        runs=runs,
        full_s=full_s,
        images_per_s=batch / full_s,
        step_ms=1e3 * seconds / timed_steps,
        flops_image=None if flops is None else flops * steps / batch,
        tflops=None if flops is None else flops * timed_steps / seconds / 1e12,
    )


def capped_steps(s: Sampling, steps: int, notes: list[str], what: str) -> int:
    if steps > s.config.num_timesteps:
        notes.append(
            f"{s.name}: {what} capped at the preset's num_timesteps = {s.config.num_timesteps}"
        )
        return s.config.num_timesteps
    return steps


def sampling_section(args, report: Report, samplings: list[Sampling]) -> None:
    report.add(
        "Each sampler is the whole chain compiled as one `lax.scan` (`samplers.prepare_chain(...)"
        ".compile()`, the program `samplers.sample` runs), compiled ahead of time and timed to "
        "completion. "
        f"Guided: w = {args.guidance:g} with random labels (conditional and unconditional "
        "outputs from one denoiser call on the doubled batch); unguided: w = 0, the same labels. "
        "Ancestral = DDPM with the small posterior variance; DDIM with eta = 0. GFLOP/image = "
        "XLA cost analysis of one jitted reverse step x steps / batch. Rows marked ~ were timed "
        "on a shorter chain of the same kind (column 'timed steps') and scaled to the full "
        "length. With several devices the batch is split over all of them (as "
        "`generation.generate` does), padded to a multiple of the device count."
    )
    for s in samplings:
        notes: list[str] = []
        peak, peak_text = peak_for(args, s.dtype)
        ddpm = capped_steps(s, args.ddpm_steps, notes, "--ddpm_steps")
        ddim = capped_steps(s, args.ddim_steps, notes, "--ddim_steps")
        batches = {g: sampler_batches(s, g, args, notes) for g in (True, False)}
        rows, results = [], []
        for method, steps in (("ddpm", ddpm), ("ddim", ddim)):
            for guided in (True, False):
                previous = None
                for batch in batches[guided]:
                    try:
                        r = time_sampler(s, method, steps, guided, batch, args, report, previous)
                    except Exception as e:  # e.g. the max batch, found with DDIM, for DDPM
                        if not is_oom(e):
                            raise
                        name = "ancestral" if method == "ddpm" else "DDIM"
                        rows.append([name, steps, "", batch, "out of memory"] + [""] * 9)
                        continue
                    previous = r
                    results.append(r)
                    mark = "~" if r["timed_steps"] < steps else ""
                    rows.append(
                        [
                            "ancestral" if method == "ddpm" else "DDIM",
                            steps,
                            f"{args.guidance:g}" if guided else "0",
                            batch,
                            r["timed_steps"],
                            fmt(r["compile_s"], ".1f"),
                            fmt(r["full_s"], ".4g", mark),
                            fmt(r["images_per_s"], ".4g", mark),
                            fmt(r["step_ms"], ".4g"),
                            fmt(None if r["flops_image"] is None else r["flops_image"] / 1e9),
                            fmt(r["tflops"], ".3g"),
                            peak_text,
                            percent(r["tflops"], None if peak is None else peak * s.num_devices),
                            r["runs"],
                        ]
                    )
        report.add(f"### {s.name}")
        report.add(
            md_table(
                [
                    "sampler",
                    "steps",
                    "w",
                    "batch",
                    "timed steps",
                    "compile s",
                    "s/batch (median)",
                    "images/s",
                    "ms/step",
                    "GFLOP/image",
                    "TFLOP/s",
                    "peak TFLOP/s/device",
                    "% of peak",
                    "timed runs",
                ],
                rows,
            )
        )
        report.add(targets_table(s, results, ddpm, ddim))
        if s.step_convolutions:
            report.add(guidance_check(s))
        if notes:
            report.add("\n".join(f"- note: {n}" for n in notes))


def targets_table(s: Sampling, results: list[dict], ddpm: int, ddim: int) -> str:
    """The issue's two targets (for an H100), measured or extrapolated from the rows above."""
    rows = []
    for guided in (True, False):
        one = [r for r in results if r["method"] == "ddpm" and r["guided"] == guided]
        one = [r for r in one if r["batch"] == 1]
        if not one:
            continue
        r = one[0]
        latency = r["full_s"] * 1000 / ddpm
        exact = ddpm == 1000 and r["timed_steps"] == ddpm
        how = "measured" if exact else f"extrapolated from {r['timed_steps']} timed steps"
        rows.append(
            [
                f"1000 ancestral steps, 1 image, {'guided' if guided else 'unguided'}",
                f"{latency:.3g} s",
                how,
                "< 1 s",
                "yes" if latency < 1 else "no",
            ]
        )
    ddim_guided = [r for r in results if r["method"] == "ddim" and r["guided"]]
    if ddim_guided:
        best = max(ddim_guided, key=lambda r: r["images_per_s"])
        seconds = TARGET_SAMPLES / best["images_per_s"] * 50 / ddim
        if best["batch"] >= TARGET_SAMPLES and ddim == 50 and best["timed_steps"] == ddim:
            how = f"measured at batch {best['batch']} (scaled to {TARGET_SAMPLES})"
        else:
            how = (
                f"extrapolated from {best['images_per_s']:.4g} images/s at batch {best['batch']}"
                + (f", {best['timed_steps']} timed steps" if best["timed_steps"] < ddim else "")
                + (f", DDIM-{ddim} scaled to 50 steps" if ddim != 50 else "")
            )
        rows.append(
            [
                f"{TARGET_SAMPLES:,} guided DDIM-50 samples",
                f"{seconds:.3g} s",
                how,
                "< 15 s",
                "yes" if seconds < 15 else "no",
            ]
        )
    return f"**Targets ({s.name}; the targets are for one H100)**\n\n" + md_table(
        ["what", "time", "how", "target", "meets target here"], rows
    )


# ---------------------------------------------------------------- loop vs scan, unroll


def loop_section(args, report: Report, samplings: list[Sampling]) -> None:
    import jax

    from diffusion_jax import samplers

    report.add(
        "Guided DDIM: the chain driven from Python, one jitted reverse step per dispatch "
        "(`samplers.sample_python_loop`, warmed up so compiling is excluded), against the "
        "compiled `lax.scan` chain (unroll 1). Medians of whole chains to completion."
    )
    rows = []
    for s in samplings:
        steps = min(args.ddim_steps, s.config.num_timesteps)
        for batch in args.loop_batch_sizes:
            # Both on one device: sample_python_loop does not split the batch.
            compiled, _, call = chain_program(
                s, "ddim", steps, True, batch, 1, args, report, one_device=True
            )
            scan_s, _ = median_seconds(
                functools.partial(compiled, *call.args), args.repeats, args.warmup
            )
            loop = functools.partial(samplers.sample_python_loop, call)

            start = time.perf_counter()
            jax.block_until_ready(loop())  # compiles the step (once per configuration)
            first_s = time.perf_counter() - start
            report.compiles.append(
                (f"python-loop step {s.name} ddim guided batch {batch} (+1 run)", first_s)
            )
            loop_s, _ = median_seconds(loop, args.repeats, max(args.warmup - 1, 0))
            rows.append(
                [
                    s.name,
                    steps,
                    batch,
                    fmt(1e3 * loop_s, ".4g"),
                    fmt(1e3 * scan_s, ".4g"),
                    f"{loop_s / scan_s:.2f}x",
                ]
            )
    report.add(
        md_table(
            ["model", "DDIM steps", "batch", "Python loop ms", "lax.scan ms", "loop / scan"], rows
        )
    )


def unroll_section(args, report: Report, samplings: list[Sampling]) -> None:
    batch = args.unroll_batch_size
    report.add(
        f"Guided DDIM at batch {batch}: compile time and median run time of the lax.scan chain "
        "for each unroll factor (the results are identical)."
    )
    rows = []
    for s in samplings:
        steps = min(args.ddim_steps, s.config.num_timesteps)
        base = None
        for unroll in args.unroll_factors:
            compiled, compile_s, call = chain_program(
                s, "ddim", steps, True, batch, unroll, args, report
            )
            seconds, _ = median_seconds(
                functools.partial(compiled, *call.args), args.repeats, args.warmup
            )
            base = base or seconds
            rows.append(
                [
                    s.name,
                    steps,
                    unroll,
                    fmt(compile_s, ".2f"),
                    fmt(1e3 * seconds, ".4g"),
                    f"{base / seconds:.2f}x",
                ]
            )
    report.add(
        md_table(
            [
                "model",
                "DDIM steps",
                "unroll",
                "compile s",
                "run ms (median)",
                f"speed vs unroll {args.unroll_factors[0]}",
            ],
            rows,
        )
    )


def compile_section(report: Report) -> None:
    report.add(
        "Lower + compile, ahead of time, of every program above (the Python-loop row is the "
        "first call of the loop: compiling its step plus one run)."
    )
    rows = [[what, f"{seconds:.2f}"] for what, seconds in report.compiles]
    report.add(md_table(["program", "compile s"], rows))


# ---------------------------------------------------------------- main


def run_section(report: Report, title: str, fn, *fn_args) -> None:
    """Run one section; a failure is reported (and the run ends non-zero) but the other
    sections still run."""
    report.add(f"## {title}")
    try:
        fn(*fn_args)
    except Exception as e:
        traceback.print_exc()
        report.failed.append(title)
        report.add(f"**This section failed:** `{type(e).__name__}: {e}`")


def write_output(path: str, text: str, overwrite: bool) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w" if overwrite else "x") as f:
        f.write(text)
    print(f"wrote {path}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    report = Report()
    report.add(header(args, argv))
    interrupted = False
    try:
        if "train" in args.sections:
            run_section(report, "Training throughput", train_section, args, report)
        samplings = []
        if {"sample", "loop", "unroll"} & set(args.sections):
            samplings = [make_sampling(p, d) for p in args.presets for d in args.sample_dtypes]
        if "sample" in args.sections:
            run_section(report, "Sampling throughput", sampling_section, args, report, samplings)
        if "loop" in args.sections:
            run_section(report, "Python loop vs lax.scan", loop_section, args, report, samplings)
        if "unroll" in args.sections:
            run_section(report, "lax.scan unroll", unroll_section, args, report, samplings)
        run_section(report, "Compile times", compile_section, report)
    except KeyboardInterrupt:
        interrupted = True
        report.add("**Interrupted: the results above are incomplete.**")
    if report.failed:
        report.add(f"**Failed sections:** {', '.join(report.failed)} (see the notes above)")
    if args.out:
        write_output(args.out, report.markdown(), args.overwrite)
    return 130 if interrupted else (1 if report.failed else 0)


if __name__ == "__main__":
    sys.exit(main())
