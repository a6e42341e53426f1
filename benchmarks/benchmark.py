r"""Benchmarks of diffusion_jax: training throughput, sampling throughput, FLOPs, compile times.

What it measures (each section prints its markdown table row by row, each row as soon as it is
measured; all of them, with a header naming the machine, the library versions and the command
line, go to one markdown file):

1. Training throughput (steps/s, images/s) per preset, activation dtype and batch size, with
   the bfloat16 / float32 speed ratio, on synthetic data of the preset's image shape.
2. FLOPs per training step and per sampler step from XLA's cost analysis of the very programs
   timed (one compile per row), the achieved TFLOP/s and the fraction of the device's peak.
3. Sampling throughput: ancestral (DDPM, 1000 steps), DDIM (50) and DPM-Solver++(2M) (20),
   guided and unguided, at several batch sizes up to the largest that fits in device memory,
   with the issue's targets (one image in 1000 ancestral steps under 1 s; 10,000 guided DDIM-50
   samples under 15 s, both on an H100).
4. The chain driven from Python (one jitted step per dispatch) against the compiled lax.scan.
5. lax.scan unroll factors of the DDIM sampler.
6. Compile times of every program above (a summary at the end).

Parameters are random (freshly initialised), which changes nothing about the speed. No row
starts once --budget_s (counted from the start, compiles included) is spent; the rows not run
are marked in their tables and listed at the end.

Run it from the repository root:

  # GPU/TPU: the full set, written to docs/BENCHMARKS.md
  python benchmarks/benchmark.py

  # one GPU, about 3 minutes: training f32/bf16 at two batch sizes, three samplers
  python benchmarks/benchmark.py --gpu_quick --out bench.md

  # CPU: a small smoke run, printed only
  JAX_PLATFORMS=cpu python benchmarks/benchmark.py --presets tiny --quick --out -

Everything that was run (batch sizes, step counts, repeats, skipped parts) is printed in the
output; nothing is chosen silently per platform except that the "max" batch search runs on CPU
only when --max_batch_cap is given (host memory has no clean out-of-memory error).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback

if __package__ in (None, ""):
    # Run as a file (python benchmarks/NAME.py), Python puts benchmarks/ on sys.path, not the
    # repository root; the root makes `benchmarks` (and diffusion_jax) importable either way.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Report, header, md_table, peak_for, write_output  # noqa: E402
from benchmarks.sampling_bench import loop_section, sampling_section, unroll_section  # noqa: E402
from benchmarks.sampling_programs import make_sampling  # noqa: E402
from benchmarks.training_bench import train_section  # noqa: E402
from diffusion_jax import cli  # noqa: E402

SECTIONS = ("train", "sample", "loop", "unroll")
DTYPES = ("float32", "bfloat16")
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
POSITIVE = "repeats ddim_steps ddpm_steps dpmpp2m_steps num_examples unroll_batch_size".split()
# What an unset flag means, per profile (explicit flags always win). budget_s: seconds from the
# start after which no new row starts (compiles included; 0 = no budget).
DEFAULTS = dict(
    presets=["mnist", "cpu"],
    sections=list(SECTIONS),
    dtypes=list(DTYPES),
    samplers=list(SAMPLERS),
    repeats=5,
    ddpm_steps=1000,
    train_batch_sizes=[64, 128, 256],
    sample_batch_sizes=[1, 16, 256, "max"],
    unroll_factors=[1, 2, 4, 8],
    run_budget_s=30.0,
    guided_only=False,
    budget_s=3600.0,
)
QUICK = dict(
    repeats=3,
    ddpm_steps=100,
    train_batch_sizes=[16, 64],
    sample_batch_sizes=[1, 16],
    unroll_factors=[1, 4],
    budget_s=600.0,
)
# About 3 minutes on one H100-class GPU (expected, not measured): the default preset `mnist`
# (the H200's baseline, 83 steps/s at batch 128 float32) trained in bfloat16 and float32 at its
# own batch size and mnist_gpu's (same network, so the bfloat16 row at mnist_gpu's batch is that
# preset's step), then the guided samplers sample.py offers at 1 image and at sample.py's 1,000.
# Most important rows first: the budget cuts the last ones.
GPU_QUICK = dict(
    presets=["mnist"],
    sections=["train", "sample"],
    dtypes=["bfloat16", "float32"],
    samplers=["dpmpp2m", "ddim", "ddpm"],
    repeats=3,
    ddpm_steps=1000,
    train_batch_sizes="mnist,mnist_gpu",  # their batch sizes (128, 512), read from the presets
    sample_batch_sizes=[1, 1000],
    run_budget_s=5.0,
    guided_only=True,
    budget_s=150.0,
)

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
    """Shows defaults (per profile for the flags a profile sets; none for other None/False
    defaults, whose help says them), and keeps the epilog's line breaks."""

    def _get_help_string(self, action):
        name = action.dest
        if name in DEFAULTS:
            quick, gpu = (f.get(name, DEFAULTS[name]) for f in (QUICK, GPU_QUICK))
            return f"{action.help} (default {DEFAULTS[name]}; --quick {quick}; --gpu_quick {gpu})"
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
    _add_general_flags(p)
    _add_training_flags(p.add_argument_group("training"))
    _add_sampling_flags(p.add_argument_group("sampling"))
    _add_output_flags(p.add_argument_group("timing and output"))
    return p


