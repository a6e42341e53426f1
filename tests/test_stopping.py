"""Stopping a run (issues 22 and 25): signals are handled while a dispatch computes, a stop
writes a checkpoint at the step reached, a second signal exits at once, dispatches stay short
enough for that on a slow CPU, and the train step is traced once."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import TINY

from diffusion_jax import dispatch, hooks, models, train_step, training
from diffusion_jax.config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dispatch_length_fits_the_time_limit():
    """The first dispatch is one step; later ones grow at most 2x, to what fits the limit."""
    assert dispatch.next_steps(1, 0.001, 1, limit=10.0) == 2  # fast: doubles
    assert dispatch.next_steps(32, 0.01, 32, limit=10.0) == 64
    assert dispatch.next_steps(50, 100.0, 50, limit=10.0) == 5  # 2 s a step
    assert dispatch.next_steps(1, 36.0, 1, limit=10.0) == 1  # never 0


def test_dispatch_sizes_come_in_whole_chunks():
    """The loop program computes whole chunks, so dispatches are sized in them where they can."""
    assert dispatch.size(1, 50, 10, 100) == 1  # the first dispatch: one step
    assert dispatch.size(37, 50, 10, 100, 1000) == 30
    assert dispatch.size(64, 50, 10, 100) == 50  # steps_per_dispatch
    assert dispatch.size(64, 50, 10, 7) == 7  # less than a chunk to the next boundary
    assert dispatch.size(5, 1, 1, 3) == 1  # the CPU's straight-line steps


def test_the_loop_program_crosses_epochs_as_single_steps_do_with_no_host_round_trip(tiny_data):
    """Five- and three-step dispatches of the loop program (chunks of five, so the second
    computes two steps it drops) over a 40-example set, two steps an epoch, train as eight
    single straight-line steps do; the metric sums cover the steps taken. The compiled program
    has no conditional and one loop of unknown trip count (over chunks): every other loop, the
    steps of a chunk among them, has a known trip count, which a GPU runs without reading a
    predicate back. The input state is donated."""
    import dataclasses

    from diffusion_jax import sharding

    small = tiny_data._replace(train_x=tiny_data.train_x[:40], train_y=tiny_data.train_y[:40])
    config = get_config("tiny", steps_per_dispatch=5)
    mesh = sharding.data_mesh()
    x, y = training.device_data(small, mesh, 1)
    state0 = sharding.replicate(
        training.init_state(config, models.build_model(config), (1, 8, 8, 1)), mesh
    )
    loop = training.make_train_steps(config, mesh)
    compiled = loop.lower(state0, x, y, 5).compile()
    hlo = compiled.as_text()
    loops = [line for line in hlo.splitlines() if " while(" in line]  # (threefry's among them)
    assert len(loops) > 1 and sum("known_trip_count" not in line for line in loops) == 1
    assert " conditional(" not in hlo

    donated = dispatch.snapshot(state0)
    looped, first = compiled(donated, x, y, 5)
    # the input state's buffers became the output's: one copy of the state in memory
    assert all(a.is_deleted() for a in jax.tree_util.tree_leaves(donated))
    looped, second = compiled(looped, x, y, 3)
    single = training.make_train_steps(dataclasses.replace(config, steps_per_dispatch=1), mesh)
    state, losses = dispatch.snapshot(state0), []
    for _ in range(8):
        state, sums = single(state, x, y, 1)
        losses.append(float(sums["loss"]))
    assert int(looped.step) == int(state.step) == 8
    assert float(first["loss"]) == pytest.approx(sum(losses[:5]), rel=1e-5)
    assert float(second["loss"]) == pytest.approx(sum(losses[5:]), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves((looped.params, looped.ema_params)),
                    jax.tree_util.tree_leaves((state.params, state.ema_params)), strict=True):
        # (atol: 1% of one AdamW step of lr 1e-3; where a gradient is ~0, as for a
        # zero-initialised layer, Adam's normalisation magnifies float rounding to ~1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="steps_per_dispatch=5"):
        loop(state0, x, y, 6)


def test_the_fori_loop_step_is_traced_once(monkeypatch):
    """Building the several-steps-per-dispatch program traces the loss once (the metrics'
    structure no longer comes from a second trace of the whole step)."""
    config = get_config("tiny", seed=98765)  # a config no other test compiled (lru_cache)
    assert config.steps_per_dispatch > 1
    calls = []
    real = train_step.losses.diffusion_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_step.losses, "diffusion_loss", counting)
    train_steps = training.make_train_steps(config)
    model = models.build_model(config)
    shape = (1, 8, 8, 1)
    state = jax.eval_shape(
        lambda: training.init_state(config, model, shape)
    )
    x = jax.ShapeDtypeStruct((1, 16, 8, 8, 1), jax.numpy.float32)
    y = jax.ShapeDtypeStruct((1, 16), jax.numpy.int32)
    train_steps.lower(state, x, y, 2)
    assert len(calls) == 1


def train_signalled_at_start(workdir: str, dataset, signum: int):
    """Train the tiny preset in ``workdir``, sending ``signum`` to this process as soon as the
    loop says it is training (its handlers are in place by then); the TrainResult."""

    class SignalOnStart(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("training"):
                os.kill(os.getpid(), signum)

    handler, logger = SignalOnStart(), logging.getLogger("diffusion_jax.training")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return training.train(workdir, dataset=dataset, **TINY)
    finally:
        logger.removeHandler(handler)


def test_sighup_writes_a_checkpoint_and_stops(tmp_path, tiny_data):
    """A closed terminal (SIGHUP) stops like SIGTERM: a checkpoint, not a dead run."""
    workdir = str(tmp_path / "sighup")
    result = train_signalled_at_start(workdir, tiny_data, signal.SIGHUP)
    assert result.interrupted and int(result.state.step) == 2  # one chunk
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]


def test_a_second_signal_exits_at_once_saying_nothing_more_was_saved():
    code = (
        "import os, signal, time\n"
        "from diffusion_jax import hooks\n"
        "with hooks.StopFlag() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    assert stop.signal == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - start < 20
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "nothing more was saved" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_during_training_checkpoints_the_step_reached(tmp_path):
    """The default preset's structure (50 steps per dispatch, fori_loop), tiny network: a
    SIGTERM while dispatches run stops within seconds, with a checkpoint at the step reached."""
    workdir = str(tmp_path / "run")
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from diffusion_jax import training\n"
        f"training.train({workdir!r}, preset='tiny', progress=False, tensorboard=False,\n"
        "    overrides=dict(num_steps=100000, steps_per_dispatch=50, log_every=100000,\n"
        "                   checkpoint_every=100000, sample_every=0))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # (until training has started: signals are caught from there)
        if line.startswith("INFO:diffusion_jax.training:training"):
            break
    time.sleep(8)  # (compiled by now: dispatches of up to 50 steps are running)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    # (generous: on a loaded machine the signal may arrive while the step still compiles)
    assert time.monotonic() - sent < 45, out[-2000:]
    assert proc.returncode == 0, out[-2000:]
    assert "stopped by signal 15" in out and "checkpoint written" in out, out
    step = int(out.split("stopped by signal 15 at step ")[1].split(";")[0])
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]


def test_damaged_metrics_lines_are_dropped_with_a_backup(tmp_path, caplog):
    """Bad bytes in metrics.jsonl do not block a resume, and nothing is lost silently: the file
    as it was is kept as metrics.jsonl.bak and a warning names both."""
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0}).encode() + b"\n" for s in (1, 2, 3)]
    original = good[0] + b"\xff\xfe garbage\n" + good[1] + good[2]
    path.write_bytes(original)
    with caplog.at_level(logging.WARNING):
        hooks.drop_records_after(str(path), 2)
    assert path.read_bytes() == good[0] + good[1]
    assert (tmp_path / "metrics.jsonl.bak").read_bytes() == original
    assert str(path) in caplog.text and "metrics.jsonl.bak" in caplog.text
    # damaged again: the first backup is kept, the second goes beside it
    second = good[0] + b"cut sh"
    path.write_bytes(second)
    hooks.drop_records_after(str(path), 2)
    assert (tmp_path / "metrics.jsonl.bak").read_bytes() == original
    assert (tmp_path / "metrics.jsonl.bak1").read_bytes() == second


def test_no_checkpoint_yet_is_said_in_words():
    class NoSteps:
        def latest_step(self):
            return None

    assert "None" not in training._last_good(NoSteps())
    assert "no checkpoint has been saved yet" in training._last_good(NoSteps())


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_stop_signals(sig):
    assert getattr(signal, sig) in hooks.STOP_SIGNALS


def test_on_the_cpu_each_dispatch_is_one_straight_line_step(monkeypatch, tmp_path, straight_run,
                                                           tiny_data):
    """XLA:CPU runs the loop program's convolution gradients ~25x slower, so on the CPU training
    dispatches single straight-line steps (a one-step dispatch of the default preset inside the
    loop did not end within 4 minutes here) unless $DIFFUSION_JAX_CPU_STEP_LOOP is 1, as in these
    tests; both programs train to the same parameters."""
    from diffusion_jax import sharding

    mesh = sharding.data_mesh()
    assert dispatch.loop_steps(get_config("mnist"), mesh) == 50  # (the tests keep the loop)
    monkeypatch.delenv(dispatch.CPU_LOOP_ENV)
    assert dispatch.loop_steps(get_config("mnist"), mesh) == 1
    assert dispatch.loop_steps(get_config("cpu"), mesh) == 1

    _, looped = straight_run  # the same tiny run, 8 steps through the fori_loop program
    straight = training.train(str(tmp_path / "straight"), dataset=tiny_data, **TINY)
    assert int(straight.state.step) == int(looped.state.step) == 8
    for a, b in zip(jax.tree_util.tree_leaves(straight.state.params),
                    jax.tree_util.tree_leaves(looped.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
