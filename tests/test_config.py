"""Presets, overrides, serialisation and resume conflicts."""

import argparse

import pytest

from diffusion_jax import config as config_lib
from diffusion_jax.training import ConfigConflictError, resolve_config


@pytest.mark.parametrize("preset", list(config_lib.PRESETS))
def test_presets_are_valid_and_round_trip(preset):
    cfg = config_lib.get_config(preset)
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


def test_command_line_overrides():
    parser = argparse.ArgumentParser()
    config_lib.add_config_flags(parser)
    args = parser.parse_args(
        [
            "--preset",
            "cpu",
            "--lr",
            "3e-4",
            "--channel_mults",
            "1,2",
            "--attention_resolutions",
            "",
            "--dataset",
            "mnist",
        ]
    )
    overrides = config_lib.config_overrides(args)
    assert overrides == {
        "lr": 3e-4,
        "channel_mults": (1, 2),
        "attention_resolutions": (),
        "dataset": "mnist",
    }
    cfg = config_lib.get_config(args.preset, **overrides)
    assert cfg.batch_size == config_lib.PRESETS["cpu"]["batch_size"] and cfg.lr == 3e-4


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dataset="cifar"), "dataset must be one of"),
        (dict(schedule="quadratic"), "schedule must be one of"),
        (dict(prediction="score"), "prediction must be one of"),
        (dict(sampler="euler"), "sampler must be one of"),
        (dict(num_timesteps=0), "num_timesteps must be >= 1"),
        (dict(sample_steps=2000), "sample_steps"),
        (dict(p_uncond=1.0), "p_uncond"),
        (dict(dataset="idx"), "--data_dir"),
        (dict(dataset="toy2d"), "toy2d data goes with model='mlp'"),
        (dict(weighting="vlb"), "prediction='mean'"),
        (dict(learning_rate=1.0), "unknown config fields"),
    ],
)
def test_bad_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        config_lib.get_config("mnist", **kw)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        config_lib.get_config("imagenet")


def test_resume_conflicts():
    saved = config_lib.get_config("tiny")
    # no flags: the saved config; operational changes are fine
    assert resolve_config(saved, None, {}) == saved
    assert resolve_config(saved, None, {"log_every": 7}).log_every == 7
    with pytest.raises(ConfigConflictError, match=r"lr: saved 0.001, requested 0.5"):
        resolve_config(saved, None, {"lr": 0.5})
    with pytest.raises(ConfigConflictError, match="keep_every"):  # could delete kept checkpoints
        resolve_config(saved, None, {"keep_every": 3})
    with pytest.raises(ConfigConflictError, match="channels"):
        resolve_config(saved, "cpu", {})
    assert resolve_config(saved, None, {"lr": 0.5}, allow_config_change=True).lr == 0.5
    assert resolve_config(None, None, {}) == config_lib.get_config("mnist")
