"""How much work one dispatch of the training loop does, and waiting for it.

A dispatch cannot be aborted once queued, so a stop (Ctrl-C, SIGTERM) waits for it: dispatches
are kept to about :data:`SECONDS` (:func:`next_steps`), one straight-line step on the CPU
(:func:`loop_steps`), and waited for by polling (:func:`wait_ready`) so that signal handlers run.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

SECONDS = 10.0  # what a dispatch may take, so that a stop comes within about that
# Set to 1 to keep the steps_per_dispatch loop on the CPU (see loop_steps); the tests do, so that
# they exercise the program GPUs and TPUs run.
CPU_LOOP_ENV = "DIFFUSION_JAX_CPU_STEP_LOOP"


def loop_steps(config, mesh) -> int:
    """The most steps one dispatch of the training loop runs on ``mesh``: the config's
    ``steps_per_dispatch``, except on the CPU, where XLA runs the convolution gradients inside
    the loop program ~25x slower than as straight-line code (58 s vs 2.2 s per step of the cpu
    preset, jax 0.10.2): there every dispatch is one straight-line step (so a signal is also
    answered within one step), unless ``$DIFFUSION_JAX_CPU_STEP_LOOP`` is 1."""
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    if on_cpu and os.environ.get(CPU_LOOP_ENV) != "1":
        return 1
    return config.steps_per_dispatch


def next_steps(cap: int, elapsed: float, n: int, limit: float = SECONDS) -> int:
    """The step cap of the next dispatch, after one of ``n`` steps took ``elapsed`` seconds:
    as many steps as fit in ``limit`` seconds, at most twice ``cap`` (at least 1)."""
    fit = int(limit * n / max(elapsed, 1e-9))
    return max(1, min(2 * max(cap, 1), fit))


def size(cap: int, limit: int, chunk: int, *bounds: int) -> int:
    """The steps of the next dispatch: at most ``cap`` (the time budget), ``limit`` (the
    program's steps_per_dispatch) and every bound (steps left to the next boundary), rounded down
    to whole ``chunk``s when there are at least one, since the program computes whole chunks
    (the steps past the count are dropped)."""
    n = min(cap, limit, *bounds)
    return n - n % chunk if n >= chunk else n


@jax.jit
def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def snapshot(tree):
    """A device copy of ``tree``, made by one program queued behind whatever computes it: it
    outlives a later dispatch that donates ``tree``'s buffers, so a checkpoint of it can be
    written while that dispatch runs."""
    return _copy(tree)


def wait_ready(tree, poll_seconds: float = 0.002) -> None:
    """Wait until every array of ``tree`` is computed, polling rather than blocking in C++,
    so that Python signal handlers (a Ctrl-C, a SIGTERM) run while a dispatch is computing."""
    leaves = jax.tree_util.tree_leaves(tree)
    while not all(x.is_ready() for x in leaves):
        time.sleep(poll_seconds)
