"""Data-parallel training and sampling over several devices, and over two processes.

Each configuration runs in its own subprocess, since the device count (and the distributed
runtime) is fixed when jax starts. The model is the toy2d MLP, so compiling is quick.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

# argv: workdir, devices per process, data shards, [coordinator, num_processes, process_id]
SCRIPT = textwrap.dedent(
    """
    import sys, json, jax, numpy as np
    from diffusion_jax import cli, generation, models, samplers, sharding, training
    cli.setup_logging()  # the library's messages on stdout, as train.py shows them
    from diffusion_jax.schedules import respace
    workdir, devices, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if len(sys.argv) > 4:
        sharding.initialize_distributed(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    assert len(jax.local_devices()) == devices, jax.local_devices()
    overrides = dict(num_steps=6, steps_per_dispatch=3, log_every=3, checkpoint_every=6,
                     batch_size=64, mlp_hidden=32, mlp_layers=2, num_timesteps=50)
    result = training.train(workdir, preset="toy2d", overrides=overrides, progress=False,
                            data_shards=shards)
    # 9 samples: padded to a multiple of the device count, then cut back
    model, mesh = models.build_model(result.config), sharding.data_mesh()
    samples = generation.generate(result.config, model, result.state.ema_params, (2,),
                                  np.arange(9) % 5, jax.random.PRNGKey(3),
                                  dict(steps=10, w=1.0), mesh=mesh)
    out = {"samples": sharding.to_host(samples.samples).tolist(),
           "params": [np.asarray(x).tolist() for x in
                      jax.tree_util.tree_leaves(result.state.params)]}
    if jax.process_count() == 1:  # per-sample w and snapshots, with and without the mesh
        kw = dict(num_classes=5, labels=np.arange(9) % 5, w=np.linspace(0, 2, 9),
                  solver="ddpm", num_snapshots=3)
        args = (models.denoiser(model), result.state.ema_params, respace("cosine", 50, 10),
                jax.random.PRNGKey(4), (9, 2))
        one, split = samplers.sample(*args, **kw), samplers.sample(*args, mesh=mesh, **kw)
        assert split.snapshots.shape == (3, 9, 2), split.snapshots.shape
        np.testing.assert_allclose(split.snapshots, one.snapshots, rtol=1e-4, atol=1e-5)
    with open(f"{workdir}.{jax.process_index()}.json", "w") as f:
        json.dump(out, f)
    """
)


def launch(tmp_path, name, devices, script_args):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",  # as conftest.py: tiny programs compile faster
    }
    # output to files, not pipes: one chatty process must not block on a pipe nobody reads
    log = open(tmp_path / f"{name}.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", *script_args], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return proc, log


def finish(*launched):
    """Wait for all; their output (without gloo's connection messages). Kills the others if
    one fails."""
    outputs = []
    try:
        for proc, log in launched:
            proc.wait(timeout=300)
            log.seek(0)
            text = log.read()
            assert proc.returncode in (0, 130), text[-3000:]
            outputs.append((proc.returncode, [ln for ln in text.splitlines() if "Gloo" not in ln]))
    finally:
        for proc, log in launched:
            proc.kill()
            log.close()
    return outputs


def train(tmp_path, name, devices, shards=1, distributed=()):
    workdir = str(tmp_path / name)
    if not distributed:
        finish(launch(tmp_path, name, devices, [SCRIPT, workdir, str(devices), str(shards)]))
        return read(workdir, 0)
    coordinator = f"localhost:{free_port()}"
    args = [SCRIPT, workdir, str(devices), str(shards), coordinator, str(distributed)]
    outputs = finish(
        *[launch(tmp_path, f"{name}{i}", devices, [*args, str(i)]) for i in range(distributed)]
    )
    return [read(workdir, i) for i in range(distributed)], outputs


def read(workdir, process):
    with open(f"{workdir}.{process}.json") as f:
        out = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    return np.array(losses), [np.array(p) for p in out["params"]], np.array(out["samples"])


def assert_same(a, b):
    (loss_a, params_a, samples_a), (loss_b, params_b, samples_b) = a, b
    assert len(loss_a) == 2  # steps 3 and 6, each written once
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-4)
    for x, y in zip(params_a, params_b, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-5)
    assert samples_a.shape == (9, 2) and np.std(samples_a) > 0.05
    np.testing.assert_allclose(samples_b, samples_a, rtol=1e-3, atol=1e-4)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_eight_devices_match_one(tmp_path):
    """Same losses, parameters and samples (9, padded to 16 over 8 devices) as one device."""
    assert_same(train(tmp_path, "dev1", 1), train(tmp_path, "dev8", 8))


def test_two_processes_match_one_process_with_two_shards(tmp_path):
    """Two CPU processes (jax.distributed on localhost, gloo collectives) with two devices each,
    each process holding its own half of the data, against one process whose two devices hold
    the same two halves: the same losses, parameters and samples. Only process 0 writes."""
    (multi, multi1), outputs = train(tmp_path, "multi", 2, shards=2, distributed=2)
    # process 0 logs; process 1 prints nothing of ours (gloo's threads print interleaved lines)
    assert "training mlp on toy2d" in "\n".join(outputs[0][1])
    assert "training" not in "\n".join(outputs[1][1])
    np.testing.assert_array_equal(multi1[2], multi[2])  # both gathered all the samples
    assert_same(train(tmp_path, "shards2", 2, shards=2), multi)
    workdir = tmp_path / "multi"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]
    assert not (workdir / ".train.lock").exists() and not (workdir / ".shared_check").exists()


# argv: workdir, coordinator ("-": one process with two devices), process id, stop_after
# ("0": none; process 1 is then sent SIGTERM once training is under way), log_every
STOP_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time, jax, numpy as np
    from diffusion_jax import cli, sharding, training
    cli.setup_logging()
    workdir, coordinator, process, stop_after, log_every = sys.argv[1:6]
    if coordinator != "-":
        sharding.initialize_distributed(coordinator, 2, int(process))
    def signal_once_training():  # the first metrics show training is under way
        while not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
    if stop_after == "0" and jax.process_index() == 1:
        threading.Thread(target=signal_once_training, daemon=True).start()
    overrides = dict(num_steps=100_000, steps_per_dispatch=1, log_every=int(log_every),
                     mlp_hidden=32, mlp_layers=2, num_timesteps=50, batch_size=64,
                     checkpoint_every=100_000)
    result = training.train(workdir, preset="toy2d", overrides=overrides, progress=False,
                            data_shards=2, stop_after=int(stop_after) or None)
    total = sum(float(np.asarray(x, np.float64).sum()) for x in jax.tree_util.tree_leaves(
        result.state.params))
    print("stopped at", int(result.state.step), result.interrupted, repr(total), flush=True)
    sys.exit(130 if result.interrupted else 0)
    """
)


def run_stop_script(tmp_path, name, stop_after, processes=2, log_every=20):
    workdir, coordinator = str(tmp_path / "stop"), f"localhost:{free_port()}"
    if processes == 1:
        workdir, coordinator = str(tmp_path / name), "-"
    outputs = finish(
        *[
            launch(
                tmp_path,
                f"{name}{i}",
                3 - processes,
                [STOP_SCRIPT, workdir, coordinator, str(i), str(stop_after), str(log_every)],
            )
            for i in range(processes)
        ]
    )
    ends = [
        [ln.split()[2:] for ln in lines if ln.startswith("stopped at")][0] for _, lines in outputs
    ]
    return workdir, outputs, ends


def test_a_signal_to_one_process_stops_both_at_the_same_step_and_they_resume(tmp_path):
    """SIGTERM to process 1 only: both stop after the same step with a checkpoint. Resumed by
    two processes for three more steps, they reach the parameters of one process (two devices,
    the same two shards) that ran straight through."""
    workdir, outputs, ends = run_stop_script(tmp_path, "stop", 0)
    assert [code for code, _ in outputs] == [130, 130], outputs
    assert ends[0] == ends[1] and ends[0][1] == "True", ends
    step = int(ends[0][0])
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
    assert f"stopped by signal {int(signal.SIGTERM)} at step {step}" in "\n".join(outputs[0][1])

    _, outputs, resumed = run_stop_script(tmp_path, "resume", step + 3)
    assert f"resumed {workdir} at step {step}" in "\n".join(outputs[0][1])
    _, _, straight = run_stop_script(tmp_path, "straight", step + 3, processes=1)
    assert resumed[0] == resumed[1] and int(resumed[0][0]) == step + 3 == int(straight[0][0])
    np.testing.assert_allclose(float(resumed[0][2]), float(straight[0][2]), rtol=1e-6)


def test_many_queued_dispatches_on_two_cpu_devices_finish(tmp_path):
    """XLA:CPU's in-process all-reduce deadlocked once ~50 dispatches of a two-device train step
    were queued (jax 0.10.2), so training on CPU devices waits for each dispatch. 150 one-step
    dispatches with no logging (no other sync) in between must finish."""
    _, outputs, ends = run_stop_script(tmp_path, "queued", 150, processes=1, log_every=1000)
    assert outputs[0][0] == 130 and ends[0][0] == "150", ends


def test_one_shard_is_the_single_device_order():
    import jax

    from diffusion_jax import data

    key = jax.random.PRNGKey(5)
    for step in (0, 7, 31):  # several epochs of 10 batches
        np.testing.assert_array_equal(
            data.shard_batch_indices(key, step, 100, 10, 1)[0],
            data.batch_indices(key, step, 100, 10),
        )
    two = np.asarray(data.shard_batch_indices(key, 3, 50, 10, 2))
    assert two.shape == (2, 5) and not np.array_equal(two[0], two[1])


def test_shards_are_disjoint_equal_and_balanced():
    from diffusion_jax import data

    labels = np.repeat(np.arange(10), 31)  # a data set stored sorted by class
    shards = [data.shard_rows(len(labels), s, 4) for s in range(4)]
    assert {len(r) for r in shards} == {len(labels) // 4}
    assert len(np.unique(np.concatenate(shards))) == 4 * (len(labels) // 4)
    for rows in shards:
        assert np.bincount(labels[rows], minlength=10).min() >= 7  # every class, about evenly


def test_batch_and_shards_must_divide_over_devices():
    from diffusion_jax import sharding

    class EightDevices:  # the checks only count the mesh's devices (and name their platform)
        devices = np.array([types.SimpleNamespace(platform="gpu")] * 8, object)

    sharding.check_batch_size(16, EightDevices())
    with pytest.raises(ValueError, match="divisible by the 8 devices") as error:
        sharding.check_batch_size(12, EightDevices())
    assert "DIFFUSION_JAX_CPU_DEVICES" not in str(error.value)
    cpu = EightDevices()
    cpu.devices = np.array([types.SimpleNamespace(platform="cpu")] * 8, object)
    with pytest.raises(ValueError, match="or set DIFFUSION_JAX_CPU_DEVICES=1: the CPU as one"):
        sharding.check_batch_size(12, cpu)
    sharding.check_num_shards(4, EightDevices())
    with pytest.raises(ValueError, match="must divide the 8 devices"):
        sharding.check_num_shards(3, EightDevices())


@pytest.mark.parametrize(
    "flags, match",
    [
        (dict(coordinator_address="h:1", num_processes=2), "go together"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"in \[0, 2\)"),
    ],
)
def test_incomplete_distributed_flags(flags, match):
    from diffusion_jax.commands import flags as command_flags

    args = argparse.Namespace(
        distributed=False, coordinator_address=None, num_processes=None, process_id=None
    )
    with pytest.raises(ValueError, match=match):
        command_flags.start_distributed(argparse.Namespace(**{**vars(args), **flags}))
