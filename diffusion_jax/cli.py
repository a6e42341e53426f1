"""What the commands share that needs nothing of the library: their start-up (:func:`start`:
environment, Ctrl-C, logging, the compilation cache), their parser and the one parser of
comma-separated lists. It imports no diffusion_jax module (the library's modules may use it; the
flags of the commands are in :mod:`diffusion_jax.commands.flags`, their error handling in
:mod:`diffusion_jax.commands.errors`), and so no jax."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
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
    try:
        use_cpu_cores()
    except ValueError as e:
        sys.stderr.write(f"{program}: {e}\n")
        sys.exit(2)

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


CPU_DEVICES_ENV = "DIFFUSION_JAX_CPU_DEVICES"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_device_count(environ=os.environ, cores: int | None = None) -> int:
    """How many devices the CPU is shown to jax as: ``$DIFFUSION_JAX_CPU_DEVICES`` if set (1 =
    one device, jax's default), else the largest power of two <= the usable cores (so that it
    divides the usual batch sizes; training refuses a batch it does not divide). ValueError
    for a value that is not an integer >= 1."""
    value = environ.get(CPU_DEVICES_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"${CPU_DEVICES_ENV} must be an integer >= 1 (1 = the CPU as one device), "
                f"got {value!r}"
            )
        return int(value)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 << (max(1, cores or 1).bit_length() - 1)


def use_cpu_cores(environ=os.environ, cores: int | None = None) -> int | None:
    """Show jax the CPU as :func:`cpu_device_count` devices (before jax initialises its
    backends: it reads ``XLA_FLAGS`` then), so that the data-parallel mesh of sampling,
    training and distillation splits each batch over the cores. XLA runs one CPU device's
    small convolutions on about one core: on two cores this halves the time of a batch
    (docs/BENCHMARKS.md). No effect on GPUs and TPUs (their devices are not the CPU's). A device
    count the user put in ``XLA_FLAGS`` wins. Returns the count set, or None if left alone."""
    flags = environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG in flags:
        return None
    n = cpu_device_count(environ, cores)
    if n > 1:
        environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={n}".strip()
    return n


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
