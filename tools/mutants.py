#!/usr/bin/env python3
"""Mutation testing for diffusion_jax: do the tests notice small changes to the numerics?

For each selected module of ``diffusion_jax/`` the script makes *mutants*, copies of the module
with one small change each (``+`` -> ``-``, ``<`` -> ``<=``, ``0.5`` -> ``1.0``,
``jnp.maximum`` -> ``jnp.minimum``, ``-x`` -> ``x``, ``sqrt(x)`` -> ``(x)``, ...), runs the test
files that cover the module against each mutant, and lists the *survivors*: mutants under which
every test still passes. A survivor is either a gap in the tests or an equivalent change.

The working tree is never modified. The library, the tests and the top-level scripts are copied
to a temporary folder; each mutant is written into that copy, tested with ``PYTHONPATH`` pointing
at it, and the original file is written back before the next mutant. Interrupting (Ctrl-C,
SIGTERM) kills the running pytest, prints what was done so far, and removes the copy.

What is mutated (see ``Collector``): arithmetic operators (also in ``+=``), comparisons,
int and float literals, unary minus, ``True``/``False`` passed as keyword arguments,
min/max-like calls (``maximum``/``minimum``, ``max``/``min``, ``argmax``/``argmin``), and
``sqrt``/``square`` calls (replaced by their argument). What is never mutated: strings and
docstrings, f-strings, type annotations, decorators, ``__all__``, ``assert`` and ``raise``
statements, calls that only log or warn (``print``, ``log``, ``warnings.warn``, ...), and field
declarations in class bodies (configuration defaults). The conditions of argument-validation
blocks (``if ...: raise``) are skipped unless ``--include-validation`` is given. In some modules
only the functions listed in ``MODULE_FUNCTIONS`` are mutated (``--functions`` overrides).

This is a tool to run by hand or in a nightly job; pytest does not run it. Examples::

    python tools/mutants.py --list --modules losses
    taskset -c 1 python tools/mutants.py --modules losses,metrics --max-per-module 20 \\
        --out mutants.json
    python tools/mutants.py --only losses:30:1,metrics:62:2
    python tools/mutants.py --survivors-of mutants.json --out after.md

A mutant's ID is ``module:line:k``, the k-th mutant made on that line; it stays the same as long
as the module's source does. Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "diffusion_jax"

# The numerical modules, in the order they are run.
DEFAULT_MODULES = (
    "schedules",
    "diffusion",
    "losses",
    "samplers",
    "guidance",
    "plans",
    "solvers",
    "interpolation",
    "inpainting",
    "metrics",
    "embeddings",
    "optimization",
    "train_step",
    "hooks",
    "classifier",
    "evaluation",
    "unet",
    "data",
    "datasets",
)

# The tests run against each module's mutants (pytest node ids or files, relative to the root).
# Chosen narrowly: each pytest run pays jax's import and the compilation of what it touches.
MODULE_TESTS = {
    "schedules": ["tests/test_schedules.py", "tests/test_diffusion.py", "tests/test_solvers.py"],
    "diffusion": ["tests/test_diffusion.py", "tests/test_losses.py"],
    "losses": ["tests/test_losses.py"],
    # the batch padding of a sharded chain is exercised only with a mesh of several devices
    "samplers": ["tests/test_samplers.py", "tests/test_sharding.py::test_eight_devices_match_one"],
    "guidance": ["tests/test_plans.py", "tests/test_samplers.py::test_guidance_combination"],
    "plans": ["tests/test_plans.py", "tests/test_commands.py::test_sampling_flags_become_one_plan"],
    "solvers": ["tests/test_samplers.py", "tests/test_solvers.py"],
    "metrics": ["tests/test_metrics.py"],
    "embeddings": [
        "tests/test_networks.py::test_sinusoidal_embedding_closed_form",
        "tests/test_networks.py::test_conditioning_is_time_mlp_plus_class_row",
        "tests/test_networks.py::test_mlp_denoiser",
        "tests/test_networks.py::test_unet_shapes_and_zero_init",
    ],
    "optimization": ["tests/test_optimizer.py"],
    "train_step": [
        "tests/test_optimizer.py",
        "tests/test_stopping.py::"
        "test_the_loop_program_crosses_epochs_as_single_steps_do_with_no_host_round_trip",
    ],
    "hooks": ["tests/test_hooks.py"],
    "classifier": [
        "tests/test_evaluation.py::test_the_classifier_recipe_is_pinned",
        "tests/test_evaluation.py::test_random_shift_translates_each_image_within_range",
        "tests/test_evaluation.py::test_classifier_learns_a_separable_set",
        "tests/test_evaluation.py::test_default_training_length_and_shift",
    ],
    "evaluation": [
        "tests/test_evaluation.py::test_check_images_maps_uint8_and_unit_floats_to_the_model_range",
        "tests/test_evaluation.py::"
        "test_floors_compare_distinct_real_images_and_samples_use_the_same_test_subset",
        "tests/test_evaluation.py::test_unparseable_lists",
        "tests/test_evaluation.py::test_npz_input",
        "tests/test_evaluation.py::test_sweep_end_to_end",
    ],
    "unet": ["tests/test_networks.py"],
    "datasets": ["tests/test_data.py"],
    "data": [
        "tests/test_data.py",
        "tests/test_sharding.py::test_one_shard_is_the_single_device_order",
        "tests/test_sharding.py::test_shards_are_disjoint_equal_and_balanced",
    ],
    "interpolation": ["tests/test_interpolation.py"],
    "inpainting": ["tests/test_inpainting.py"],
}

# Modules of which only some functions are numerical code: qualified names (a class or function
# includes its methods and nested functions; "<module>" is the code outside any function, such
# as module constants). Other modules are mutated whole.
MODULE_FUNCTIONS = {
    # not the argument check of the public wrapper
    "train_step": [
        "init_state",
        "_init_program",
        "step_metrics",
        "_make_train_steps",
    ],
    # the metrics' arithmetic, not signals, files or the progress bar
    "hooks": ["MetricsWindow"],
    # not the checkpoint cache (save, load, default_dir, get_classifier)
    "classifier": [
        "<module>",
        "CNN",
        "fingerprint",
        "predict",
        "random_shift",
        "accuracy",
        "train_classifier",
    ],
    # not the plots
    "evaluation": [
        "parse_floats",
        "parse_samplers",
        "check_images",
        "Reference",
        "evaluate_images",
        "sweep",
        "markdown_table",
        "evaluate_npz",
    ],
    # not the network probe (can_reach) nor the tfds download
    "data": [
        "to_model_range",
        "to_unit_range",
        "read_idx",
        "load_idx_folder",
        "load_mnist5k",
        "toy2d_means",
        "load_toy2d",
        "_read_split",
        "resize_images",
        "load_dataset",
        "_load_cached",
        "steps_per_epoch",
        "epoch_order",
        "batch_indices",
        "shard_rows",
        "_shard_key",
        "shard_batch_indices",
        "dispatch_epochs",
        "dispatch_orders",
        "batch_from_orders",
    ],
}

# What is copied into the scratch repository (besides the top-level *.py files).
COPY = (
    PACKAGE,
    "tests",
    "benchmarks",
    "pretrained",
    "pyproject.toml",
    "conftest.py",
    "pytest.ini",
    "setup.cfg",
)

BINOP_SWAP = {
    ast.Add: "-",
    ast.Sub: "+",
    ast.Mult: "/",
    ast.Div: "*",
    ast.FloorDiv: "*",
    ast.Mod: "//",
    ast.Pow: "*",
}
OP_SYMBOL = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
}
COMPARE_SWAP = {
    ast.Lt: ("<", "<="),
    ast.LtE: ("<=", "<"),
    ast.Gt: (">", ">="),
    ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="),
    ast.NotEq: ("!=", "=="),
}
NAME_SWAP = {
    "maximum": "minimum",
    "minimum": "maximum",
    "max": "min",
    "min": "max",
    "amax": "amin",
    "amin": "amax",
    "argmax": "argmin",
    "argmin": "argmax",
}
DROP_CALLS = ("sqrt", "square")
LOG_CALLS = {
    "print",
    "log",
    "warn",
    "debug",
    "info",
    "warning",
    "error",
    "exception",
    "set_postfix",
    "add_scalar",
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    index: int  # 1-based, among the mutants of this line
    kind: str
    start: tuple[int, int]  # (line, character column) of the replaced text
    end: tuple[int, int]
    original: str  # the replaced text
    replacement: str
    scope: str  # qualified name of the enclosing function, "" at module level

    @property
    def id(self) -> str:
        return f"{self.module}:{self.line}:{self.index}"


def apply(source: str, mutant: Mutant) -> str:
    """``source`` with the mutant's one span replaced."""
    lines = source.splitlines(keepends=True)
    (l0, c0), (l1, c1) = mutant.start, mutant.end
    head = "".join(lines[: l0 - 1]) + lines[l0 - 1][:c0]
    tail = lines[l1 - 1][c1:] + "".join(lines[l1:])
    return head + mutant.replacement + tail