def _add_general_flags(p) -> None:
    p.add_argument(
        "--presets",
        "--preset",
        type=_names,
        default=None,
        help="comma-separated config presets to benchmark (names of diffusion_jax.config.PRESETS)",
    )
    p.add_argument(
        "--sections",
        type=_str_list(SECTIONS),
        default=None,
        help="which sections to run, in this order (the compile-time table covers whatever ran)",
    )
    profile = p.add_mutually_exclusive_group()
    for flag, values, what in (
        ("--quick", QUICK, "smaller defaults for a smoke run"),
        ("--gpu_quick", GPU_QUICK, "the rows worth having from about 3 minutes of one GPU"),
    ):
        settings = ", ".join(f"{k}={v}" for k, v in values.items())
        profile.add_argument(flag, action="store_true", help=f"{what}: {settings} (explicit "
                             "flags still win, e.g. --presets tiny on a CPU)")  # fmt: skip
    p.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="wall-time budget in seconds, counted from the start (compiles included): once it "
        "is spent no new row starts (a started row finishes) and the rows not run are listed; "
        "0 = none",
    )


def _add_training_flags(g) -> None:
    g.add_argument("--train_batch_sizes", type=_int_list, help="training batch sizes, in order")
    g.add_argument(
        "--dtypes",
        type=_str_list(DTYPES),
        default=None,
        help="activation dtypes for training, in this order (the bf16/f32 ratio needs both) ",
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


def _add_sampling_flags(g) -> None:
    g.add_argument(
        "--sample_batch_sizes",
        type=_batch_list,
        default=None,
        help='sampling batch sizes; "max" = the largest that fits',
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
        help="steps of the ancestral chain (capped at the preset's num_timesteps)",
    )
    g.add_argument("--ddim_steps", type=int, default=50, help="steps of the DDIM chain")
    g.add_argument(
        "--dpmpp2m_steps", type=int, default=20, help="steps of the DPM-Solver++(2M) chain"
    )
    g.add_argument(
        "--samplers",
        type=_str_list(SAMPLERS),
        default=None,
        help="samplers of the sampling section, in this order ",
    )
    g.add_argument(
        "--guided_only",
        action="store_const",
        const=True,
        default=None,
        help="sampling rows with guidance only (no w = 0 rows)",
    )
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
        default=None,
        help="a sampler run expected to take longer than this (extrapolated from the previous "
        "batch size) is timed on a shorter chain of the same kind and scaled to the full one ",
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
        help="lax.scan unroll factors to compare",
    )
    g.add_argument(
        "--unroll_batch_size", type=int, default=16, help="batch size of the unroll comparison"
    )


def _add_output_flags(g) -> None:
    g.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per measurement; the median is reported",
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


