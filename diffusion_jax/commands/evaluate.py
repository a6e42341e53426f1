"""Measure sample quality with the project's own digit classifier.

    python evaluate.py --workdir runs/mnist                         # default sweeps
    python evaluate.py --workdir runs/cpu --w 0,1,2 --samplers ddim:50,ddim:10 --per_class 100
    python evaluate.py --workdir runs/cpu --npz SAMPLES.npz          # samples from sample.py
    python evaluate.py --workdir runs/distill --guidance_sampler distilled:4 \
        --samplers distilled:1,distilled:2,distilled:4   # a distill.py run: its students

Writes results.md, results.json and three plots (FD vs IS by w, accuracy vs w, FD vs NFE) to
--out (default WORKDIR/eval). The classifier is trained on the run's data set on first use and
cached (DIFFUSION_JAX_CACHE, default ~/.cache/diffusion_jax).
"""

from __future__ import annotations

import argparse
import os

from diffusion_jax import cli
from diffusion_jax.commands import errors, flags


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to each flag's help, unless the help already names its default or
    there is none to show (None, a switch's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default is False
        if quiet or action.default == argparse.SUPPRESS or "(default" in text:
            return text
        return f"{text} (default: %(default)s)"


def main(argv=None, prog: str = "evaluate.py") -> int:
    parser = cli.command_parser(prog, __doc__)
    parser.formatter_class = _DefaultsFormatter
    parser.add_argument("--workdir", required=True, help="training run (or checkpoint folder)")
    parser.add_argument("--npz", help="evaluate these samples (from sample.py) instead of sweeping")
    parser.add_argument("--w", default="0,0.5,1,2,4", help="guidance weights to sweep")
    parser.add_argument(
        "--samplers",
        default="ddpm,ddim:100,ddim:50,ddim:20,ddim:10,dpmpp2m:20,dpmpp2m:15,dpmpp2m:10",
        help="SAMPLER[:STEPS] list for the step sweep, drawn as FD against network calls "
        "(a name alone = its default steps: all T for ddpm)",
    )
    parser.add_argument(
        "--guidance_sampler", default="ddim:50", help="the sampler of the guidance sweep"
    )
    parser.add_argument(
        "--steps_w",
        type=float,
        default=None,
        help="guidance weight of the step sweep (default: the run's config)",
    )
    parser.add_argument("--per_class", type=int, default=100, help="samples per class")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the samples")
    parser.add_argument("--batch_size", type=int, default=1000, help="samples per sampler call")
    parser.add_argument(
        "--classifier_dir",
        default=None,
        help="classifier cache folder (default: a folder per data set under "
        "$DIFFUSION_JAX_CACHE, or ~/.cache/diffusion_jax)",
    )
    parser.add_argument(
        "--classifier_epochs",
        type=int,
        default=None,
        help="epochs when the classifier is first trained (default: about 700 steps, at "
        "least 6 epochs)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/eval)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    flags.add_sampler_flags(parser)
    args = parser.parse_args(argv)
    cli.setup_logging()

    from diffusion_jax import checkpoints, evaluation, plans, solvers
    from diffusion_jax import config as config_lib

    with errors.clean_errors(prog):
        # every number is checked before any checkpoint, data or classifier is read
        ws = [
            config_lib.check_float("--w", w, 0.0)
            for w in cli.parse_list(args.w, float, name="--w", example="0,0.5,1")
        ]
        if args.steps_w is not None:
            config_lib.check_float("--steps_w", args.steps_w, 0.0)
        config_lib.check_int("--per_class", args.per_class, 1, config_lib.INT_MAX)
        config_lib.check_int("--batch_size", args.batch_size, 1, config_lib.INT_MAX)
        config_lib.check_seed(args.seed, "--seed")
        if args.classifier_epochs is not None:
            config_lib.check_int(
                "--classifier_epochs", args.classifier_epochs, 1, config_lib.INT_MAX
            )
        options = flags.plan_options(args)
        if args.npz:
            config, _ = checkpoints.read_config(args.workdir)
            row = evaluation.evaluate_npz(
                args.npz,
                config,
                classifier_dir=args.classifier_dir,
                classifier_epochs=args.classifier_epochs,
            )
            print(evaluation.to_json(row))
            return 0
        config, _ = checkpoints.read_config(args.workdir)
        T = config.num_timesteps
        distilled = checkpoints.student_path(args.workdir) != args.workdir
        home = args.workdir if distilled else os.path.dirname(checkpoints.resolve(args.workdir)[0])
        out = args.out or os.path.join(home, "eval")
        guidance = evaluation.parse_samplers(args.guidance_sampler, T)[0]
        steps_w = config.guidance if args.steps_w is None else args.steps_w

        def plan(spec, w):  # each run's plan, resolved once
            student = None  # a distillation run: the record of the student of spec.steps
            if solvers.get(spec.solver).student:
                path = checkpoints.student_path(args.workdir, spec.steps)
                student = checkpoints.read_student(path)
            return plans.resolve(
                config, solver=spec.solver, steps=spec.steps, w=w, student=student, **options
            )

        evaluation.sweep(
            args.workdir,
            [plan(guidance, w) for w in ws],
            [plan(spec, steps_w) for spec in evaluation.parse_samplers(args.samplers, T)],
            per_class=args.per_class,
            seed=args.seed,
            out=out,
            classifier_dir=args.classifier_dir,
            classifier_epochs=args.classifier_epochs,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    return 0


def run(prog: str = "diffusion-evaluate") -> None:
    """The console entry point (``diffusion-evaluate``; ``python evaluate.py`` calls it too)."""
    cli.run_command(main, prog)


if __name__ == "__main__":  # python -m diffusion_jax.commands.evaluate
    run()
