"""The shipped mnist5k checkpoint loads (EMA and config only) and samples."""

import os

import jax
import numpy as np

from diffusion_jax import generation

PRETRAINED = os.path.join(os.path.dirname(__file__), "..", "pretrained", "mnist5k_cpu")


def test_shipped_checkpoint_samples():
    ckpt = generation.load_for_sampling(PRETRAINED)
    config, model, params, shape, step = ckpt  # (a Checkpoint named tuple)
    assert ckpt.params is params and ckpt.data_shape == shape
    assert (step, shape, config.dataset) == (11000, (28, 28, 1), "mnist5k")
    assert (config.patch_size, config.prediction) == (2, "eps")
    out = generation.generate(
        config, model, params, shape, np.array([3, 7]), jax.random.PRNGKey(0), dict(steps=2)
    )
    x = np.asarray(out.samples)
    assert x.shape == (2, 28, 28, 1) and np.all(np.isfinite(x))
    assert x.min() >= -1 and x.max() <= 1
    # white strokes on a black background: most pixels near -1, unlike noise
    assert np.mean(x < -0.5) > 0.5
