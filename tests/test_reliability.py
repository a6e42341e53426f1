"""Nothing lost, nothing silently wrong: diverging runs, damaged checkpoints, full disks, stale
locks and interrupted saves (each a fault injected into a tiny run)."""

import errno
import os
import shutil
import socket
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY

from diffusion_jax import checkpoints, classifier, generation, images, outputs, training
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.commands import sample as sample_script


def test_a_diverging_run_saves_nothing_after_its_last_good_step(tmp_path, tiny_data):
    """Four good steps, then data that make every update non-finite: the run must neither save
    copies of the stalled state (which would rotate step 4 away) nor end with success."""
    workdir = str(tmp_path / "nan")
    training.train(workdir, dataset=tiny_data, stop_after=4, **TINY)
    poisoned = tiny_data._replace(train_x=np.full_like(tiny_data.train_x, np.nan))
    # checkpoints every 2 steps and a limit above the streak: only the end can catch it
    overrides = {"checkpoint_every": 2, "max_nonfinite_steps": 100}
    with pytest.raises(training.TrainingDivergedError, match=r"inside a streak of 4 .*\b4\)"):
        training.train(
            workdir, dataset=poisoned, overrides=overrides, allow_config_change=True, **TINY
        )
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]


def poisoned_copy(workdir, tmp_path, name="damaged"):
    """A copy of ``workdir`` with a step 12 whose EMA parameters hold NaNs (a checkpoint that
    Orbax reads without complaint)."""
    copy = tmp_path / name
    shutil.copytree(workdir, copy)
    directory = str(copy / "checkpoints")
    mngr = checkpoints.manager(directory)
    restored = mngr.restore(
        8, args=ocp.args.Composite(state=ocp.args.StandardRestore(), ema=ocp.args.StandardRestore())
    )
    config, data_shape = checkpoints.read_meta(mngr, directory, 8)
    nan_ema = jax.tree_util.tree_map(lambda x: np.full_like(x, np.nan), restored.ema)
    checkpoints.save(mngr, 12, restored.state, nan_ema, config, data_shape)
    mngr.wait_until_finished()
    mngr.close()
    return copy


def test_a_checkpoint_with_non_finite_values_is_refused(straight_run, tmp_path, tiny_data, capsys):
    workdir, _ = straight_run
    damaged = poisoned_copy(workdir, tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="non-finite values") as info:
        generation.load_for_sampling(str(damaged))
    assert "resume from step 8" in str(info.value)
    assert f"--workdir {damaged / 'checkpoints' / '8'}" in str(info.value)
    # resuming refuses it too, instead of carrying NaNs into every later checkpoint
    with pytest.raises(checkpoints.CheckpointError, match="non-finite values"):
        training.train(str(damaged), dataset=tiny_data, **TINY)
    # and sample.py writes nothing
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        sample_script.main(["--workdir", str(damaged), "--out", str(out), "--per_class", "1"])
    assert exit_info.value.code == 2 and "non-finite" in capsys.readouterr().err
    assert not out.exists() or os.listdir(out) == []
    # the fallback the message names works
    assert generation.load_for_sampling(str(damaged / "checkpoints" / "8")).step == 8


