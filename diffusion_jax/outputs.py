"""Where outputs go and how they are written: the default folder of a run's outputs
(:func:`default_folder`), the checks before any work (:func:`prepare`: nothing replaced without
``overwrite``, the folder writable), one file written atomically (:func:`written`) and output
sets written all or nothing (:func:`staged`).

Output sets written all or nothing: every file of one request is written into a hidden
staging folder beside its destination and moved into place at the end (renames are atomic),
so a crash, Ctrl-C or kill -9 leaves no part of the set where finished outputs are expected.

A staging folder is named ``.partial-PID-*``; one whose process is gone is removed by the next
request in that folder. Existing outputs are never replaced without ``overwrite``; a set of which
only some files exist (left by an older version killed between files) is named as incomplete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from diffusion_jax import checkpoints, workdir

PREFIX = ".partial-"


@contextlib.contextmanager
def written(path: str):
    """Yield a temporary name beside ``path`` to write to; it becomes ``path`` only when the
    block ends without an error, so a full disk or a crash never leaves a truncated file where a
    finished one is expected (and no half-written file blocks the rerun). The temporary name
    keeps the extension, which matplotlib, PIL and numpy read the format from."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{PREFIX}{os.getpid()}-{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def clean_stale(folder: str) -> None:
    """Remove ``.partial-PID-*`` files and folders in ``folder`` whose process PID is gone."""
    # (a missing or unusable folder has nothing to clean; writing to it reports the problem)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
        for name in os.listdir(folder):
            pid = name[len(PREFIX):].split("-", 1)[0]
            if name.startswith(PREFIX) and pid.isdigit() and not workdir.process_alive(int(pid)):
                path = os.path.join(folder, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(path)


def default_folder(run: str, kind: str) -> str:
    """``RUN/kind`` (e.g. ``samples``, ``eval``) for a workdir or one of its checkpoint folders."""
    return os.path.join(os.path.dirname(checkpoints.resolve(run)[0]), kind)


def named(folder: str, name: str, kinds: dict[str, str]) -> dict[str, str]:
    """{kind: ``folder/name_kind.ext``} for ``kinds`` = {kind: ext}, in that order."""
    return {k: os.path.join(folder, f"{name}_{k}.{ext}") for k, ext in kinds.items()}


def prepare(paths: dict[str, str], overwrite: bool = False) -> dict[str, str]:
    """Check, before any work, that the set ``paths`` ({kind: path}) can be written: stale
    staging folders removed, FileExistsError if it exists (unless ``overwrite``), the folders
    created, PermissionError if one cannot be written. Returns ``paths``."""
    folders = dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths.values())
    for folder in folders:
        clean_stale(folder)  # a killed earlier call's staging folder is not an output
    check_free(paths, overwrite)
    for folder in folders:
        check_writable(folder)
    return paths


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed; PermissionError with the reason if it cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write to output folder {folder!r}: {e.strerror}") from e


def check_free(paths: dict[str, str], overwrite: bool) -> None:
    """FileExistsError unless ``overwrite`` or none of ``paths`` ({kind: path}) exists; a set
    with some files missing is called incomplete."""
    existing = [p for p in paths.values() if os.path.exists(p)]
    if not existing or overwrite:
        return
    missing = [p for p in paths.values() if p not in existing]
    if missing:
        raise FileExistsError(
            f"{existing[0]} exists but {os.path.basename(missing[0])} does not: an incomplete "
            "set from an interrupted earlier run; pass --overwrite to replace it"
        )
    raise FileExistsError(f"{existing[0]} exists; pass --overwrite or choose another --out")


@contextlib.contextmanager
def staged(paths: dict[str, str], overwrite: bool = False):
    """Yield {kind: temporary path} in a staging folder beside the outputs; when the block ends
    without an error, move every file into its place ({kind: path}, the last one last: put the
    file that marks a set complete, e.g. the .npz, last). On any error or interrupt the staging
    folder is removed and no output is touched."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths.values()}
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        clean_stale(folder)
    check_free(paths, overwrite)
    parent = os.path.dirname(os.path.abspath(next(iter(paths.values()))))
    stage = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)
    try:
        tmp = {k: os.path.join(stage, os.path.basename(p)) for k, p in paths.items()}
        yield tmp
        for k, p in paths.items():
            os.replace(tmp[k], p)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
