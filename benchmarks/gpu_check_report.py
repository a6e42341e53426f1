"""What the stages of benchmarks/gpu_check.py printed and wrote, read into numbers, and the
markdown report made of them. Each reader takes a finished stage (``p``: a ``gpu_check.Proc``,
its output lines timed) and returns a dict of what it found; a missing number is left out, so
the report shows "n/a" for it. Imports no jax."""

from __future__ import annotations

import json
import os
import statistics
from typing import TYPE_CHECKING

from benchmarks.common import fmt, md_table

if TYPE_CHECKING:  # (gpu_check imports this module)
    from benchmarks.gpu_check import Proc

# ---------------------------------------------------------------- what the outputs say


def table_rows(markdown: str) -> int:
    """The rows of the markdown tables in ``markdown``: lines starting with ``|`` other than
    header lines (those followed by a ``|---`` line) and those separators."""
    lines = markdown.splitlines() + [""]
    return sum(
        1
        for x, below in zip(lines, lines[1:], strict=False)
        if x.startswith("|") and not x.startswith("|---") and not below.startswith("|---")
    )


def bench_result(path: str, printed: list[str]) -> dict:
    """benchmark.py's report: its file ``path``, or if it was killed before writing one (a
    SIGINT is only acted on between compilations), the tables and headings it ``printed``."""
    if os.path.exists(path):
        with open(path) as f:
            text, source = f.read(), os.path.basename(path)
    else:
        text = "\n".join(x for x in printed if x.startswith(("|", "#")))
        source = "its printed tables (it wrote no file)"
    return dict(markdown=text, source=source, rows=table_rows(text)) if text.strip() else {}


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, skipping a line cut off by a kill."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return records


def training_numbers(p: Proc, records: list[dict]) -> dict:
    """What train.py's output and metrics say: seconds to its first log line and first record,
    SIGTERM -> exit seconds, steps reached, steady speed (median over records after the first,
    whose window includes compiling), last loss, whether the stop wrote a checkpoint."""
    out = {"loop_start_s": p.find(r"^training \S+ on ")[0]}
    if records:
        first, last = records[0], records[-1]
        later = records[1:] or records
        out.update(
            first_record_step=first["step"],
            first_record_s=first["time"] - p.start_wall,
            steps=last["step"],
            steps_per_s=statistics.median(r["steps_per_sec"] for r in later),
            images_per_s=statistics.median(r["images_per_sec"] for r in later),
            loss=last["loss"],
        )
    _, stopped = p.find(r"stopped by signal \d+ at step (\d+); (.*)$")
    _, done = p.find(r"^done: (\d+) steps")
    if stopped:
        out.update(steps=int(stopped.group(1)), checkpoint=stopped.group(2))
    elif done:
        out.update(steps=int(done.group(1)), checkpoint="finished")
    if p.signalled_s is not None and not p.killed:
        out["exit_after_signal_s"] = p.wall_s - p.signalled_s
    return out


def sampling_numbers(p: Proc) -> dict:
    """The compile and sampling seconds sample.py prints, its device and the .npz written."""
    out = {}
    _, m = p.find(r"device: (.*?); (\d+) samples, (\S+) (\d+) steps, w=(\S+): "
                  r"compile ([\d.]+) s, sampling ([\d.]+) s")  # fmt: skip
    if m:
        out.update(device=m.group(1), samples=int(m.group(2)), sampler=f"{m.group(3)} "
                   f"{m.group(4)} steps, w={m.group(5)}", compile_s=float(m.group(6)),
                   sampling_s=float(m.group(7)))  # fmt: skip
    _, npz = p.find(r"^wrote (.*\.npz)$")
    _, grid = p.find(r"^wrote (.*_grid\.png)$")
    out.update(npz=npz and npz.group(1), grid=grid and grid.group(1))
    return out


def evaluation_numbers(p: Proc) -> dict:
    """The JSON row evaluate.py --npz prints (its last ``{`` ... ``}`` block), and the test
    accuracy of the classifier it used (``classifier_accuracy``)."""
    text = [line for _, line in p.lines]
    _, clf = p.find(r"^classifier .*: test accuracy ([\d.]+)")
    found = {"classifier_accuracy": float(clf.group(1))} if clf else {}
    for i in reversed([i for i, line in enumerate(text) if line == "{"]):
        for j in range(i + 1, len(text)):
            if text[j] == "}":
                try:
                    row = json.loads("\n".join(text[i : j + 1]))
                except json.JSONDecodeError:
                    break
                row.pop("class_counts", None)
                if row.get("fd") is not None and row.get("floor_fd"):
                    row["fd_over_floor"] = row["fd"] / row["floor_fd"]
                return dict(found, **row)
    return found