def describe(source: str, mutant: Mutant) -> tuple[str, str]:
    """The mutated line before and after (first line of the span, stripped)."""
    before = source.splitlines()[mutant.line - 1].strip()
    mutated = apply(source, mutant).splitlines()
    after = " ".join(s.strip() for s in mutated[mutant.line - 1 : mutant.line])
    if mutant.start[0] != mutant.end[0]:  # a multi-line span: show the spans themselves
        before = " ".join(mutant.original.split())
        after = mutant.replacement
    return before, after


class Collector:
    """Walks a module's AST and records the mutants of its numerical code."""

    def __init__(self, source: str, module: str, include_validation: bool, functions):
        self.source = source
        self.module = module
        self.include_validation = include_validation
        self.functions = functions  # None: the whole module
        self.lines = source.splitlines(keepends=True)
        self.tokens = [
            t
            for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type == tokenize.OP
        ]
        self.found: list[tuple] = []

    # ---- positions: the AST counts columns in UTF-8 bytes, tokenize and splicing in characters

    def _char(self, line: int, byte_col: int) -> tuple[int, int]:
        text = self.lines[line - 1]
        return line, len(text.encode()[:byte_col].decode(errors="ignore"))

    def start(self, node):
        return self._char(node.lineno, node.col_offset)

    def end(self, node):
        return self._char(node.end_lineno, node.end_col_offset)

    def segment(self, start, end) -> str:
        (l0, c0), (l1, c1) = start, end
        if l0 == l1:
            return self.lines[l0 - 1][c0:c1]
        return self.lines[l0 - 1][c0:] + "".join(self.lines[l0 : l1 - 1]) + self.lines[l1 - 1][:c1]

    def op_token(self, symbol: str, after, before):
        """The first operator token ``symbol`` between two positions (skips parentheses)."""
        for tok in self.tokens:
            if tok.start >= after and tok.end <= before and tok.string == symbol:
                return tok
            if tok.start >= before:
                break
        return None

    def add(self, kind, start, end, replacement, scope):
        self.found.append((start, end, kind, self.segment(start, end), replacement, scope))

    # ---- the walk

    def in_scope(self, scope: str) -> bool:
        if self.functions is None:
            return True
        if not scope:
            return "<module>" in self.functions
        return any(scope == f or scope.startswith(f + ".") for f in self.functions)

    def run(self) -> list[Mutant]:
        self.visit(ast.parse(self.source), "")
        self.found.sort(key=lambda m: (m[0], m[1], m[2]))
        mutants, per_line = [], {}
        for start, end, kind, original, replacement, scope in self.found:
            per_line[start[0]] = per_line.get(start[0], 0) + 1
            mutants.append(
                Mutant(
                    self.module,
                    start[0],
                    per_line[start[0]],
                    kind,
                    start,
                    end,
                    original,
                    replacement,
                    scope,
                )
            )
        return mutants

    def visit(self, node, scope: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            # decorators and annotations are skipped; default values and the body are mutated
            inner = scope if isinstance(node, ast.Lambda) else f"{scope}.{node.name}".lstrip(".")
            defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
            body = [node.body] if isinstance(node, ast.Lambda) else node.body
            for child in defaults + body:
                self.visit(child, inner)
            return
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if not isinstance(stmt, ast.AnnAssign):  # field declarations: configuration
                    self.visit(stmt, f"{scope}.{node.name}".lstrip("."))
            return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self.visit(node.value, scope)
            return
        if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr, ast.Import, ast.ImportFrom)):
            return
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return
        if isinstance(node, ast.Call) and _called_name(node) in LOG_CALLS:
            return
        if isinstance(node, ast.If) and not self.include_validation and _is_validation(node):
            for stmt in node.orelse:
                self.visit(stmt, scope)
            return
        if self.in_scope(scope):
            self.mutate(node, scope)
        for child in ast.iter_child_nodes(node):
            self.visit(child, scope)

    def mutate(self, node, scope: str) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAP:
            tok = self.op_token(
                OP_SYMBOL[type(node.op)], self.end(node.left), self.start(node.right)
            )
            if tok is not None:
                self.add("operator", tok.start, tok.end, BINOP_SWAP[type(node.op)], scope)
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAP:
            symbol = OP_SYMBOL[type(node.op)] + "="
            tok = self.op_token(symbol, self.end(node.target), self.start(node.value))
            if tok is not None:
                self.add("operator", tok.start, tok.end, BINOP_SWAP[type(node.op)] + "=", scope)
        elif isinstance(node, ast.Compare):
            left = node.left
            for op, right in zip(node.ops, node.comparators, strict=True):
                if type(op) in COMPARE_SWAP:
                    symbol, new = COMPARE_SWAP[type(op)]
                    tok = self.op_token(symbol, self.end(left), self.start(right))
                    if tok is not None:
                        self.add("comparison", tok.start, tok.end, new, scope)
                left = right
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            tok = self.op_token("-", self.start(node), self.start(node.operand))
            if tok is not None:
                self.add("unary minus", tok.start, tok.end, "", scope)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            for new in _number_mutations(node.value):
                self.add("constant", self.start(node), self.end(node), new, scope)
        elif isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant):
            if node.value.value is True or node.value.value is False:
                new = str(not node.value.value)
                self.add("boolean", self.start(node.value), self.end(node.value), new, scope)
        elif isinstance(node, ast.Call):
            self.mutate_call(node, scope)

    def mutate_call(self, node: ast.Call, scope: str) -> None:
        func, name = node.func, _called_name(node)
        if name in NAME_SWAP and isinstance(func, ast.Attribute):
            end = self.end(func)
            start = (end[0], end[1] - len(func.attr))
            self.add("min/max", start, end, NAME_SWAP[name], scope)
        elif name in ("max", "min") and isinstance(func, ast.Name):
            self.add("min/max", self.start(func), self.end(func), NAME_SWAP[name], scope)
        if name in DROP_CALLS and len(node.args) == 1 and not node.keywords:
            arg = self.segment(self.start(node.args[0]), self.end(node.args[0]))
            self.add(f"drop {name}", self.start(node), self.end(node), f"({arg})", scope)


