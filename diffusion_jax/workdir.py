"""A training run's folder: refusing folders that are not ours, and the lock that keeps two
runs from writing one workdir (with the liveness check that makes a dead run's lock stale)."""

from __future__ import annotations

import contextlib
import os
import socket
import time

import jax

from diffusion_jax import sharding
from diffusion_jax.checkpoints import SUBDIR, CheckpointError


class WorkdirError(CheckpointError):
    """The workdir cannot be used: not ours, a file, or locked by a live run. (A
    CheckpointError, so code that caught those before still catches these.)"""


def check_workdir(workdir: str) -> None:
    """Refuse to write into an existing folder that is not a workdir of ours."""
    if os.path.isdir(workdir) and os.listdir(workdir):
        ours = {SUBDIR, "metrics.jsonl", "samples", "config.json", DATA_RECORD, LOCK_NAME}
        if not set(os.listdir(workdir)) & ours:
            raise WorkdirError(
                f"{workdir!r} exists and is not a diffusion_jax workdir; choose a new or empty "
                "--workdir so nothing in it is overwritten"
            )
    elif os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir!r} is a file, not a folder")


def check_creatable(workdir: str) -> None:
    """Refuse, in one line, a --workdir that cannot be made: one below a file, or in a folder
    this user cannot write to (a workdir that is itself a file is left to the training code)."""
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if existing != path and not os.path.isdir(existing):
        raise ValueError(
            f"cannot create --workdir {workdir!r}: {existing!r} is a file, not a folder"
        )
    if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write to --workdir {workdir!r}: {existing!r} is not writable by this user"
        )


LOCK_NAME = ".train.lock"
DATA_RECORD = "data.json"  # the fingerprint of the data a run trains on (runs.check_same_data)


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold ``workdir/.train.lock`` while training, so two runs never write one workdir.

    A lock left by a process that no longer exists (on this host) is taken over, and so is one
    that names no owner (empty or unreadable, e.g. written on a full disk) once it is older than
    ``LOCK_GRACE_S``: a live owner writes its name within microseconds of creating the file.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is None:
                if _age_s(path) > LOCK_GRACE_S:
                    _remove_quietly(path)  # stale: nobody ever finished writing its name
                    continue
                host, pid = "an unnamed process", "?"
            else:
                host, pid = owner
                if host == socket.gethostname() and not process_alive(int(pid)):
                    _remove_quietly(path)  # stale: its process is gone
                    continue
            raise WorkdirError(
                f"another training process ({host} pid {pid}) is writing to {workdir!r}; wait "
                f"for it to finish or stop it (if it is gone, delete {path})"
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(me)
        except OSError:
            _remove_quietly(path)  # never leave an empty lock behind (a full disk)
            raise
        break
    try:
        yield
    finally:
        try:
            if open(path).read() == me:  # never remove a lock another process took over
                os.remove(path)
        except OSError:
            pass


@contextlib.contextmanager
def run_lock(workdir: str):
    """:func:`workdir_lock`, taken by process 0; with several processes all of them learn
    whether it was taken (so none goes on alone) and check that they share the workdir."""
    if jax.process_count() == 1:
        with workdir_lock(workdir):
            yield
        return
    with contextlib.ExitStack() as stack:
        error = None
        if sharding.is_main_process():
            try:
                stack.enter_context(workdir_lock(workdir))
            except WorkdirError as e:
                error = e
        if not sharding.same_on_all_processes(error is None):
            raise error or WorkdirError(
                f"process 0 could not lock {workdir!r} (another run is writing to it; see the "
                "error of process 0)"
            )
        sharding.check_shared_folder(workdir)
        yield


LOCK_GRACE_S = 10.0


def _lock_owner(path: str) -> tuple[str, str] | None:
    """``(host, pid)`` written in a lock file, or None if it names nobody readable."""
    try:
        host, pid = open(path).read().split()
        int(pid)
    except (OSError, ValueError):
        return None
    return host, pid


def _age_s(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a PID we may not signal is)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
