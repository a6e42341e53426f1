"""What the commands share: their start-up (:func:`start`: environment, Ctrl-C, logging), library
errors as one clear line and an exit code, the one parser of comma-separated lists, and the
sampler flags of sample.py and evaluate.py. Nothing here imports jax at import time."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

_KINDS = {int: "integers", float: "numbers", str: "names"}


def start(program: str) -> None:
    """What a command does first, before jax is imported: quiet TensorFlow's C++ logging (tfds),
    and make Ctrl-C before the training loop handles it (imports, compiling, sampling) one line
    and exit 130, leaving at once: a traceback or interpreter teardown amid XLA threads (which
    crashed with a segmentation fault) helps nobody. Outputs are written under temporary names,
    so nothing half-written is left where a finished file is expected."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    enable_compilation_cache()

    def interrupted(*_):
        sys.stderr.write(f"{program}: interrupted\n")
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)
    setup_logging()
    # Only our handler prints the library's messages: absl (imported with Orbax) gives the root
    # logger a stderr handler, which would print each of them a second time. (Not done in
    # setup_logging: in-process callers such as pytest's caplog listen on the root logger.)
    logging.getLogger("diffusion_jax").propagate = False


CACHE_ENV = "DIFFUSION_JAX_COMPILATION_CACHE"


def compilation_cache_dir(environ=os.environ) -> str | None:
    """The folder of jax's persistent compilation cache: ``$DIFFUSION_JAX_COMPILATION_CACHE`` if it
    names one, None if it is ``0``/``off``/``false``/``no``, else
    ``${XDG_CACHE_HOME:-~/.cache}/diffusion_jax/jax_cache``."""
    value = environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("0", "off", "false", "no"):
        return None
    if value:
        return os.path.expanduser(value)
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusion_jax", "jax_cache")


def enable_compilation_cache(environ=os.environ) -> str | None:
    """Turn on jax's persistent compilation cache (before jax is imported: jax reads these
    variables at import), so a second sample.py or train.py call loads its programs instead of
    compiling them again (13-15 s per call on an H200). Small programs are cached too (the default
    minimum compile time, 1 s, would skip them). A ``JAX_COMPILATION_CACHE_DIR`` the user set
    wins. Returns the folder, or None when turned off."""
    folder = compilation_cache_dir(environ)
    if folder is not None:
        environ.setdefault("JAX_COMPILATION_CACHE_DIR", folder)
        environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return folder


def command_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A command's parser: described by the first paragraph of its module docstring."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def run_command(main, prog: str) -> None:
    """A console entry point: :func:`start`, then ``main(prog=prog)`` as the exit code."""
    start(prog)
    sys.exit(main(prog=prog))


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a message is emitted (pytest's capture, a
    redirected stream), not the one present when the handler was made."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """The library's messages (``diffusion_jax.*`` loggers) as plain lines on stdout, as a
    command prints them. Idempotent; library users who configure logging themselves skip it."""
    root = logging.getLogger("diffusion_jax")
    root.setLevel(level)
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)


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


def parse_list(
    text: str,
    item: Callable[[str], Any] = str,
    *,
    name: str = "the list",
    example: str = "",
    choices: Sequence | None = None,
    minimum: float | None = None,
) -> list:
    """``"a, b,c"`` -> ``[item("a"), item("b"), item("c")]``: the one parser of every
    comma-separated flag. Empty parts are ignored; an empty list, a value ``item`` cannot read,
    one outside ``choices`` or below ``minimum`` raises ValueError naming ``name``. An ``item``
    other than int/float/str raises its own (already descriptive) ValueError."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{name} is empty")
    if item in _KINDS:
        try:
            values = [item(p) for p in parts]
        except ValueError:
            e_g = f", e.g. {example}" if example else ""
            raise ValueError(
                f"{name} takes comma-separated {_KINDS[item]}{e_g}; got {text!r}"
            ) from None
    else:
        values = [item(p) for p in parts]
    if choices is not None and any(v not in choices for v in values):
        bad = [v for v in values if v not in choices]
        raise ValueError(f"{name}: unknown {bad} (choose from {', '.join(map(str, choices))})")
    if minimum is not None and any(v < minimum for v in values):
        raise ValueError(f"{name} takes values >= {minimum}, got {text!r}")
    return values


def list_type(item: Callable[[str], Any] = str, **kw) -> Callable[[str], list]:
    """:func:`parse_list` as an argparse ``type`` (its errors become argparse's usage errors)."""

    def parse(text: str) -> list:
        try:
            return parse_list(text, item, **kw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


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


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """The sampler options that are not the sampler and its step count (see
    :class:`~diffusion_jax.samplers.SamplerSettings`); read them back with
    :func:`sampler_options`."""
    from diffusion_jax.schedules import SPACINGS
    from diffusion_jax.solvers import THRESHOLD_QUANTILE, VARIANCES, X0_MODES

    group = parser.add_argument_group("sampler options")
    group.add_argument(
        "--spacing",
        choices=SPACINGS,
        default=None,
        help="where a shortened chain's steps go (default: the sampler's own: uniform for "
        "ddpm and ddim, see the README for dpmpp2m)",
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


def sampler_options(args) -> dict:
    """The keywords of ``generation.generate`` that :func:`add_sampler_flags` set."""
    import math

    if not math.isfinite(args.eta) or args.eta < 0:
        raise ValueError(f"--eta must be a finite number >= 0, got {args.eta}")
    if not 0 < args.threshold_quantile <= 1:
        raise ValueError(f"--threshold_quantile must be in (0, 1], got {args.threshold_quantile}")
    return dict(
        spacing=args.spacing,
        eta=args.eta,
        variance=args.variance,
        x0=args.x0,
        threshold_quantile=args.threshold_quantile,
    )