def test_non_finite_samples_are_not_written(straight_run, tmp_path, monkeypatch):
    workdir, _ = straight_run
    real = generation.generate

    def nan_generate(*args, **kw):
        result = real(*args, **kw)
        return result._replace(samples=result.samples.at[0].set(np.nan))

    monkeypatch.setattr(generation, "generate", nan_generate)
    with pytest.raises(ValueError, match="NaN or infinite, so nothing was written"):
        generation.sample_to_files(workdir, per_class=1, out=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_file_and_the_rerun_works(straight_run, tmp_path, monkeypatch):
    """A full disk while writing the GIF: the grid already written by this call is removed
    too, so nothing blocks the rerun, and the script reports one line (exit 1)."""
    workdir, _ = straight_run
    out = tmp_path / "out"
    real_save_gif = images.save_gif

    def full_disk(snapshots, path, per_row, **kw):
        with outputs.written(path) as tmp:
            open(tmp, "wb").write(b"GIF89a partial")
            raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(images, "save_gif", full_disk)
    args = ["--workdir", workdir, "--per_class", "1", "--out", str(out), "--frames", "2"]
    with pytest.raises(SystemExit) as exit_info:
        sample_script.main(args)
    assert exit_info.value.code == 1
    assert os.listdir(out) == []  # no partial GIF, no orphan grid, no temporary file
    monkeypatch.setattr(images, "save_gif", real_save_gif)
    assert sample_script.main(args) == 0
    assert len(os.listdir(out)) == 3


def test_written_replaces_only_on_success(tmp_path):
    path = tmp_path / "a.npz"
    images.save_npz(str(path), np.zeros((2, 4, 4, 1)), [0, 1])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with outputs.written(str(path)) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("crash")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.npz"]


def test_lock_without_an_owner(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    lock = os.path.join(workdir, workdir_lib.LOCK_NAME)
    open(lock, "w").close()  # empty: its writer died before writing its name (a full disk)
    # a fresh one may belong to a process that is about to write its name: refused
    with pytest.raises(checkpoints.CheckpointError, match="another training process"):
        with workdir_lib.workdir_lock(workdir):
            pass
    old = time.time() - 2 * workdir_lib.LOCK_GRACE_S
    os.utime(lock, (old, old))
    with workdir_lib.workdir_lock(workdir):  # an old one is stale: taken over
        assert open(lock).read() == f"{socket.gethostname()} {os.getpid()}"
    assert not os.path.exists(lock)


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    real_fdopen = os.fdopen

    def full_disk(fd, *a, **kw):
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", full_disk)
    with pytest.raises(OSError, match="No space left"):
        with workdir_lib.workdir_lock(workdir):
            pass
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert os.listdir(workdir) == []


def test_an_interrupted_classifier_save_counts_as_absent(tmp_path, tiny_data):
    directory = tmp_path / "clf"
    (directory / "0.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)  # what a kill leaves
    clf = classifier.get_classifier(tiny_data, str(directory), epochs=1, feature_dim=8)
    assert os.listdir(directory) == ["0"]
    again = classifier.get_classifier(tiny_data, str(directory))
    assert again.test_accuracy == clf.test_accuracy
    # a folder holding something else is neither used nor replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(checkpoints.CheckpointError):
        classifier.get_classifier(tiny_data, str(other), epochs=1)
    assert os.listdir(other) == ["notes.txt"]


def test_metrics_hold_each_step_once_after_a_resume(tmp_path, tiny_data):
    """A run killed after logging step 6 but before its next checkpoint resumes from step 4 and
    logs steps 5-8 again: the records past the checkpoint are dropped first."""
    workdir = str(tmp_path / "run")
    training.train(workdir, dataset=tiny_data, stop_after=6, **TINY)  # checkpoints 4 and 6
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # as if killed before saving 6
    training.train(workdir, dataset=tiny_data, **TINY)
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in lines]
    assert steps == [2, 4, 6, 8]


def test_checkpoint_errors_say_what_to_do(straight_run, tmp_path, tiny_data):
    workdir, _ = straight_run
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    for name in os.listdir(broken / "checkpoints" / "8" / "ema"):
        path = broken / "checkpoints" / "8" / "ema" / name
        if path.is_dir():
            shutil.rmtree(path)
    with pytest.raises(checkpoints.CheckpointError) as info:
        generation.load_for_sampling(str(broken))
    message = str(info.value)
    assert "resume from step 4" in message and "strict=False" not in message
    assert "\n" not in message
    # the EMA-only checkpoint that ships for sampling cannot be resumed, and says so
    ema_only = tmp_path / "ema_only"
    shutil.copytree(workdir, ema_only)
    for step in ("4", "8"):
        shutil.rmtree(ema_only / "checkpoints" / step / "state")
    with pytest.raises(checkpoints.CheckpointError, match="holds only EMA parameters"):
        training.train(str(ema_only), dataset=tiny_data, **TINY)


def test_ctrl_c_outside_training_is_one_line(straight_run, tmp_path, capsys, monkeypatch):
    """Ctrl-C while sample.py loads or samples ends with one line and exit code 130."""
    workdir, _ = straight_run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "load_for_sampling", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        sample_script.main(["--workdir", workdir, "--out", str(tmp_path)])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "sample.py: interrupted"


def test_an_impossible_new_config_leaves_no_workdir(tmp_path, tiny_data):
    workdir = tmp_path / "new"
    with pytest.raises(ValueError, match="sample_steps"):
        training.train(
            str(workdir),
            dataset=tiny_data,
            overrides={"sample_steps": 50, "num_timesteps": 20},
            **TINY,
        )
    assert not workdir.exists()


def test_sampling_while_training_rotates_the_checkpoint_away(
    straight_run, tmp_path, capsys, monkeypatch
):
    """The checkpoint sample.py picked is deleted before it is read (a running training's
    rotation): one line on stderr, no traceback, nothing written."""
    workdir, _ = straight_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    real_pick = checkpoints._pick_step

    def pick_then_rotate(mngr, directory, step):
        chosen = real_pick(mngr, directory, step)
        shutil.rmtree(os.path.join(directory, str(chosen)))
        return chosen

    monkeypatch.setattr(checkpoints, "_pick_step", pick_then_rotate)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        sample_script.main(["--workdir", str(copy), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code in (1, 2) and "\n" not in err and "Traceback" not in err
    assert "could not be read" in err and "resume from step 4" in err
    assert not out.exists()


def test_a_full_disk_stops_before_orbax_writes(tmp_path, tiny_data, monkeypatch):
    """With too little space for a checkpoint the run stops with one OSError naming the folder,
    before Orbax's background threads start a write they cannot finish (which printed thousands
    of lines of tracebacks), and leaves no half-written step or lock behind."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    workdir = tmp_path / "run"
    with pytest.raises(OSError, match="not enough space for the checkpoint of step 4"):
        training.train(str(workdir), dataset=tiny_data, **TINY)
    assert os.listdir(workdir / "checkpoints") == []
    assert not (workdir / workdir_lib.LOCK_NAME).exists()


def test_ctrl_c_during_start_up_is_one_line(straight_run, tmp_path):
    """A real SIGINT while sample.py is still importing jax: one line and exit 130, no
    traceback (and no crash from an interpreter torn down amid XLA threads)."""
    import signal
    import subprocess
    import sys

    workdir, _ = straight_run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["sample.py", "--workdir", workdir, "--out", str(tmp_path / "out")]
    # A test runner started in the background ignores SIGINT, and its children inherit that; a
    # terminal does not, so the child restores it before becoming sample.py.
    launcher = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        f"os.execv(sys.executable, [sys.executable] + {args!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "sample.py: interrupted"


def test_a_failed_restore_prints_one_line_and_no_stray_tracebacks(straight_run, tmp_path):
    """TensorStore callbacks still in flight after a failed restore used to print "Event loop
    is closed" tracebacks after the one-line error (seen only in a real process)."""
    import subprocess
    import sys

    workdir, _ = straight_run
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    for step in ("4", "8"):
        ema = broken / "checkpoints" / step / "ema"
        for path in ema.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "sample.py", "--workdir", str(broken), "--out", str(tmp_path / "out")],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "could not be read" in proc.stderr, proc.stderr


def test_a_resume_on_other_data_is_refused(tmp_path, tiny_data, caplog):
    """IDX files replaced between runs went unnoticed: the resumed run trained on other data.
    The data's fingerprint is recorded in data.json and a resume on other data is refused
    (--allow_config_change continues, with a warning)."""
    from diffusion_jax import runs

    workdir = str(tmp_path / "run")
    training.train(workdir, dataset=tiny_data, stop_after=4, **TINY)
    assert (tmp_path / "run" / runs.DATA_RECORD).exists()
    replaced = tiny_data._replace(train_x=np.ascontiguousarray(tiny_data.train_x[::-1]))
    with pytest.raises(runs.ConfigConflictError, match="training data differ.*--data_dir"):
        training.train(workdir, dataset=replaced, **TINY)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4"]
    result = training.train(workdir, dataset=replaced, allow_config_change=True, **TINY)
    assert int(result.state.step) == 8 and "continuing on the new data" in caplog.text


def test_a_run_that_stopped_after_recording_its_data_is_still_ours(tmp_path):
    (tmp_path / workdir_lib.DATA_RECORD).write_text("{}")
    workdir_lib.check_workdir(str(tmp_path))  # a rerun may use it
