"""The flags the commands share, and what they become: the sampling flags of sample.py and
evaluate.py (read into :class:`~diffusion_jax.plans.SamplingPlan` fields, the plan resolved once
per run) and the several-hosts flags of train.py. The library is imported when a flag is read,
not when this module is (``--help`` stays quick)."""

from __future__ import annotations

import argparse
import math

from diffusion_jax import cli

# The user-facing word for a solver (the update rule) is "sampler": --sampler, --samplers, the
# config's ``sampler`` field and the results' column; --solver is an alias.


def add_solver_flags(parser: argparse.ArgumentParser, default_help: str) -> None:
    """``--sampler`` (alias ``--solver``), ``--steps`` and ``--timesteps``: which solver, on which
    time grid."""
    from diffusion_jax.solvers import SOLVERS

    parser.add_argument(
        "--sampler",
        "--solver",
        dest="sampler",
        choices=tuple(SOLVERS),
        default=None,
        help=f"the solver, i.e. the update rule ({default_help})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps = network calls, 1..T (default: 20 for dpmpp2m, 50 for ddim, T "
        "for ddpm; the config's sample_steps if it names that sampler; a distilled student's "
        "own, and on a distill.py run's folder the round to sample)",
    )
    parser.add_argument(
        "--timesteps",
        type=cli.list_type(int, name="--timesteps", example="999,600,300,0", minimum=0),
        default=None,
        help="an explicit time grid instead of --steps/--spacing: training timesteps, "
        "decreasing, e.g. 999,600,300,0",
    )


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling options besides the solver and its steps (see
    :class:`~diffusion_jax.plans.SamplingPlan`); read them back with :func:`plan_options`."""
    from diffusion_jax.guidance import SCHEDULES
    from diffusion_jax.schedules import SPACINGS
    from diffusion_jax.solvers import THRESHOLD_QUANTILE, VARIANCES, X0_MODES

    group = parser.add_argument_group("sampler options")
    group.add_argument(
        "--spacing",
        choices=SPACINGS,
        default=None,
        help="where a shortened chain's steps go (default: the sampler's own: uniform for "
        "ddpm and ddim, logsnr for the multistep solvers; see the README)",
    )
    group.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    group.add_argument(
        "--variance", choices=VARIANCES, default="small", help="ancestral step variance"
    )
    group.add_argument(
        "--x0",
        choices=X0_MODES,
        default="clip",
        help="what is done to the predicted x0 at each step: clip to [-1, 1] (default), "
        "dynamic thresholding (Saharia et al. 2022; better for dpmpp2m at 10 steps or fewer, "
        "see docs/RESULTS.md) or nothing",
    )
    group.add_argument(
        "--threshold_quantile",
        type=float,
        default=THRESHOLD_QUANTILE,
        help=f"the quantile of |x0| used by --x0 threshold (default {THRESHOLD_QUANTILE})",
    )
    group.add_argument(
        "--guidance_interval",
        type=cli.list_type(int, name="--guidance_interval", example="200,800", minimum=0),
        default=None,
        metavar="LO,HI",
        help="guide only at training timesteps LO..HI (Kynkaanniemi et al. 2024; default: "
        "every step)",
    )
    group.add_argument(
        "--guidance_schedule",
        choices=SCHEDULES,
        default="constant",
        help="how the guidance weight changes with t: constant (default), linear = "
        "2w(1 - t/(T-1)) (rising towards the data), reverse_linear = 2w t/(T-1)",
    )


def plan_options(args) -> dict:
    """The :class:`~diffusion_jax.plans.SamplingPlan` fields that :func:`add_sampler_flags`
    set, checked (ValueError naming the flag)."""
    if not math.isfinite(args.eta) or not 0 <= args.eta <= 1:
        # DDIM's eta above 1 asks for more noise than the posterior has (1 = ancestral's)
        raise ValueError(f"--eta must be a finite number in [0, 1], got {args.eta}")
    if not 0 < args.threshold_quantile <= 1:
        raise ValueError(f"--threshold_quantile must be in (0, 1], got {args.threshold_quantile}")
    interval = args.guidance_interval
    if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
        raise ValueError(f"--guidance_interval takes LO,HI with LO <= HI, got {interval}")
    return dict(
        spacing=args.spacing,
        eta=args.eta,
        variance=args.variance,
        x0=args.x0,
        threshold_quantile=args.threshold_quantile,
        guidance_interval=None if interval is None else tuple(interval),
        guidance_schedule=args.guidance_schedule,
    )


def sampling_plan(args, config, solver=None, steps=None, student: dict | None = None):
    """The :class:`~diffusion_jax.plans.SamplingPlan` of sample.py's flags for a model trained
    with ``config``: ``--sampler`` (default ``solver``, then the config's), ``--steps`` (default
    ``steps``, then the solver's) or ``--timesteps``, ``--w`` and :func:`plan_options`.
    ``student``: the checkpoint's ``distill`` record, if it is a distilled student (whose own
    solver and steps are then the defaults)."""
    from diffusion_jax import plans

    if args.timesteps is not None and (args.steps is not None or args.spacing is not None):
        raise ValueError("--timesteps is the whole time grid; drop --steps and --spacing")
    if student is not None:
        solver = steps = None
    return plans.resolve(
        config,
        solver=args.sampler or solver,
        steps=args.steps if args.steps is not None else steps,
        timesteps=args.timesteps,
        w=args.w,
        student=student,
        **plan_options(args),
    )


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several hosts",
        "Start the same command on every host. --distributed alone works where jax detects the "
        "cluster (Cloud TPU, Slurm, Open MPI, Kubernetes); elsewhere give the other three flags.",
    )
    group.add_argument("--distributed", action="store_true", help="join a multi-process run")
    group.add_argument("--coordinator_address", help="host:port of process 0 (implies it)")
    group.add_argument("--num_processes", type=int, help="how many processes in all")
    group.add_argument("--process_id", type=int, help="this process's index, 0..N-1")


def start_distributed(args) -> None:
    """``jax.distributed.initialize`` if the flags of :func:`add_distributed_flags` ask for it."""
    from diffusion_jax import sharding  # (imports jax: only when a command runs)

    manual = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in manual):
        if any(v is None for v in manual):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id go together; give all "
                "three, or only --distributed on a cluster jax detects itself"
            )
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(
                f"--process_id must be in [0, {args.num_processes}) for --num_processes "
                f"{args.num_processes}, got {args.process_id}"
            )
        sharding.initialize_distributed(*manual)
    elif args.distributed:
        sharding.initialize_distributed()
