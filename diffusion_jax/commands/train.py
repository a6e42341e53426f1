"""Train (or resume) a guided diffusion model.

    python train.py --workdir runs/mnist                     # the GPU default preset
    python train.py --workdir runs/cpu --preset cpu          # a short CPU run on offline data
    python train.py --workdir runs/cpu                       # resume it (config read from the run)
    python train.py --workdir runs/x --preset mnist --lr 1e-4 --num_steps 50000

Every config field is a flag (``--help`` lists them). Ctrl-C or SIGTERM writes a checkpoint first.
On several hosts, start the same command on each with ``--distributed`` (see README.md).
"""

from __future__ import annotations

import os

from diffusion_jax import cli
from diffusion_jax.commands import errors, flags


def main(argv=None, prog: str = "train.py") -> int:
    from diffusion_jax import config as config_lib
    from diffusion_jax import sharding, training, workdir

    parser = cli.command_parser(prog, __doc__)
    parser.add_argument("--workdir", required=True, help="folder of the run (created if missing)")
    parser.add_argument(
        "--allow_config_change",
        action="store_true",
        help="resume even though the requested config changes the training maths",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no_tensorboard",
        action="store_true",
        help="do not write WORKDIR/tensorboard (the metrics are in WORKDIR/metrics.jsonl)",
    )
    config_lib.add_config_flags(parser)
    flags.add_distributed_flags(parser)
    args = parser.parse_args(argv)
    cli.setup_logging()
    with errors.clean_errors(prog):
        overrides = config_lib.config_overrides(args)
        config_lib.check_overrides(overrides)  # before the workdir is made
        workdir.check_creatable(args.workdir)
        flags.start_distributed(args)
        result = training.train(
            args.workdir,
            preset=args.preset,
            overrides=overrides,
            allow_config_change=args.allow_config_change,
            progress=not args.no_progress,
            tensorboard=not args.no_tensorboard,
        )
        step = int(result.state.step)
        if not sharding.is_main_process():
            return 130 if result.interrupted else 0
        if result.interrupted:
            print(f"interrupted at step {step}; run the same command again to resume")
            return 130
        print(f"done: {step} steps, checkpoints in {os.path.join(args.workdir, 'checkpoints')}")
    return 0


def run(prog: str = "diffusion-train") -> None:
    """The console entry point (``diffusion-train``; ``python train.py`` calls it too)."""
    cli.run_command(main, prog)


if __name__ == "__main__":  # python -m diffusion_jax.commands.train
    run()
