"""Sample quality against CPU-minutes: train configurations for one wall-clock budget each, then
evaluate their checkpoints with the project's evaluator and draw every run on one plot.

Each run is a preset with overrides. Its step count is sized to the budget from a speed probe
(a few timed train steps after compilation), so the learning-rate schedule ends where the budget
does, as it would in a run sized for that budget. Checkpoints are kept at ``--evals`` equal
intervals and evaluated after training (evaluation time is not charged to the budget): samples
with ``--sampler`` at guidance ``--w``, ``--per_class`` per class, metrics from
:func:`diffusion_jax.evaluation.evaluate_images` (Frechet distance in the classifier's features
over the real-data floor, conditional accuracy, classifier Inception Score).

CPU-minutes are wall minutes from the start of a run (data loading and compilation included)
times the cores the process may use (``os.sched_getaffinity``), so runs pinned to one core with
``taskset -c N`` compare fairly with runs on two, and two runs can share a 2-core machine
without spoiling each other's figures:

    JAX_PLATFORMS=cpu taskset -c 0 python benchmarks/quality_vs_time.py --root runs/qvt \\
        --budget_minutes 10 --run "baseline" --run "patch2: patch_size=2 channels=32 \\
        channel_mults=1,2" --report docs/qvt.md --plot docs/images/qvt.png

A run that already exists under ``--root`` is resumed or reused, and evaluations already made
are read back from ``ROOT/NAME.quality.json``; a rerun with one more ``--run`` adds only that run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):
    # Run as a file (python benchmarks/NAME.py), Python puts benchmarks/ on sys.path, not the
    # repository root; the root makes `benchmarks` (and diffusion_jax) importable either way.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    cores,
    finish_report,
    header,
    md_table,
    median_seconds,
    script_parser,
)
from benchmarks.workloads import RunSpec, step_runner  # noqa: E402


def probe_steps_per_second(config, dataset, num_steps: int = 8) -> float:
    """Median speed of single optimizer steps of ``config`` after compilation and warm-up."""
    run, _ = step_runner(config, dataset)
    seconds, _ = median_seconds(run, num_steps, warmup=2)  # the first call compiles
    return 1.0 / seconds


def train_run(spec: RunSpec, root: str, budget_minutes: float, evals: int) -> dict:
    """Train (or resume) one run for the budget; returns its record (also in ROOT/NAME.json)."""
    from diffusion_jax import config as config_lib
    from diffusion_jax import datasets, training

    workdir = os.path.join(root, spec.name)
    record_path = os.path.join(root, f"{spec.name}.json")
    config = config_lib.get_config(spec.preset, **spec.overrides)
    # The resolved config, not only the overrides: a preset that changed since the run was
    # trained must not pass off the old run's results as its own.
    resolved = config_lib.to_dict(config)
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("config") != resolved:
            raise ValueError(
                f"{workdir} was trained with another configuration than {spec.name!r} now "
                "resolves to (a different --run or a changed preset); give the run another name "
                "or another --root"
            )
    else:
        dataset = datasets.load_dataset(config)
        rate = probe_steps_per_second(config, dataset)
        num_steps = max(evals, int(budget_minutes * 60 * rate) // evals * evals)
        record = {
            "spec": dataclasses.asdict(spec),
            "config": resolved,
            "budget_minutes": budget_minutes,
            "probe_steps_per_s": rate,
            "num_steps": num_steps,
            "cores": cores(),
        }
        os.makedirs(root, exist_ok=True)
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
    every = record["num_steps"] // evals
    overrides = dict(
        spec.overrides,
        num_steps=record["num_steps"],
        checkpoint_every=every,
        keep_every=every,
        log_every=every,
        sample_every=0,
    )
    if "train_seconds" not in record:
        print(f"{spec.name}: {record['num_steps']} steps ({record['probe_steps_per_s']:.2f}/s)")
        start = time.time()
        result = training.train(
            workdir, preset=spec.preset, overrides=overrides, progress=False, tensorboard=False
        )
        if result.interrupted:
            raise KeyboardInterrupt(f"{spec.name} was interrupted; rerun to resume it")
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        # seconds from the start of the run (loading and compiling included) to each checkpoint
        record["train_seconds"] = {str(r["step"]): r["time"] - start for r in rows}
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
    return record


def evaluate_run(spec: RunSpec, root: str, record: dict, args) -> list[dict]:
    """Quality of every kept checkpoint of one run (cached in quality.json by step and setting)."""
    import jax

    from diffusion_jax import classifier as classifier_lib
    from diffusion_jax import datasets, evaluation, generation

    workdir = os.path.join(root, spec.name)
    cache_path = os.path.join(root, f"{spec.name}.quality.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    # the classifier recipe too: a figure measured with another yardstick is not reused
    setting = (
        f"{args.sampler}|w={args.w:g}|per_class={args.per_class}|seed={args.seed}"
        f"|classifier=r{classifier_lib.RECIPE}"
    )
    rows = []
    for step_text, seconds in sorted(record["train_seconds"].items(), key=lambda kv: int(kv[0])):
        key = f"{step_text}|{setting}"
        if key not in cache:
            path = os.path.join(workdir, "checkpoints", step_text)
            config, model, params, shape, step, _ = generation.load_for_sampling(path)
            dataset = datasets.load_dataset(config)
            clf = classifier_lib.get_classifier(dataset, args.classifier_dir)
            reference = _reference(clf, dataset)
            labels = np.repeat(np.arange(config.num_classes), args.per_class)
            method, _, k = args.sampler.partition(":")
            out = generation.generate(
                config,
                model,
                params,
                shape,
                labels,
                jax.random.PRNGKey(args.seed),
                dict(solver=method, steps=int(k) if k else None, w=args.w),
            )
            row = evaluation.evaluate_images(reference, np.asarray(out.samples), labels)
            cache[key] = {k: row[k] for k in ("fd", "floor_fd", "accuracy", "is", "real_is", "n")}
            with open(cache_path, "w") as f:
                json.dump(cache, f, indent=1)
            print(f"{spec.name} step {step_text}: {cache[key]}")
        cpu_minutes = seconds / 60 * record["cores"]
        rows.append(dict(cache[key], run=spec.name, step=int(step_text), cpu_minutes=cpu_minutes))
    return rows


_REFERENCES: dict = {}


def _reference(clf, dataset):
    from diffusion_jax import evaluation

    if dataset.name not in _REFERENCES:
        _REFERENCES[dataset.name] = evaluation.Reference(clf, dataset)
    return _REFERENCES[dataset.name]


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in dict.fromkeys(r["run"] for r in rows):
        run = [r for r in rows if r["run"] == name]
        minutes = [r["cpu_minutes"] for r in run]
        axes[0].plot(minutes, [r["accuracy"] for r in run], "o-", label=name)
        axes[1].plot(minutes, [r["fd"] / r["floor_fd"] for r in run], "o-", label=name)
    axes[0].set_ylabel("conditional accuracy")
    axes[1].set_ylabel("FD / real-data floor")
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[1].yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    for ax in axes:
        ax.set_xlabel("CPU-minutes (wall minutes x cores)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(rows, records, specs, args, argv) -> list[str]:
    lines = header("Sample quality against CPU-minutes", argv) + [
        f"- evaluation: {args.sampler}, w = {args.w:g}, {args.per_class} samples per class, "
        f"seed {args.seed}; FD over the floor of real train vs real test images of the same count",
        "",
    ]
    table = []
    for spec in specs:
        rec = records[spec.name]
        table.append(
            [
                spec.name,
                spec.preset,
                spec.describe_overrides(),
                rec["cores"],
                f"{rec['probe_steps_per_s']:.2f}",
                rec["num_steps"],
            ]
        )
    lines += [
        md_table(["run", "preset", "overrides", "cores", "probe steps/s", "steps"], table),
        "",
    ]
    lines.append(
        md_table(
            ["run", "step", "CPU-min", "FD", "floor", "FD/floor", "accuracy", "IS", "IS real"],
            [
                [
                    r["run"],
                    r["step"],
                    f"{r['cpu_minutes']:.1f}",
                    f"{r['fd']:.2f}",
                    f"{r['floor_fd']:.2f}",
                    f"{r['fd'] / r['floor_fd']:.2f}",
                    f"{r['accuracy']:.3f}",
                    f"{r['is']:.2f}",
                    f"{r['real_is']:.2f}",
                ]
                for r in rows
            ],
        )
    )
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = script_parser(__doc__)
    parser.add_argument("--root", required=True, help="folder of the runs (one subfolder each)")
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        help="'NAME: key=value ...' (config fields; preset=P); repeat for each configuration",
    )
    parser.add_argument("--preset", default="cpu", help="preset of runs that name none")
    parser.add_argument("--budget_minutes", type=float, required=True, help="wall minutes a run")
    parser.add_argument("--evals", type=int, default=3, help="checkpoints evaluated per run")
    parser.add_argument("--sampler", default="ddim:50", help="SAMPLER:STEPS of the evaluation")
    parser.add_argument("--w", type=float, default=1.0, help="guidance weight of the evaluation")
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier_dir", default=None)
    parser.add_argument("--report", help="markdown report to write (never overwritten)")
    parser.add_argument("--plot", help="PNG to write (never overwritten)")
    args = parser.parse_args(argv)
    if not args.budget_minutes > 0 or args.evals < 1 or args.per_class < 1:
        parser.error("--budget_minutes must be > 0, --evals and --per_class >= 1")
    for path in (args.report, args.plot):
        if path and os.path.exists(path):
            parser.error(f"{path} exists; choose another name (outputs are never overwritten)")
    try:
        specs = [RunSpec.parse(text, args.preset) for text in args.run]
    except ValueError as e:
        parser.error(str(e))
    if len({s.name for s in specs}) != len(specs):
        parser.error("two --run share a name")

    from diffusion_jax import cli

    cli.setup_logging()  # the library's messages (resumes, classifier) as the commands show them
    records, rows = {}, []
    for spec in specs:
        records[spec.name] = train_run(spec, args.root, args.budget_minutes, args.evals)
    for spec in specs:
        rows += evaluate_run(spec, args.root, records[spec.name], args)
    finish_report(report(rows, records, specs, args, argv), args.report)
    if args.plot:
        plot(rows, args.plot, f"mnist5k, {args.sampler}, w = {args.w:g}, {args.per_class}/class")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
