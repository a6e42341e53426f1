"""What a checkpoint that cannot be used is called: a folder that is no run, a step that does not
exist, an optimizer state no training could write, a checkpoint of another network, and a disk
check that must wait for the previous asynchronous save (issue 25)."""

import collections
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY

from diffusion_jax import checkpoints, runs, training


@pytest.mark.parametrize("contents", [(), ("notes.txt", "b.png"), ("2024/x.txt",)])
def test_a_folder_that_is_no_run_is_not_called_damaged(tmp_path, contents):
    for name in contents:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.read_config(str(tmp_path))
    message = str(info.value)
    assert "is not a diffusion_jax run" in message and "python train.py --workdir NEW" in message
    assert "damaged" not in message


def test_a_step_that_does_not_exist_lists_those_that_do(straight_run):
    workdir, _ = straight_run
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.read_config(os.path.join(workdir, "checkpoints", "999"))
    message = str(info.value)
    assert "step 999 does not exist" in message and "[4, 8]" in message
    assert "train" not in message.lower()


def test_a_run_stopped_before_its_first_save_says_what_to_do(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="no finished checkpoints.*resume"):
        checkpoints.read_config(str(tmp_path))


def test_the_space_check_waits_for_the_previous_save(tmp_path, monkeypatch):
    """Free space is measured after the save in flight has finished (it used to be measured
    while Orbax was still writing, and the next save then failed with pages of tracebacks)."""
    events = []

    class Manager:  # a CheckpointManager whose previous save is still being written
        directory = tmp_path

        def wait_until_finished(self):
            events.append("waited")

        def save(self, step, args, force):
            events.append("saved")

    usage = collections.namedtuple("usage", "total used free")

    def disk_usage(path):
        events.append("measured")
        return usage(10**12, 0, 10**12 if "waited" in events else 0)

    monkeypatch.setattr(checkpoints.shutil, "disk_usage", disk_usage)
    params = {"w": np.zeros(4, np.float32)}
    checkpoints.save(Manager(), 4, {"params": params}, params, training_config(), (8, 8, 1))
    assert events == ["waited", "measured", "saved"]


def training_config():
    from diffusion_jax.config import get_config

    return get_config("tiny")


def rewritten_copy(workdir, tmp_path, change):
    """A copy of ``workdir`` whose step 8 training state is replaced by ``change(state)``."""
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    directory = str(copy / "checkpoints")
    mngr = checkpoints.manager(directory)
    items = dict(state=ocp.args.StandardRestore(), ema=ocp.args.StandardRestore())
    restored = mngr.restore(8, args=ocp.args.Composite(**items))
    config, data_shape = checkpoints.read_meta(mngr, directory, 8)
    mngr.close()
    shutil.rmtree(os.path.join(directory, "8"))
    mngr = checkpoints.manager(directory)
    checkpoints.save(mngr, 8, change(restored.state), restored.ema, config, data_shape)
    mngr.wait_until_finished()
    mngr.close()
    return copy


def negative_nu(state):
    def change(path, x):
        return -np.abs(np.asarray(x)) - 1.0 if "'nu'" in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(change, state)


def test_a_finite_but_impossible_optimizer_state_is_refused(straight_run, tmp_path, tiny_data):
    """Negative second moments are finite, so the NaN check let them through; every update
    after the resume was then NaN and skipped, and the run called this checkpoint 'good'."""
    workdir, _ = straight_run
    damaged = rewritten_copy(workdir, tmp_path, negative_nu)
    with pytest.raises(checkpoints.CheckpointError) as info:
        training.train(str(damaged), dataset=tiny_data, **TINY)
    message = str(info.value)
    assert "negative second moments" in message and "damaged" in message
    assert "resume from step 4" in message


def adam(mu, nu, count=1, step=1):
    return {"step": step, "opt_state": [{"count": count, "mu": {"w": mu}, "nu": {"w": nu}}]}


def test_optimizer_faults():
    ok = adam(np.array([0.1, -0.2, 0.0]), np.array([0.001, 0.004, 0.0]))
    assert checkpoints._optimizer_fault(ok) is None
    assert "mu" in checkpoints._optimizer_fault(adam(np.array([5.0]), np.array([1e-4])))
    assert "count" in checkpoints._optimizer_fault(adam(np.zeros(1), np.zeros(1), count=9))
    assert "count" in checkpoints._optimizer_fault(adam(np.zeros(1), np.zeros(1), count=-1))


def test_a_resume_with_another_network_says_so(straight_run, tmp_path, tiny_data):
    """--allow_config_change lets a resume change the network's width, and the restore then
    failed with Orbax's advice to set strict=False; it is refused up front, naming the flag."""
    workdir, _ = straight_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    with pytest.raises(runs.ConfigConflictError) as info:
        training.train(
            str(copy),
            dataset=tiny_data,
            overrides={"channels": 16, "num_steps": 12},
            allow_config_change=True,
            **TINY,
        )
    message = str(info.value)
    assert "different network" in message and "channels: saved 8, requested 16" in message
    assert "new --workdir" in message and "strict=False" not in message
    assert sorted(os.listdir(copy / "checkpoints")) == ["4", "8"]


def test_orbax_shape_errors_lose_their_strict_false_advice():
    error = ValueError(
        "Requested shape: (16,) is not compatible with the stored shape: (8,). Truncating/"
        "padding is disabled. To enable it, set `strict=False` in `ArrayRestoreArgs`"
    )
    assert checkpoints._first_line(error) == (
        "an array saved with shape (8,) is requested with shape (16,)"
    )
