"""Presets, overrides, serialisation and resume conflicts."""

import argparse
import dataclasses
import math

import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import datasets, models
from diffusion_jax.runs import ConfigConflictError, resolve_config


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


@pytest.mark.parametrize("dataset", config_lib.DATASETS)
@pytest.mark.parametrize("model", config_lib.MODELS)
def test_data_sets_and_networks_pair_by_kind_from_the_registries(dataset, model):
    """Every data set and network name comes from its registry; a pairing is valid exactly when
    the network's input kind is the data set's kind, and the class count is the data set's."""
    spec = datasets.get(dataset)
    kw = dict(dataset=dataset, model=model, data_dir="somewhere")
    if models.NETWORKS[model].module.input_kind == spec.kind:
        assert config_lib.get_config("mnist", **kw).num_classes == spec.num_classes
    else:
        with pytest.raises(ValueError, match="toy2d data goes with model='mlp', images with"):
            config_lib.get_config("mnist", **kw)
    assert config_lib.DATASETS == tuple(datasets.REGISTRY)
    assert config_lib.MODELS == tuple(models.NETWORKS)


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


def numeric_fields():
    return [f.name for f in dataclasses.fields(config_lib.Config) if f.type in ("int", "float")]


def test_every_numeric_field_has_a_range():
    assert set(numeric_fields()) == set(config_lib.INT_RANGES) | set(config_lib.FLOAT_RANGES)


@pytest.mark.parametrize("name", numeric_fields())
def test_every_numeric_field_refuses_non_finite_and_wrong_types(name):
    """NaN, infinities, booleans and strings are refused in every numeric field, as are
    fractions in the integer ones, with the field's name in the message."""
    bad = [math.nan, math.inf, -math.inf, True, "1"]
    if name in config_lib.INT_RANGES:
        bad.append(1.5)
    for value in bad:
        with pytest.raises(ValueError, match=rf"^(every entry of )?{name} must be"):
            config_lib.get_config("tiny", **{name: value})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=0.0), r"lr must be a finite number > 0, got 0.0"),
        (dict(lr=-1e-3), r"lr must be a finite number > 0"),
        (dict(grad_clip=0.0), r"grad_clip must be a finite number > 0"),
        (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0"),
        (dict(guidance=math.inf), r"guidance must be a finite number >= 0, got inf"),
        (dict(min_snr_gamma=math.inf), r"min_snr_gamma must be a finite number > 0"),
        (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\), got 1.0"),
        (dict(dropout=math.nan), r"dropout must be in \[0, 1\), got nan"),
        (dict(seed=-1), r"seed must be >= 0, got -1"),
        (dict(seed=2**32), r"seed must be <= 4294967295"),  # PRNGKey would make it seed 0
        (dict(seed=2**63), r"seed must be <= 4294967295"),  # PRNGKey would overflow
        (dict(num_steps=2**31), r"num_steps must be <= 2147483647"),
        (dict(batch_size=16.0), r"batch_size must be an integer in \[1, 2147483647\]"),
        (dict(mlp_layers=0), r"mlp_layers must be >= 1"),
        (dict(num_res_blocks=-1), r"num_res_blocks must be >= 0"),
        (dict(image_size=-8), r"image_size must be >= 0"),
        (dict(channel_mults=()), r"channel_mults must be a non-empty"),
        (dict(channel_mults=(1, 0)), r"every entry of channel_mults must be >= 1"),
        (dict(attention_resolutions=(7.5,)), r"every entry of attention_resolutions must be"),
        (dict(data_dir=None), r"data_dir must be a path"),
    ],
)
def test_out_of_range_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        config_lib.get_config("tiny", **kw)


def test_the_ends_of_the_ranges_and_old_configs_still_load():
    """The extremes that are allowed, and a saved config whose float fields were written as
    integers (JSON keeps 1 as 1), load as before."""
    config_lib.get_config("tiny", seed=2**32 - 1, num_res_blocks=0, guidance=0.0, keep_every=0)
    config_lib.get_config("tiny", weight_decay=0.0, p_uncond=0.0, ema_decay=0.0, image_size=0)
    saved = config_lib.to_dict(config_lib.get_config("cpu"))
    saved.update(lr=1, guidance=2, grad_clip=1, weight_decay=0, min_snr_gamma=5)
    cfg = config_lib.from_dict(saved)
    assert cfg.lr == 1 and cfg.guidance == 2
    saved.update(seed=2**32)
    with pytest.raises(ValueError, match="seed must be <= 4294967295"):
        config_lib.from_dict(saved)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["--ema_decay", "inf"], r"ema_decay must be in \[0, 1\)"),
        (["--guidance=-inf"], "guidance must be a finite number >= 0"),
        (["--seed", "18446744073709551616"], "seed must be <= 4294967295"),
        (["--channel_mults", "1,-2"], "every entry of channel_mults must be >= 1"),
    ],
)
def test_non_finite_and_out_of_range_flags(flags, match):
    parser = argparse.ArgumentParser()
    config_lib.add_config_flags(parser)
    overrides = config_lib.config_overrides(parser.parse_args(flags))
    with pytest.raises(ValueError, match=match):
        config_lib.get_config("tiny", **overrides)


def test_sections_cover_every_field_once_in_order_and_group_the_help():
    sections = config_lib.sections()
    assert list(sections) == ["data", "model", "diffusion", "optimisation", "loop", "sampling"]
    flat = [name for fields in sections.values() for name in fields]
    assert flat == [f.name for f in dataclasses.fields(config_lib.Config)]
    assert sections["data"] == ("dataset", "data_dir", "image_size")
    assert sections["sampling"] == ("sampler", "sample_steps", "guidance")
    parser = argparse.ArgumentParser()
    config_lib.add_config_flags(parser)
    titles = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert titles["config: optimisation (default: the preset's value)"] == list(
        sections["optimisation"]
    )
    # the flags stay flat: one per field, by its own name
    args = parser.parse_args(["--lr", "0.01", "--sampler", "ddim"])
    assert config_lib.config_overrides(args) == {"lr": 0.01, "sampler": "ddim"}


def test_tuple_flags_name_themselves_and_commas_alone_are_empty():
    parser = argparse.ArgumentParser()
    config_lib.add_config_flags(parser)
    for text in ("", ",", " , "):
        args = parser.parse_args(["--attention_resolutions", text])
        assert config_lib.config_overrides(args) == {"attention_resolutions": ()}
    assert parser.parse_args(["--channel_mults", "1,2"]).channel_mults == (1, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--channel_mults", "1,x"])
    with pytest.raises(argparse.ArgumentTypeError, match="--channel_mults takes comma-sep"):
        config_lib._ints_flag("channel_mults")("1,x")


def test_gpu_preset_is_mnist_in_bfloat16_with_a_larger_batch():
    """mnist_gpu: the mnist network, bf16 activations, batch 512, same images seen."""
    from diffusion_jax.config import get_config

    gpu, base = get_config("mnist_gpu"), get_config("mnist")
    assert gpu.dtype == "bfloat16" and gpu.batch_size == 512
    assert gpu.channels == base.channels and gpu.num_steps * 512 == base.num_steps * 128
