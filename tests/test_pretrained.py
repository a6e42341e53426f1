"""The shipped mnist5k checkpoint and its distilled students load (EMA and config only) and
sample."""

import os

import jax
import numpy as np

from diffusion_jax import generation, plans

PRETRAINED = os.path.join(os.path.dirname(__file__), "..", "pretrained", "mnist5k_cpu")
DISTILLED = PRETRAINED + "_distilled"


def test_shipped_checkpoint_samples():
    ckpt = generation.load_for_sampling(PRETRAINED)
    config, model, params, shape, step, distill = ckpt  # (a Checkpoint named tuple)
    assert distill is None
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


def test_shipped_students_sample_digits_in_1_to_16_steps():
    """Each student of the shipped distillation run (32 -> 16 -> 8 -> 4 -> 2 -> 1 DDIM steps of
    the model above) loads by its step count and draws clean images, not noise."""
    for steps in (16, 8, 4, 2, 1):
        ckpt = generation.load_for_sampling(DISTILLED, steps)
        assert ckpt.distill["steps"] == steps and len(ckpt.distill["timesteps"]) == steps
        assert ckpt.config.prediction == "v" and ckpt.model.guidance_embedding
        plan = plans.for_checkpoint(ckpt, {"w": 0.5})
        assert plan.tag() == f"distilled{steps}"
        x = np.asarray(generation.generate(*ckpt[:4], np.array([3, 7]), jax.random.PRNGKey(0),
                                           plan).samples)
        assert x.shape == (2, 28, 28, 1) and np.all(np.isfinite(x))
        # white strokes on a black background: most pixels near -1, some near +1
        assert np.mean(x < -0.8) > 0.6 and np.mean(x > 0.5) > 0.05, steps



def test_distill_defaults_are_the_shipped_students_recipe():
    """``python distill.py --teacher pretrained/mnist5k_cpu`` with no other flag is the run that
    made the shipped students: its settings are the ones their distill.json records."""
    import dataclasses
    import json

    from diffusion_jax.distillation import DistillSettings

    with open(os.path.join(DISTILLED, "distill.json")) as f:
        record = json.load(f)
    defaults = json.loads(json.dumps(dataclasses.asdict(DistillSettings())))
    assert record["settings"] == defaults
    assert (record["teacher"], record["teacher_step"]) == ("pretrained/mnist5k_cpu", 11000)
