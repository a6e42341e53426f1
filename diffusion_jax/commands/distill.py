"""Distil a trained guided model into a few-step sampler (guided progressive distillation).

    python distill.py --teacher pretrained/mnist5k_cpu --workdir runs/distill  # 32 -> 1 step
    python distill.py --teacher pretrained/mnist5k_cpu --workdir runs/distill  # resume
    python sample.py --workdir runs/distill --steps 4                # the 4-step student

Each round halves the steps (32 -> 16 -> 8 -> 4 -> 2 -> 1); round r's student is in
WORKDIR/round_r. A student takes the guidance weight w as an input, so it samples any w in
[w_min, w_max] with one network call per step. --steps_per_round may give each round its own
length; a round not started yet may be given another one when resuming. Ctrl-C or SIGTERM
writes a checkpoint; the same command resumes. A WORKDIR holding another run (other teacher or
settings) is refused, never overwritten.
"""

from __future__ import annotations

import dataclasses

from diffusion_jax import cli
from diffusion_jax.commands import errors

# the DistillSettings fields that are flags, with their help
_HELP = {
    "start_steps": "the teacher's DDIM steps in round 0 (a multiple of 2**rounds)",
    "start_spacing": "where round 0's teacher steps go (every student walks a subset of them)",
    "rounds": "halvings: the last student takes start_steps / 2**rounds steps",
    "steps_per_round": "optimiser steps per round: one number, or one per round (e.g. "
    "1000,1000,1000,1000,3000 for a longer last round; rounds already started must keep theirs)",
    "w_min": "smallest guidance weight the student learns",
    "w_max": "largest guidance weight the student learns",
    "batch_size": "examples per optimiser step",
    "lr": "peak learning rate (warm-up, then cosine decay over each round)",
    "warmup_steps": "learning-rate warm-up steps of each round",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "largest global gradient norm",
    "ema_decay": "EMA decay of the students' parameters (the EMA is what is sampled)",
    "seed": "seed of every random draw",
    "checkpoint_every": "optimiser steps between checkpoints",
    "log_every": "optimiser steps between progress lines",
    "student_prediction": "what the students predict: eps, x0 or v ('' = the teacher's)",
}


def main(argv=None, prog: str = "distill.py") -> int:
    from diffusion_jax import distill_rounds, distillation, workdir
    from diffusion_jax.schedules import SPACINGS

    parser = cli.command_parser(prog, __doc__)
    parser.add_argument("--teacher", required=True, help="the teacher's workdir or checkpoint")
    parser.add_argument("--workdir", required=True, help="folder of the distillation run")
    defaults = distillation.DistillSettings()
    for field in dataclasses.fields(distillation.DistillSettings):
        if field.name in _HELP:
            value = getattr(defaults, field.name)
            parser.add_argument(
                f"--{field.name}",
                type=_round_lengths if field.name == "steps_per_round" else type(value),
                default=value,
                choices={
                    "student_prediction": ("", *distillation.STUDENT_PREDICTIONS),
                    "start_spacing": SPACINGS,
                }.get(field.name),
                help=f"{_HELP[field.name]} (default: {_shown(value)})",
            )
    parser.add_argument(
        "--no_clip_teacher",
        action="store_true",
        help="do not clip the teacher's x0 to [-1, 1] at each step (the samplers clip it)",
    )
    args = parser.parse_args(argv)
    cli.setup_logging()
    with errors.clean_errors(prog):
        settings = distillation.DistillSettings(
            **{k: getattr(args, k) for k in _HELP}, clip_teacher=not args.no_clip_teacher
        ).validate()
        workdir.check_creatable(args.workdir)
        result = distill_rounds.distill(args.workdir, args.teacher, settings)
        if result.interrupted:
            print(
                f"interrupted in round {result.rounds_done}; run the same command again to "
                "resume"
            )
            return 130
        print(f"done: {result.rounds_done} rounds; the last student is in {result.path}")
    return 0


def _shown(value) -> str:
    """A default as it would be typed: ``1000,1000,3000`` for a tuple."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def _round_lengths(text: str) -> int | tuple[int, ...]:
    """``--steps_per_round``: one length for every round, or a comma-separated one per round."""
    lengths = cli.list_type(int, name="--steps_per_round", example="1000 or 1000,1000,3000",
                            minimum=1)(text)
    return lengths[0] if len(lengths) == 1 and "," not in text else tuple(lengths)


def run(prog: str = "diffusion-distill") -> None:
    """The console entry point (``diffusion-distill``; ``python distill.py`` calls it too)."""
    cli.run_command(main, prog)


if __name__ == "__main__":  # python -m diffusion_jax.commands.distill
    run()
