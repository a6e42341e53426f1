"""What the entry scripts share: library errors become one clear line and an exit code."""

from __future__ import annotations

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
