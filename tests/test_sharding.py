"""Data-parallel training and sampling over several devices, and over two processes.

Each configuration runs in its own subprocess, since the device count (and the distributed
runtime) is fixed when jax starts. The model is the toy2d MLP, so compiling is quick.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# argv: workdir, devices per process, data shards, [coordinator, num_processes, process_id]
SCRIPT = textwrap.dedent(
    """
    import sys, json, jax, numpy as np
    from diffusion_jax import generation, sharding, training
    workdir, devices, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if len(sys.argv) > 4:
        sharding.initialize_distributed(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    assert len(jax.local_devices()) == devices, jax.local_devices()
    overrides = dict(num_steps=6, steps_per_dispatch=3, log_every=3, checkpoint_every=6,
                     batch_size=64, mlp_hidden=32, mlp_layers=2, num_timesteps=50)
    result = training.train(workdir, preset="toy2d", overrides=overrides, progress=False,
                            log=print, data_shards=shards)
    # 9 samples: padded to a multiple of the device count, then cut back
    samples = generation.generate(result.config, training.models.build_model(result.config),
                                  result.state.ema_params, (2,), np.arange(9) % 5,
                                  jax.random.PRNGKey(3), steps=10, w=1.0)
    out = {"samples": sharding.to_host(samples.samples).tolist(),
           "params": [np.asarray(x).tolist() for x in
                      jax.tree_util.tree_leaves(result.state.params)]}
    with open(f"{workdir}.{jax.process_index()}.json", "w") as f:
        json.dump(out, f)
    """
)


def launch(workdir, devices, shards, *distributed):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    args = [sys.executable, "-c", SCRIPT, workdir, str(devices), str(shards), *distributed]
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def run(tmp_path, name, devices, shards=1):
    workdir = str(tmp_path / name)
    finish(launch(workdir, devices, shards))
    return read(workdir, 0)


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


def test_eight_devices_match_one(tmp_path):
    """Same losses, parameters and samples (9, padded to 16 over 8 devices) as one device."""
    assert_same(run(tmp_path, "dev1", 1), run(tmp_path, "dev8", 8))


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_two_shards(tmp_path):
    """Two CPU processes (jax.distributed on localhost, gloo collectives), each holding its own
    half of the data on its one device, against one process whose two devices hold the same two
    halves: the same losses, parameters and samples. Only process 0 writes the metrics."""
    workdir = str(tmp_path / "multi")
    coordinator = f"localhost:{free_port()}"
    procs = [launch(workdir, 1, 2, coordinator, "2", str(i)) for i in range(2)]
    outputs = [finish(p) for p in procs]
    printed = [
        [line for line in out.splitlines() if not line.startswith("[Gloo]")] for out in outputs
    ]
    assert "training mlp on toy2d" in printed[0][0] and printed[1] == []  # process 0 logs
    multi = read(workdir, 0)
    np.testing.assert_array_equal(read(workdir, 1)[2], multi[2])  # both gathered all samples
    assert_same(run(tmp_path, "shards2", 2, shards=2), multi)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]
    assert not os.path.exists(os.path.join(workdir, ".train.lock"))


def test_one_shard_per_process_is_balanced():
    from diffusion_jax import data

    rows = [data.shard_rows(10, s, 3) for s in range(3)]
    assert [r.tolist() for r in rows] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_batch_and_shards_must_divide_over_devices():
    from diffusion_jax import sharding

    class EightDevices:  # the checks only count the mesh's devices
        devices = np.empty(8, object)

    sharding.check_batch_size(16, EightDevices())
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        sharding.check_batch_size(12, EightDevices())
    sharding.check_num_shards(4, EightDevices())
    with pytest.raises(ValueError, match="must divide the 8 devices"):
        sharding.check_num_shards(3, EightDevices())