def _called_name(node: ast.Call) -> str:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return ""


def _is_validation(node: ast.If) -> bool:
    """``if ...: raise ...`` (a block that only raises)."""
    return all(isinstance(s, ast.Raise) for s in node.body)


def _number_mutations(value) -> list[str]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [str(value + 1)] + (["0"] if value > 1 else [])
    return [repr(value * 2 if value else 1.0)] + (["0.0"] if value else [])


def module_path(root: str, module: str) -> str:
    return os.path.join(root, PACKAGE, module + ".py")


def find_mutants(source: str, module: str, include_validation=False, functions=None):
    """All mutants of ``source`` (the text of ``diffusion_jax/<module>.py``), in source order."""
    return Collector(source, module, include_validation, functions).run()


def select(mutants: list[Mutant], limit: int, seed: int) -> list[Mutant]:
    """A reproducible sample of at most ``limit`` mutants (all if ``limit`` <= 0), source order."""
    if limit <= 0 or len(mutants) <= limit:
        return list(mutants)
    module = mutants[0].module
    picked = random.Random(f"{seed}:{module}").sample(range(len(mutants)), limit)
    return [mutants[i] for i in sorted(picked)]


def find_by_id(source: str, mutants: list[Mutant], ids, signatures=None):
    """``(mutants, missing ids)`` for ``ids``. An id whose ``signatures`` entry (kind, line
    before, line after; from an earlier report) no longer matches, because the source changed,
    is looked up by that signature instead, on the nearest line."""
    signatures = signatures or {}
    by_id = {m.id: m for m in mutants}
    chosen, missing = [], []
    for i in ids:
        m, wanted = by_id.get(i), signatures.get(i)
        if m is None or (wanted is not None and (m.kind, *describe(source, m)) != wanted):
            line = int(i.split(":")[1])
            same = [m for m in mutants if wanted and (m.kind, *describe(source, m)) == wanted]
            m = min(same, key=lambda m: abs(m.line - line), default=None)
            if m is not None:
                print(f"note: {i} is now {m.id}")
        if m is None:
            missing.append(i)
        elif m not in chosen:
            chosen.append(m)
    return sorted(chosen, key=lambda m: (m.start, m.end)), missing


