"""Sample from a trained checkpoint: a class-ordered grid, a GIF of the reverse chain, an .npz.

    python sample.py --workdir runs/cpu                          # 8 per class, the run's defaults
    python sample.py --workdir runs/cpu --labels 3,3,7 --w 2 --sampler ddim --steps 50
    python sample.py --workdir runs/cpu/checkpoints/3000 --per_class 4 --out out/step3000
    python sample.py --workdir runs/toy2d --steps 20             # toy2d: full vs few-step scatter
    python sample.py --workdir runs/cpu --morph 0,1,2 --frames 8 # one digit morphing into the next
    python sample.py --workdir runs/cpu --inpaint top            # fill the bottom half of digits
    python sample.py --workdir runs/cpu --interpolate 7          # 7s from interpolated noises

Labels are 0..9; 10 means unconditional. Existing outputs are kept unless --overwrite is given.
"""

from __future__ import annotations

from diffusion_jax import cli
from diffusion_jax.commands import errors, flags


def main(argv=None, prog: str = "sample.py") -> int:
    parser = cli.command_parser(prog, __doc__)
    parser.add_argument(
        "--workdir",
        required=True,
        help="a training workdir, or one checkpoint folder (WORKDIR/checkpoints/STEP)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--labels",
        type=cli.list_type(int, name="--labels", example="3,3,7"),
        help="e.g. 3,3,7 (10 = unconditional)",
    )
    which.add_argument(
        "--per_class",
        type=int,
        default=None,
        help="samples per class (default 8; 400 for 2-D data)",
    )
    parser.add_argument("--w", type=float, default=None, help="guidance weight (default: config)")
    flags.add_solver_flags(
        parser,
        "default dpmpp2m, 20 steps: DDIM-50's quality in 20 network calls, docs/RESULTS.md; "
        "ddpm for --inpaint",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="samples drawn at once, to bound memory (default 1000); more samples are drawn in "
        "chunks, and then depend on the seed and this number",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="GIF frames of the reverse chain (default 20); with --morph, frames per "
        "transition (default 8); with --interpolate, samples in the strip (default 8)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/samples)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    modes = parser.add_argument_group(
        "what a trained model can do (instead of a grid of samples)"
    ).add_mutually_exclusive_group()
    modes.add_argument(
        "--morph",
        nargs="?",
        const="0,1,2,3,4,5,6,7,8,9",
        type=cli.list_type(int, name="--morph", example="0,1,2"),
        metavar="LABELS",
        help="morph each class into the next under one noise (default 0,1,...,9): a GIF and a grid",
    )
    modes.add_argument(
        "--interpolate",
        type=int,
        metavar="LABEL",
        help="a strip of one class's samples from noises interpolated on the sphere",
    )
    modes.add_argument(
        "--inpaint",
        metavar="MASK",
        help="fill the hidden part of images: top, bottom, left, right, centre, random (the "
        "part kept), or an .npy/.npz mask file (1 = known); writes original | masked | filled",
    )
    parser.add_argument(
        "--images",
        help="with --inpaint: an .npz (samples or images, labels optional) or .npy of images to "
        "inpaint (default: --per_class test images of the run's data set, one of each class in "
        "turn, default 10)",
    )
    parser.add_argument(
        "--resample", type=int, default=10, help="with --inpaint: RePaint repeats per step"
    )
    flags.add_sampler_flags(parser)
    args = parser.parse_args(argv)
    # flags the chosen mode would ignore are usage errors, before any checkpoint is read
    if args.morph is not None:
        for flag in ("labels", "per_class"):
            if getattr(args, flag) is not None:
                parser.error(
                    f"--{flag} has no effect with --morph (it morphs the LABELS given "
                    "to --morph); drop it"
                )
    if args.images is not None and args.inpaint is None:
        parser.error("--images is only read with --inpaint MASK; add --inpaint or drop --images")
    cli.setup_logging()

    from diffusion_jax import checkpoints, generation, visuals
    from diffusion_jax import config as config_lib
    from diffusion_jax.solvers import RECOMMENDED

    with errors.clean_errors(prog):
        # the numbers that need no checkpoint are checked before one is read
        if args.w is not None:
            config_lib.check_float("--w", args.w, 0.0)
        config_lib.check_seed(args.seed, "--seed")
        flags.plan_options(args)
        if args.per_class is not None:
            config_lib.check_int("--per_class", args.per_class, 1, config_lib.INT_MAX)
        if args.batch_size is not None:
            if args.morph is not None or args.interpolate is not None or args.inpaint is not None:
                raise ValueError("--batch_size applies to plain sampling only; drop it")
            config_lib.check_int("--batch_size", args.batch_size, 1, config_lib.INT_MAX)
        if args.inpaint is not None and args.sampler not in (None, "ddpm"):
            raise ValueError("--inpaint uses ancestral steps (RePaint); drop --sampler")
        # a distillation run's folder: --steps picks the round (its student)
        workdir = checkpoints.student_path(args.workdir, args.steps)
        config = checkpoints.read_config(workdir)[0]
        student = checkpoints.read_student(workdir)
        common = dict(seed=args.seed, out=args.out, overwrite=args.overwrite)
        if args.morph is not None or args.interpolate is not None:
            plan = flags.sampling_plan(args, config, solver="dpmpp2m", student=student)
            frames = 8 if args.frames is None else args.frames
            if args.morph is not None:
                visuals.morph_to_files(workdir, args.morph, plan, frames=frames, **common)
            else:
                visuals.interpolate_to_files(
                    workdir, args.interpolate, plan, frames=frames, **common
                )
            return 0
        if args.inpaint is not None:
            if student is not None:
                raise ValueError(
                    "--inpaint needs ancestral steps (RePaint), which a distilled "
                    "student cannot take: inpaint with its teacher"
                )
            steps = visuals.inpaint_steps(config.num_timesteps)
            visuals.inpaint_to_files(
                workdir,
                args.inpaint,
                flags.sampling_plan(args, config, solver="ddpm", steps=steps),
                images_path=args.images,
                count=10 if args.per_class is None else args.per_class,
                resample=args.resample,
                **common,
            )
            return 0
        generation.sample_to_files(
            workdir,
            flags.sampling_plan(args, config, solver=RECOMMENDED, student=student),
            labels=args.labels,
            per_class=args.per_class,
            frames=20 if args.frames is None else args.frames,
            batch_size=args.batch_size or generation.BATCH_SIZE,
            **common,
        )
    return 0


def run(prog: str = "diffusion-sample") -> None:
    """The console entry point (``diffusion-sample``; ``python sample.py`` calls it too)."""
    cli.run_command(main, prog)


if __name__ == "__main__":  # python -m diffusion_jax.commands.sample
    run()
