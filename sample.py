"""Sample from a trained checkpoint: a class-ordered grid, a GIF of the reverse chain, an .npz.

    python sample.py --workdir runs/cpu                          # 8 per class, the run's defaults
    python sample.py --workdir runs/cpu --labels 3,3,7 --w 2 --sampler ddim --steps 50
    python sample.py --workdir runs/cpu/checkpoints/3000 --per_class 4 --out out/step3000
    python sample.py --workdir runs/toy2d --steps 20             # toy2d: full vs few-step scatter

Labels are 0..9; 10 means unconditional. Existing outputs are kept unless --overwrite is given.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from diffusion_jax import cli  # noqa: E402  (after the environment is set)
from diffusion_jax.solvers import METHODS  # noqa: E402


def parse_labels(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--labels takes comma-separated integers, got {text!r}"
        ) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        required=True,
        help="a training workdir, or one checkpoint folder (WORKDIR/checkpoints/STEP)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--labels", type=parse_labels, help="e.g. 3,3,7 (10 = unconditional)")
    which.add_argument(
        "--per_class",
        type=int,
        default=None,
        help="samples per class (default 8; 400 for 2-D data)",
    )
    parser.add_argument("--w", type=float, default=None, help="guidance weight (default: config)")
    parser.add_argument(
        "--sampler",
        choices=METHODS,
        default=None,
        help="the update rule (default: the run's config, e.g. ddim)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps = network calls, 1..T (default: the config's for its own sampler; "
        "else T for ddpm, 50 for ddim, 20 for dpmpp2m)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=20, help="GIF frames (snapshots)")
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/samples)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    cli.add_sampler_flags(parser)
    args = parser.parse_args(argv)

    from diffusion_jax import generation

    with cli.clean_errors("sample.py"):
        generation.sample_to_files(
            args.workdir,
            labels=args.labels,
            per_class=args.per_class,
            w=args.w,
            method=args.sampler,
            steps=args.steps,
            seed=args.seed,
            frames=args.frames,
            out=args.out,
            overwrite=args.overwrite,
            **cli.sampler_options(args),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