def parse_args(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    from diffusion_jax import config as config_lib  # (imports jax: not needed for --help)

    unknown = [p for p in args.presets or () if p not in config_lib.PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {tuple(config_lib.PRESETS)}")
    profile = GPU_QUICK if args.gpu_quick else QUICK if args.quick else {}
    for name in DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, profile.get(name, DEFAULTS[name]))
    if isinstance(args.train_batch_sizes, str):  # presets named: their batch sizes
        names = args.train_batch_sizes.split(",")
        args.train_batch_sizes = sorted({config_lib.get_config(n).batch_size for n in names})
    if args.budget_s < 0 or args.run_budget_s <= 0:
        parser.error("--budget_s must be >= 0 (0: no budget) and --run_budget_s > 0")
    args.budget_s = args.budget_s or None
    for name in POSITIVE:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0 or (args.steps_per_dispatch or 1) < 1:
        parser.error("--warmup must be >= 0 and --steps_per_dispatch >= 1")
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


# ---------------------------------------------------------------- report


def report_header(args, argv) -> str:
    """The shared header (date, machine, versions, command) and every setting of this run."""
    import jax

    lines = header("diffusion_jax benchmarks", argv, ("jax", "jaxlib", "flax", "optax"))
    peaks = {d: peak_for(d, args.peak_tflops)[1] for d in ("float32", "bfloat16")}
    lines += [
        f"- settings: presets {args.presets}, sections {args.sections}, repeats {args.repeats} "
        f"(median reported) after {args.warmup} warm-up run(s), seed {args.seed}"
        + (", --quick" if args.quick else "")
        + (", --gpu_quick" if args.gpu_quick else "")
        + (
            f"; no row starts after {args.budget_s:g} s (--budget_s)"
            if args.budget_s
            else "; no time budget"
        ),
        f"- training: batch sizes {args.train_batch_sizes}, dtypes {args.dtypes}, steps per "
        + (
            "dispatch: each preset's own"
            if args.steps_per_dispatch is None
            else f"dispatch {args.steps_per_dispatch}"
        )
        + f", {args.num_examples} synthetic examples",
        f"- sampling: {args.samplers}: ancestral {args.ddpm_steps} steps, DDIM "
        f"{args.ddim_steps}, DPM-Solver++(2M) {args.dpmpp2m_steps} (capped at a preset's "
        f"num_timesteps), batch sizes {args.sample_batch_sizes}, guidance w = {args.guidance:g}"
        + (" only" if args.guided_only else " and 0")
        + f", denoiser dtypes {args.sample_dtypes}, run budget "
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
    elif args.peak_tflops is None and jax.devices()[0].platform == "gpu":
        lines.append(
            "- note: the f32 peak is the non-tensor-core rate; XLA may run float32 convolutions "
            "and matmuls on TF32 tensor cores, so f32 runs can exceed 100%"
        )
    return "\n".join(lines)


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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    start = time.monotonic()  # the budget counts from here: imports, set-up and compiles
    # Ctrl-C / SIGINT ends the run with the rows measured written, even where the shell started
    # it in the background with SIGINT ignored (as gpu_check's stop signal relies on).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    report = Report(args.budget_s, start)
    report.add(report_header(args, argv))
    interrupted = False
    samplings: list = []

    def sampling(fn):
        """``fn(args, report, samplings)``, the denoisers made on first use (a compile each)."""
        if not samplings:
            samplings.extend(make_sampling(p, d) for p in args.presets for d in args.sample_dtypes)
        return fn(args, report, samplings)

    sections = {
        "train": ("Training throughput", train_section, args, report),
        "sample": ("Sampling throughput", sampling, sampling_section),
        "loop": ("Python loop vs lax.scan", sampling, loop_section),
        "unroll": ("lax.scan unroll", sampling, unroll_section),
    }
    try:
        for name in args.sections:  # in the order given: --sections sample,train samples first
            run_section(report, *sections[name])
        run_section(report, "Compile times", compile_section, report)
    except KeyboardInterrupt:
        interrupted = True
        report.add("**Interrupted: the results above are incomplete.**")
    if report.failed:
        report.add(f"**Failed sections:** {', '.join(report.failed)} (see the notes above)")
    report.add(report.budget_note())
    if args.out:
        write_output(args.out, report.markdown(), args.overwrite)
    return 130 if interrupted else (1 if report.failed else 0)


if __name__ == "__main__":
    sys.exit(main())