# ---------------------------------------------------------------- running the tests


def copy_repository(root: str, dest: str) -> None:
    def ignore(folder, names):
        skipped = {n for n in names if n in ("__pycache__", ".pytest_cache")}
        skipped |= {n for n in names if n.endswith(".egg-info")}
        if os.path.basename(os.path.dirname(folder)) == "pretrained":
            skipped |= {n for n in names if n in ("samples", "eval")}
        return skipped

    os.makedirs(dest)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name in COPY or (name.endswith(".py") and os.path.isfile(path)):
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(dest, name), ignore=ignore)
            else:
                shutil.copy2(path, os.path.join(dest, name))


def scratch_env(copy: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([copy] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant must never be read back from a stale .pyc
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS") or "cpu"
    env["DIFFUSION_JAX_CACHE"] = os.path.join(copy, ".cache")  # no shared caches
    return env


def run_pytest(copy: str, env: dict, tests: list[str], timeout: float):
    """``(status, seconds, detail, output)``: status "passed", "failed" or "timeout"."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=copy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills its children too
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return "timeout", time.perf_counter() - t0, f"no result in {timeout:.0f} s", ""
    except BaseException:
        _kill(proc)
        raise
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return "passed", seconds, "", output
    return "failed", seconds, _first_failure(output, proc.returncode), output


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _first_failure(output: str, returncode: int) -> str:
    for line in output.splitlines():
        m = re.match(r"(FAILED|ERROR) (\S+)", line)
        if m:
            return f"{m.group(1).lower()} {m.group(2).split('/')[-1]}"
    return f"pytest exit code {returncode}"


def check_import_location(copy: str, env: dict) -> None:
    probe = f"import {PACKAGE}, os; print(os.path.realpath({PACKAGE}.__file__))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True
    )
    where = out.stdout.strip()
    if out.returncode or not where.startswith(os.path.realpath(copy) + os.sep):
        sys.exit(
            f"mutants: the tests would import {PACKAGE} from {where or out.stderr.strip()!r}, "
            f"not from the scratch copy {copy!r}; check PYTHONPATH and installed packages"
        )


# ---------------------------------------------------------------- reports


def summarize(results: list[dict], modules: list[str], info: dict) -> dict:
    summary = {}
    for module in modules:
        rows = [r for r in results if r["module"] == module]
        summary[module] = {
            "generated": info[module]["generated"],
            "run": len(rows),
            "killed": sum(r["status"] == "killed" for r in rows),
            "survived": sum(r["status"] == "survived" for r in rows),
            "timeout": sum(r["status"] == "timeout" for r in rows),
            "seconds": round(sum(r["seconds"] for r in rows), 1),
            "baseline_seconds": info[module].get("baseline_seconds"),
            "tests": info[module]["tests"],
        }
    return summary


def print_report(results: list[dict], summary: dict, out=sys.stdout) -> None:
    survivors = [r for r in results if r["status"] == "survived"]
    print(f"\nSurvivors ({len(survivors)}):", file=out)
    for r in survivors:
        print(f"  {r['id']:<18} {r['kind']:<12} {r['before']}", file=out)
        print(f"  {'':<18} {'':<12} -> {r['after']}", file=out)
    print(
        f"\n{'module':<12} {'generated':>9} {'run':>5} {'killed':>7} {'survived':>9} "
        f"{'timeout':>8} {'seconds':>8}",
        file=out,
    )
    for module, s in summary.items():
        print(
            f"{module:<12} {s['generated']:>9} {s['run']:>5} {s['killed']:>7} {s['survived']:>9} "
            f"{s['timeout']:>8} {s['seconds']:>8.0f}",
            file=out,
        )


def markdown(results: list[dict], summary: dict, meta: dict) -> str:
    lines = [
        f"Mutation run of {meta['started']}: {meta['selection']}, validation blocks "
        f"{'included' if meta['include_validation'] else 'skipped'}, "
        f"{meta['seconds']:.0f} s in all.",
        "",
        "| module | generated | run | killed | survived | timeout | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for module, s in summary.items():
        lines.append(
            f"| {module} | {s['generated']} | {s['run']} | {s['killed']} | {s['survived']} | "
            f"{s['timeout']} | {s['seconds']:.0f} |"
        )
    lines += ["", "| survivor | kind | original | mutated |", "|---|---|---|---|"]
    for r in results:
        if r["status"] == "survived":
            before, after = (s.replace("|", "\\|") for s in (r["before"], r["after"]))
            lines.append(f"| `{r['id']}` | {r['kind']} | `{before}` | `{after}` |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def parse_mapping(items, name) -> dict:
    """``["mod=a,b", ...]`` -> ``{"mod": ["a", "b"]}``."""
    mapping = {}
    for item in items or []:
        module, sep, values = item.partition("=")
        if not sep or not module:
            sys.exit(f"mutants: {name} takes MODULE=VALUE[,VALUE...], got {item!r}")
        mapping[module.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return mapping


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Mutation testing of diffusion_jax's numerical modules (see the docstring "
        "of tools/mutants.py and docs/TESTING.md).",
    )
    p.add_argument(
        "--modules",
        default=",".join(DEFAULT_MODULES),
        help="comma-separated module names of diffusion_jax (default: %(default)s)",
    )
    p.add_argument(
        "--max-per-module",
        type=int,
        default=25,
        help="run at most N mutants per module, a sample drawn with --seed (0: all; "
        "default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--list", action="store_true", help="list the mutants; run nothing")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        help="run exactly these mutant IDs (comma-separated, repeatable), no sampling",
    )
    p.add_argument(
        "--survivors-of",
        metavar="REPORT.json",
        help="re-run the survivors of an earlier JSON report (--out), no sampling",
    )
    p.add_argument(
        "--tests",
        action="append",
        default=[],
        metavar="MODULE=SPEC[,SPEC]",
        help="pytest files or node ids for MODULE instead of the built-in map (repeatable)",
    )
    p.add_argument(
        "--functions",
        action="append",
        default=[],
        metavar="MODULE=NAME[,NAME]",
        help="mutate only these functions of MODULE ('*': all of it; repeatable)",
    )
    p.add_argument(
        "--include-validation",
        action="store_true",
        help="also mutate the conditions of `if ...: raise` argument checks",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per mutant (default: 3x the module's baseline test time + 30 s); "
        "a mutant that runs longer counts as killed ('timeout')",
    )
    p.add_argument("--out", help="write a report: FILE.md as markdown, anything else as JSON")
    p.add_argument("--root", default=ROOT, help="the repository (default: %(default)s)")
    p.add_argument(
        "--keep-copy", action="store_true", help="do not delete the scratch copy (debugging)"
    )
    return p


class _Stop(Exception):
    pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    root = os.path.abspath(args.root)
    tests_map = {**MODULE_TESTS, **parse_mapping(args.tests, "--tests")}
    functions_map = {**MODULE_FUNCTIONS, **parse_mapping(args.functions, "--functions")}

    only = [i.strip() for item in args.only for i in item.split(",") if i.strip()]
    # survivors of an earlier report, found again by what they change if their lines moved
    signatures = {}
    if args.survivors_of:
        with open(args.survivors_of) as f:
            previous = json.load(f)
        for r in previous["mutants"]:
            if r["status"] == "survived":
                only.append(r["id"])
                signatures[r["id"]] = (r["kind"], r["before"], r["after"])
    if only:
        modules = list(dict.fromkeys(i.split(":")[0] for i in only))
    else:
        modules = [m.strip() for m in args.modules.split(",") if m.strip()]

    plan, info = [], {}
    for module in modules:
        path = module_path(root, module)
        if not os.path.isfile(path):
            sys.exit(f"mutants: no module {path}")
        if module not in tests_map and not args.list:
            sys.exit(f"mutants: no tests mapped to {module!r}; pass --tests {module}=FILE")
        scope = functions_map.get(module)
        scope = None if scope in (None, ["*"]) else scope
        with open(path, encoding="utf-8") as f:
            source = f.read()
        mutants = find_mutants(source, module, args.include_validation, scope)
        if only:
            wanted = sorted({i for i in only if i.split(":")[0] == module})
            chosen, missing = find_by_id(source, mutants, wanted, signatures)
            if missing:
                print(f"warning: no such mutants (source changed?): {missing}")
        else:
            chosen = select(mutants, args.max_per_module, args.seed)
        info[module] = {"generated": len(mutants), "tests": tests_map.get(module, [])}
        plan += [(m, source, path) for m in chosen]

    if args.list:
        for m, source, _ in plan:
            before, after = describe(source, m)
            print(f"{m.id:<18} {m.kind:<12} {before}\n{'':<31} -> {after}")
        for module in modules:
            n = sum(m.module == module for m, _, _ in plan)
            print(f"{module}: {info[module]['generated']} mutants, {n} selected")
        return 0

    def on_term(signum, frame):
        raise _Stop()

    previous_handler = signal.signal(signal.SIGTERM, on_term)
    scratch = tempfile.mkdtemp(prefix="mutants-")
    copy = os.path.join(scratch, "repo")
    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M")
    results, interrupted = [], False
    try:
        copy_repository(root, copy)
        env = scratch_env(copy)
        check_import_location(copy, env)
        baselines = {}
        for module in modules:
            key = tuple(tests_map[module])
            if key not in baselines:
                print(f"baseline: {' '.join(key)}", flush=True)
                status, seconds, detail, output = run_pytest(copy, env, list(key), 3600)
                if status != "passed":
                    print(output[-3000:])
                    sys.exit(
                        f"mutants: the tests of {module!r} fail on the unmutated code ({detail}); "
                        "fix them before mutation testing"
                    )
                baselines[key] = seconds
                print(f"  passed in {seconds:.1f} s", flush=True)
            info[module]["baseline_seconds"] = round(baselines[key], 1)
        for n, (m, source, _) in enumerate(plan, 1):
            key = tuple(tests_map[m.module])
            timeout = args.timeout or 3 * baselines[key] + 30
            target = module_path(copy, m.module)
            mutated = apply(source, m)
            try:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(mutated)
                status, seconds, detail, _ = run_pytest(copy, env, list(key), timeout)
            finally:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(source)
            status = {"passed": "survived", "failed": "killed"}.get(status, status)
            before, after = describe(source, m)
            results.append(
                {
                    "id": m.id,
                    "module": m.module,
                    "line": m.line,
                    "kind": m.kind,
                    "scope": m.scope,
                    "before": before,
                    "after": after,
                    "status": status,
                    "seconds": round(seconds, 1),
                    "detail": detail,
                }
            )
            print(
                f"[{n}/{len(plan)}] {m.id:<18} {status:<8} {seconds:6.1f} s  {detail}", flush=True
            )
    except (KeyboardInterrupt, _Stop):
        interrupted = True
        print("\ninterrupted: the working tree was not touched; partial results follow")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if args.keep_copy:
            print(f"scratch copy kept in {copy}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    summary = summarize(results, modules, info)
    print_report(results, summary)
    meta = {
        "started": started,
        "seed": args.seed,
        "max_per_module": 0 if only else args.max_per_module,
        "selection": "mutants named by --only/--survivors-of"
        if only
        else f"at most {args.max_per_module or 'all'} mutants per module (seed {args.seed})",
        "include_validation": args.include_validation,
        "seconds": round(time.perf_counter() - t_start, 1),
        "interrupted": interrupted,
        "python": sys.version.split()[0],
    }
    if args.out:
        with open(args.out, "w") as f:
            if args.out.endswith(".md"):
                f.write(markdown(results, summary, meta))
            else:
                json.dump({**meta, "modules": summary, "mutants": results}, f, indent=1)
        print(f"wrote {args.out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
