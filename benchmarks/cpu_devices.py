r"""The CPU's cores as jax devices: seconds per 1,000 samples of distilled students, and per
optimiser step of training and of distillation, with the CPU shown to jax as one device (jax's
default) and as several (``cli.use_cpu_cores``, what the commands do), side by side.

XLA runs one CPU device's small convolutions on about one core; shown as several devices, the
CPU gets the data-parallel mesh of sampling, training and distillation, which splits each batch
over the cores. Each device count runs in a process of its own (jax fixes the count when it
starts): this script starts one per count and joins their rows. Sampling rows time
``generation.generate`` after compiling (``Timing.sample_s``, the median of --repeats runs);
the training row is one optimiser step of the teacher's config on synthetic data (median of
--repeats); the distillation row is round 0 (the guided teacher: two teacher calls per teacher
step) on synthetic data, averaged over --distill_steps steps after the first.

  # the shipped students, their teacher's training and distillation, 1 and 2 devices
  python benchmarks/cpu_devices.py --out docs/cpu_devices_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import finish_report, fmt, header, md_table, script_parser  # noqa: E402
from diffusion_jax import cli  # noqa: E402  (imports no jax)


def parse_args(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("--students", default="pretrained/mnist5k_cpu_distilled",
                        help="a distillation run (distill.py's workdir) whose students are timed")
    parser.add_argument("--steps", type=cli.list_type(int, name="--steps", minimum=1),
                        default=[1, 2, 4], help="the students timed, by steps")
    parser.add_argument("--batch_sizes", type=cli.list_type(int, name="--batch_sizes", minimum=1),
                        default=[64, 1000], help="sampling batch sizes")
    parser.add_argument("--samples", type=int, default=1000, help="samples per timed run")
    parser.add_argument("--w", type=float, default=0.5, help="guidance weight of the samples")
    parser.add_argument("--devices", type=cli.list_type(int, name="--devices", minimum=1),
                        default=None,
                        help="device counts compared (default: 1 and the commands' count)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row")
    parser.add_argument("--train_steps", type=int, default=10,
                        help="timed training steps (0: no training row)")
    parser.add_argument("--distill_steps", type=int, default=30,
                        help="distillation steps of round 0 (0: no distillation row)")
    parser.add_argument("--out", default=None, help="also write the report here (never replaced)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # (a JSON to write)
    args = parser.parse_args(argv)
    if args.devices is None:
        args.devices = sorted({1, cli.cpu_device_count({})})
    if args.samples < 1 or args.repeats < 1 or min(args.train_steps, args.distill_steps) < 0:
        parser.error("--samples and --repeats must be >= 1, --train_steps and "
                     "--distill_steps >= 0")
    if args.out and not args.child and os.path.exists(args.out):
        parser.error(f"--out {args.out} exists: it is never replaced; choose another path")
    return args


def measure(args) -> list[dict]:
    """The rows of this process (its device count fixed by its XLA_FLAGS)."""
    import jax
    import numpy as np

    from diffusion_jax import generation, plans

    rows = []
    for steps in args.steps:
        ckpt = generation.load_for_sampling(args.students, steps)
        plan = plans.for_checkpoint(ckpt, {"w": args.w, "steps": steps})
        labels = np.arange(args.samples) % ckpt.config.num_classes
        for batch in args.batch_sizes:
            times = []
            for r in range(args.repeats):
                result = generation.generate(
                    *ckpt[:4], labels, jax.random.PRNGKey(r), plan, batch_size=batch, timed=True
                )
                times.append(result.timing.sample_s)
            rows.append(dict(what=f"sample, {steps}-step student, batch {batch}",
                             unit=f"s per {args.samples} samples", value=float(np.median(times))))
    teacher = _teacher(args.students)
    if args.train_steps:
        rows.append(dict(what="train step (teacher's config, synthetic data)", unit="s per step",
                         value=_train_step_s(teacher, args)))
    if args.distill_steps:
        rows.append(dict(what="distill step, round 0 (guided teacher, synthetic data)",
                         unit="s per step", value=_distill_step_s(teacher, args)))
    return rows


def _teacher(students: str) -> str:
    with open(os.path.join(students, "distill.json")) as f:
        return json.load(f)["teacher"]


def _train_step_s(teacher: str, args) -> float:
    from benchmarks.common import median_seconds
    from benchmarks.workloads import data_shape, step_runner, synthetic_dataset
    from diffusion_jax import checkpoints

    config, _ = checkpoints.read_config(teacher)
    data = synthetic_dataset(config.num_classes, max(512, config.batch_size), data_shape(config))
    run, _ = step_runner(config, data)
    return median_seconds(run, args.train_steps, warmup=2)[0]


def _distill_step_s(teacher: str, args) -> float:
    from benchmarks.workloads import data_shape, synthetic_dataset
    from diffusion_jax import checkpoints, distill_rounds, distillation

    config, _ = checkpoints.read_config(teacher)
    data = synthetic_dataset(config.num_classes, 512, data_shape(config))
    n = args.distill_steps + 1  # the first step compiles; the log's average leaves it out
    settings = distillation.DistillSettings(
        rounds=1, start_steps=2, steps_per_round=n, log_every=n, checkpoint_every=n
    )
    with tempfile.TemporaryDirectory() as out:
        distill_rounds.distill(os.path.join(out, "run"), teacher, settings, dataset=data)
        with open(os.path.join(out, "run", "round_0", "metrics.jsonl")) as f:
            return json.loads(f.readlines()[-1])["s_per_step"]


def child_rows(args, devices: int, argv) -> list[dict]:
    """The rows measured by a fresh process that sees the CPU as ``devices`` devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", cli.CPU_DEVICES_ENV: str(devices)}
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env["XLA_FLAGS"] = flags
    cli.use_cpu_cores(env)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--child", f.name], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        if done.returncode:
            raise SystemExit(f"the {devices}-device run failed:\n{done.stdout[-3000:]}")
        return json.load(f)


def main(argv=None) -> str | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        cli.setup_logging(level=30)  # (the distillation's progress lines are not the report)
        import jax

        rows = measure(args)
        with open(args.child, "w") as f:
            json.dump({"devices": jax.device_count(), "rows": rows}, f)
        return None
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # (this process only writes the header)
    results = {}
    for n in args.devices:
        got = child_rows(args, n, argv)
        if got["devices"] != n:
            raise SystemExit(f"asked for {n} CPU devices, the run had {got['devices']}")
        results[n] = got["rows"]
        print(f"{n} device(s): done", flush=True)
    base = args.devices[0]
    headers = ["what", "unit", *(f"{n} device(s)" for n in args.devices),
               *(f"speed-up {n} vs {base}" for n in args.devices[1:])]
    table = []
    for i, row in enumerate(results[base]):
        values = [results[n][i]["value"] for n in args.devices]
        table.append([row["what"], row["unit"], *(fmt(v, ".3g") for v in values),
                      *(fmt(values[0] / v, ".2f") for v in values[1:])])
    # (the header's device line is this process's: the rows' device counts are the columns)
    lines = header("The CPU's cores as jax devices", argv)
    lines += [
        "",
        f"- students: `{args.students}` (w = {args.w}), their teacher "
        f"`{_teacher(args.students)}`",
        f"- each device count in its own process (`${cli.CPU_DEVICES_ENV}`); medians of "
        f"{args.repeats} timed runs after compiling", "", md_table(headers, table),
    ]
    return finish_report(lines, args.out)


if __name__ == "__main__":
    main()
