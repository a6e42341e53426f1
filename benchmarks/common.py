"""What every benchmark script shares: markdown reports and their header, timing, FLOPs and the
devices' peak throughput.

jax is imported inside the functions that need it, so ``--help`` of a script stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import sys
import time

# Peak dense throughput in TFLOP/s, (device_kind substring, bfloat16, float32); first match wins,
# matched case-insensitively. float32 is the non-tensor-core rate; None: not listed (TPUs run
# float32 matmuls as bfloat16 passes at default precision, so their bfloat16 peak is used).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),  # SXM
    ("H200", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("TPU v4", 275.0, None),
    ("TPU v5 lite", 197.0, None),
    ("TPU v5e", 197.0, None),
    ("TPU v5p", 459.0, None),
    ("TPU v5", 459.0, None),
)

# ---------------------------------------------------------------- markdown


class Report:
    """Markdown parts, printed as they are added and joined for the output file; the compile
    times, failed sections and rows not run that the end of the report lists; and the run's
    wall-time budget (``budget_s`` seconds from ``start``, a ``time.monotonic()``; None: none)."""

    def __init__(self, budget_s: float | None = None, start: float | None = None):
        self.parts: list[str] = []
        self.compiles: list[tuple[str, float]] = []  # (what, seconds) for the compile table
        self.failed: list[str] = []
        self.skipped: list[str] = []  # rows not started because the budget was spent
        self.budget_s = budget_s
        self.start = time.monotonic() if start is None else start
        self.last_row_start: float | None = None  # seconds after start

    def add(self, text: str, echo: bool = True) -> None:
        """Append ``text``; print it unless it was already streamed (``echo=False``)."""
        self.parts.append(text)
        if echo:
            print(text + "\n", flush=True)

    def stream(self, headers, row=None) -> None:
        """Print a table's header (no ``row``) or one row now, as it finishes: a slow section
        shows its rows before it ends (the whole table is added afterwards with ``echo=False``)."""
        table = md_table(headers, [] if row is None else [row]).split("\n")
        print("\n".join(table[:2] if row is None else table[2:]), flush=True)

    @contextlib.contextmanager
    def table(self, headers):
        """A :class:`LiveTable` whose header is printed now and each row as it is added; the
        whole table joins the report when the block ends, also when it ends by an exception
        (a Ctrl-C keeps the rows measured)."""
        table = LiveTable(self, tuple(headers))
        self.stream(table.headers)
        try:
            yield table
        finally:
            print(flush=True)
            self.add(md_table(table.headers, table.rows), echo=False)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def may_start(self, what: str) -> bool:
        """Whether a row may start: True while the budget lasts (compiles count, they happen
        inside rows); otherwise ``what`` is listed as not run and False returned. A row that
        started runs to its end."""
        if self.budget_s is not None and self.elapsed() >= self.budget_s:
            self.skipped.append(what)
            return False
        self.last_row_start = self.elapsed()
        return True

    def budget_note(self) -> str:
        """The end of the report: the budget, when the last row started and the rows not run."""
        if self.budget_s is None:
            return f"- wall time {self.elapsed():.0f} s (no --budget_s)"
        started = "no row" if self.last_row_start is None else f"{self.last_row_start:.1f} s"
        lines = [
            f"- wall-time budget (--budget_s) {self.budget_s:g} s: last row started at "
            f"{started}, run ended at {self.elapsed():.1f} s; rows not run: "
            f"{len(self.skipped)}"
        ]
        lines += [f"  - not run: {what}" for what in self.skipped]
        return "\n".join(lines)

    def markdown(self) -> str:
        return "\n\n".join(self.parts) + "\n"


class LiveTable:
    """Rows of a table being measured (see :meth:`Report.table`)."""

    def __init__(self, report: Report, headers: tuple[str, ...]):
        self.report, self.headers, self.rows = report, headers, []

    def add(self, row: list) -> None:
        """Append ``row`` and print it now."""
        self.rows.append(list(row))
        self.report.stream(self.headers, self.rows[-1])

    def may_start(self, cells: list, what: str) -> bool:
        """:meth:`Report.may_start`; a row not run gets a line: ``cells`` (its first columns)
        then "not run: budget spent"."""
        if self.report.may_start(what):
            return True
        rest = len(self.headers) - len(cells) - 1
        self.add(list(cells) + ["not run: budget spent"] + [""] * rest)
        return False


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, spec: str = ".3g", prefix: str = "") -> str:
    """``value`` formatted, "n/a" for None or NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return prefix + format(value, spec)


