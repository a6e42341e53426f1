"""What the entry scripts share: library errors become one clear line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import sys

from diffusion_jax.checkpoints import CheckpointError
from diffusion_jax.data import DataUnavailableError
from diffusion_jax.training import TrainingDivergedError

# Errors that mean "the input was wrong" (exit 2) or "the run cannot go on" (exit 1); both are
# reported as a message, not a traceback.
USER_ERRORS = (ValueError, CheckpointError, DataUnavailableError, FileExistsError, PermissionError)
RUN_ERRORS = (TrainingDivergedError,)


@contextlib.contextmanager
def clean_errors(program: str):
    try:
        yield
    except USER_ERRORS as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RUN_ERRORS as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(1)


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
    from diffusion_jax import sharding

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
