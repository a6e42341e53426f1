"""Data-parallel training over 8 virtual CPU devices equals single-device training.

Each configuration runs in its own subprocess, since the device count is fixed when jax starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, json, jax, numpy as np
    from diffusion_jax import training
    assert len(jax.devices()) == int(sys.argv[2]), jax.devices()
    overrides = dict(num_steps=6, steps_per_dispatch=3, log_every=3, checkpoint_every=6,
                     batch_size=64, mlp_hidden=32, mlp_layers=2, num_timesteps=50)
    result = training.train(sys.argv[1], preset="toy2d", overrides=overrides, progress=False,
                            log=lambda *a: None)
    leaves = jax.tree_util.tree_leaves(result.state.params)
    np.savez(sys.argv[1] + ".npz", *[np.asarray(x) for x in leaves])
    losses = [json.loads(l)["loss"] for l in open(sys.argv[1] + "/metrics.jsonl")]
    print(json.dumps(losses))
    """
)


def run(tmp_path, devices):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    workdir = str(tmp_path / f"dev{devices}")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, workdir, str(devices)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    params = np.load(workdir + ".npz")
    losses = json.loads(out.stdout.strip().splitlines()[-1])
    return np.array(losses), [params[k] for k in params.files]


def test_eight_devices_match_one(tmp_path):
    loss1, params1 = run(tmp_path, 1)
    loss8, params8 = run(tmp_path, 8)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-4)
    for a, b in zip(params1, params8, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


def test_batch_must_divide_over_devices():
    from diffusion_jax import sharding

    class EightDevices:  # check_batch_size only counts the mesh's devices
        devices = np.empty(8, object)

    sharding.check_batch_size(16, EightDevices())
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        sharding.check_batch_size(12, EightDevices())