def percent(part, whole) -> str:
    if part is None or not whole:
        return "n/a"
    return f"{100 * part / whole:.1f}%"


def write_output(path: str, text: str, overwrite: bool) -> None:
    """Write a report; without ``overwrite`` an existing file is an error, never replaced."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w" if overwrite else "x") as f:
        f.write(text)
    print(f"wrote {path}")


def finish_report(lines: list[str], path: str | None) -> str:
    """Print a report made of ``lines`` and write it to ``path`` (if given, never overwritten)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if path:
        write_output(path, text, overwrite=False)
    return text


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser described by the first paragraph of its docstring ``doc``."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """The cores this process may run on: ``taskset`` pins count, unlike ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(title: str, argv, packages=("jax", "flax", "optax")) -> list[str]:
    """The lines every benchmark report starts with: date, device, host CPU, library versions,
    command line and the environment variables that change what XLA does."""
    import jax

    dev = jax.devices()[0]
    lines = [
        f"# {title}",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S}",
        f"- device: {dev.device_kind} (platform {dev.platform}), {jax.device_count()} device(s)",
        f"- CPU: {cpu_model()}, os.cpu_count() = {os.cpu_count()}, cores this process may use "
        f"{cores()}",
        f"- python {platform.python_version()}, "
        + ", ".join(f"{p} {version(p)}" for p in packages),
        f"- command: `{shlex.join(['python', sys.argv[0], *argv])}`",
    ]
    env = {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS") if k in os.environ}
    if env:
        lines.append("- environment: " + ", ".join(f"`{k}={v}`" for k, v in env.items()))
    return lines


# ---------------------------------------------------------------- timing and FLOPs


def compile_timed(fn, *args, **kwargs):
    """``(compiled, seconds)``: ``fn`` (a jitted function) lowered and compiled ahead of time."""
    start = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def median_seconds(run, repeats: int, warmup: int, budget_s: float | None = None):
    """``(median, count)`` of the wall time of ``run()`` to completion over ``repeats`` runs after
    ``warmup`` untimed ones (the first of which compiles a jitted ``run``). A warm-up longer than
    ``budget_s`` leaves a single timed run."""
    import jax

    for _ in range(warmup):
        start = time.perf_counter()
        jax.block_until_ready(run())
        if budget_s is not None and time.perf_counter() - start > budget_s:
            repeats = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def flops_of(compiled) -> float | None:
    """The "flops" entry of XLA's cost analysis (a dict, or a list of one dict per program in
    some jax versions); None where there is none.

    XLA counts a while loop's body once, not once per iteration (checked on the CPU, jax
    0.10.2: a sampler chain of 2 or 10 steps counts the FLOPs of one step, +0.2% for the work
    outside its loop). So the program a benchmark times also gives its FLOPs per step: a loop of
    identical steps counts one of them, a loop-free one-step program its one step.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # not implemented on some backends
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or analysis.get("flops") is None:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def peak_for(dtype: str, override: float | None = None) -> tuple[float | None, str]:
    """``(peak TFLOP/s of one device or None, how it was chosen)`` for runs in ``dtype``;
    ``override`` (--peak_tflops) wins over the table."""
    import jax

    if override is not None:
        return override, f"{override:g} (--peak_tflops)"
    kind = jax.devices()[0].device_kind.lower()
    for name, bf16, f32 in PEAK_TFLOPS:
        if name.lower() in kind:
            if dtype == "bfloat16" or f32 is None:
                return bf16, f"{bf16:g} ({name} bf16)"
            return f32, f"{f32:g} ({name} f32)"
    return None, "n/a"
