"""Library errors as one clear line and an exit code: :func:`clean_errors` around a command's work.

The error classes are imported when a command starts its work, not when this module is imported,
so that building a parser (``--help``, a bad flag) does not wait for Orbax and the training code
(the commands are the one layer that imports the library lazily)."""

from __future__ import annotations

import contextlib
import sys
import threading


def _error_kinds():
    """Errors that mean "the input was wrong" (exit 2) or "the run cannot go on" (exit 1); both
    are reported as a message, not a traceback. Imported here, not at the top, so that building
    a parser (``--help``, a bad flag) does not wait for Orbax and the training code."""
    from diffusion_jax.checkpoints import CheckpointError
    from diffusion_jax.data import DataUnavailableError
    from diffusion_jax.training import TrainingDivergedError

    user = (ValueError, CheckpointError, DataUnavailableError, FileExistsError, PermissionError)
    # Any other OSError (a full disk, a vanished folder) names its path and cause, and a missing
    # package (ImportError) names what to install: one line each.
    return user, (TrainingDivergedError, OSError, ImportError)


def _quiet_closed_loop_callbacks() -> None:
    """Drop the "Event loop is closed" RuntimeErrors that TensorStore's callbacks raise once
    Orbax's event loop is gone (a failed restore leaves some in flight); Python would print each
    as a stray traceback around the one-line message. Installed for the whole command, since
    they can fire while the error is still on its way to :func:`clean_errors`."""

    if getattr(sys.unraisablehook, "quiets_closed_loop", False):
        return  # (already installed: scripts called in-process, as the tests do)

    def closed_loop(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    unraisable, thread_hook = sys.unraisablehook, threading.excepthook

    def quiet_unraisable(info):
        if not closed_loop(info.exc_value):
            unraisable(info)

    def quiet_thread(args):
        if not closed_loop(args.exc_value):
            thread_hook(args)

    quiet_unraisable.quiets_closed_loop = True
    sys.unraisablehook, threading.excepthook = quiet_unraisable, quiet_thread


@contextlib.contextmanager
def clean_errors(program: str):
    user_errors, run_errors = _error_kinds()
    _quiet_closed_loop_callbacks()
    try:
        yield
    except user_errors as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except run_errors as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C before training catches signals itself (start-up, loading data, sampling)
        print(f"{program}: interrupted", file=sys.stderr)
        sys.exit(130)