# ---------------------------------------------------------------- the report


def report_markdown(meta: dict, results: dict, stages) -> str:
    """report.md: ``meta`` (date, commit, command, preset, data, budget, wall_s) and each of
    ``stages``' result dict (absent: "not run")."""
    r = results
    s = lambda name: r.get(name, {})  # noqa: E731
    lines = [
        "# GPU check of diffusion_jax (benchmarks/gpu_check.py)", "",
        f"- date (UTC): {meta['date']}; commit {meta['commit']}",
        f"- command: `{meta['command']}`",
        f"- preset `{meta['preset']}`, data: {meta['data']}; total budget {meta['budget']:g} s, "
        f"wall so far {meta['wall_s']:.0f} s", "",
        "## Stages", "",
        md_table(["stage", "budget s", "wall s", "status"], [
            [n, fmt(s(n).get("budget_s"), ".0f"), fmt(s(n).get("wall_s"), ".1f"),
             s(n).get("status", "not run")] for n in stages]),
        "", "## Environment", "",
    ]  # fmt: skip
    env = s("env")
    lines += [f"- {k}: {v}" for k, v in env.get("info", {}).items()] or ["- (no probe output)"]
    lines += ["", "## Benchmark (benchmarks/benchmark.py)", ""]
    bench = s("bench")
    if bench.get("markdown"):
        # its headings one level below this section's
        lines += [f"Table rows: {bench['rows']}, from {bench['source']}.", ""]
        lines += [("##" + x if x.startswith("#") else x) for x in bench["markdown"].splitlines()]
    else:
        lines.append(f"No benchmark output ({bench.get('status', 'not run')}).")
    lines += ["", "## Start times of train.py", "",
              "Seconds from launch; first step = the first metrics.jsonl record (`--log_every 1`)."
              " Cold: an empty compilation cache; warm: the same cache, a new workdir.", "",
              md_table(["start", "first log line s", "first step s", "SIGTERM -> exit s",
                        "exit code", "status"],
                       [[n.split("_")[1], fmt(s(n).get("loop_start_s"), ".1f"),
                         fmt(s(n).get("first_record_s"), ".1f"),
                         fmt(s(n).get("exit_after_signal_s"), ".1f"), s(n).get("rc", "n/a"),
                         s(n).get("status", "not run")] for n in ("train_cold", "train_warm")]),
              "", "## Timed training run", ""]  # fmt: skip
    t = s("train")
    lines += [
        f"`{t.get('command', 'not run')}`, SIGTERM after {fmt(t.get('budget_s'), '.0f')} s; "
        f"status: {t.get('status', 'not run')}", "",
        md_table(["steps reached", "first record (step) s", "steps/s", "images/s", "last loss",
                  "at SIGTERM", "SIGTERM -> exit s"],
                 [[t.get("steps", "n/a"),
                   f"{fmt(t.get('first_record_s'), '.1f')} ({t.get('first_record_step', 'n/a')})",
                   fmt(t.get("steps_per_s"), ".4g"), fmt(t.get("images_per_s"), ".4g"),
                   fmt(t.get("loss"), ".4f"), t.get("checkpoint", "n/a"),
                   fmt(t.get("exit_after_signal_s"), ".1f")]]),
        "", "steps/s and images/s: medians of the metrics records after the first.", "",
        "## Sampling (sample.py)", "",
        md_table(["call", "device", "samples", "sampler", "compile s", "sampling s", "wall s",
                  "status"],
                 [[n.split("_")[1], s(n).get("device", "n/a"), s(n).get("samples", "n/a"),
                   s(n).get("sampler", "n/a"), fmt(s(n).get("compile_s"), ".2f"),
                   fmt(s(n).get("sampling_s"), ".2f"), fmt(s(n).get("wall_s"), ".1f"),
                   s(n).get("status", "not run")] for n in ("sample_cold", "sample_warm")]),
        "", "## Evaluation (evaluate.py --npz, the cold call's samples)", "",
    ]  # fmt: skip
    e = s("evaluate")
    lines += [
        md_table(["samples", "accuracy", "FD", "floor FD", "FD/floor", "real accuracy",
                  "classifier test accuracy", "wall s (classifier included)", "status"],
                 [[e.get("n", "n/a"), fmt(e.get("accuracy"), ".3f"), fmt(e.get("fd"), ".3g"),
                   fmt(e.get("floor_fd"), ".3g"), fmt(e.get("fd_over_floor"), ".2f"),
                   fmt(e.get("real_accuracy"), ".3f"), fmt(e.get("classifier_accuracy"), ".4f"),
                   fmt(e.get("wall_s"), ".1f"),
                   e.get("status", "not run")]]), "",
    ]  # fmt: skip
    return "\n".join(lines)
