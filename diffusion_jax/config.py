"""Configuration as data: one frozen dataclass, named presets, and command-line overrides.

``get_config("cpu", lr=1e-3)`` gives a validated :class:`Config`; :func:`add_config_flags` and
:func:`config_from_flags` expose every field as ``--field value`` on the command line. The
resolved config is stored with every checkpoint (:func:`to_dict` / :func:`from_dict`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from diffusion_jax.diffusion import PREDICTIONS
from diffusion_jax.losses import LOSS_TYPES, WEIGHTINGS, check_loss_config
from diffusion_jax.samplers import METHODS
from diffusion_jax.schedules import SCHEDULES

DATASETS = ("mnist", "fashion_mnist", "mnist5k", "idx", "toy2d")
MODELS = ("unet", "mlp")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Config:
    # data
    dataset: str = "mnist"
    data_dir: str = ""  # IDX folder for dataset="idx"; tfds data_dir otherwise ("" = default)
    image_size: int = 0  # 0 = native size; otherwise images are resized (tests use 8 or 16)
    # model
    model: str = "unet"
    channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 4
    dropout: float = 0.1
    num_groups: int = 8
    patch_size: int = 1  # U-Net on p x p patches folded into channels (see unet.UNet)
    mlp_hidden: int = 256
    mlp_layers: int = 4
    dtype: str = "float32"  # activation dtype; parameters and sampler arithmetic stay float32
    # diffusion
    schedule: str = "cosine"
    num_timesteps: int = 1000
    prediction: str = "eps"
    loss_type: str = "l2"
    weighting: str = "simple"
    min_snr_gamma: float = 5.0  # used by weighting="min_snr"
    p_uncond: float = 0.1
    # optimisation
    batch_size: int = 128
    num_steps: int = 30_000
    lr: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    max_nonfinite_steps: int = 50  # consecutive skipped (non-finite) updates before stopping
    seed: int = 0
    # loop
    steps_per_dispatch: int = 50
    log_every: int = 100
    sample_every: int = 5000  # 0 = never write sample grids during training
    checkpoint_every: int = 1000
    keep_every: int = 10_000  # checkpoints at multiples of this are kept for good
    # sampling defaults (for training-time grids and sample.py)
    sampler: str = "ddim"
    sample_steps: int = 100
    guidance: float = 1.0

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def num_classes(self) -> int:
        return 5 if self.dataset == "toy2d" else 10

    def validate(self) -> Config:
        """Raise ValueError naming the field and the allowed values if anything is off."""
        choices = {
            "dataset": DATASETS,
            "model": MODELS,
            "dtype": DTYPES,
            "schedule": SCHEDULES,
            "prediction": PREDICTIONS,
            "loss_type": LOSS_TYPES,
            "weighting": WEIGHTINGS,
            "sampler": METHODS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = (
            "channels",
            "num_timesteps",
            "batch_size",
            "num_steps",
            "steps_per_dispatch",
            "log_every",
            "checkpoint_every",
            "sample_steps",
            "num_heads",
            "num_groups",
            "patch_size",
            "mlp_hidden",
            "max_nonfinite_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "keep_every", "warmup_steps", "image_size", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sample_steps > self.num_timesteps:
            raise ValueError(
                f"sample_steps ({self.sample_steps}) cannot exceed num_timesteps "
                f"({self.num_timesteps})"
            )
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.dataset == "idx" and not self.data_dir:
            raise ValueError("dataset='idx' needs --data_dir, the folder holding the IDX files")
        if (self.dataset == "toy2d") != (self.model == "mlp"):
            raise ValueError("toy2d data goes with model='mlp', images with model='unet'")
        check_loss_config(self.prediction, self.loss_type, self.weighting)  # the pairings
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        return self


# Chosen by benchmarks/quality_vs_time.py (docs/BENCHMARKS.md): at equal CPU-minutes, a U-Net on
# 2x2 patches (no convolution on the 28x28 grid, where XLA:CPU is slowest) with v-prediction and
# min-SNR-5 weighting beat the plain 16-channel U-Net with eps and uniform weighting.
_CPU = dict(
    dataset="mnist5k",
    patch_size=2,
    channels=32,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(),
    num_groups=8,
    dropout=0.0,
    prediction="v",
    weighting="min_snr",
    batch_size=64,
    num_steps=5200,  # 3.1 steps/s measured on two quiet cores: about 28 minutes
    lr=1e-3,
    warmup_steps=100,
    ema_decay=0.995,
    steps_per_dispatch=1,  # see training.make_train_steps: XLA:CPU loops are slow
    log_every=50,
    sample_every=2000,
    checkpoint_every=500,
    keep_every=2000,
    sample_steps=50,
)

PRESETS: dict[str, dict[str, Any]] = {
    # the GPU default, sized for quality
    "mnist": {},
    # a CPU run on mnist5k: sized for 30 minutes on two quiet cores (docs/RESULTS.md)
    "cpu": _CPU,
    "fashion_mnist": dict(dataset="fashion_mnist", channels=96, num_steps=50_000),
    "toy2d": dict(
        dataset="toy2d",
        model="mlp",
        batch_size=512,
        num_steps=6000,
        lr=1e-3,
        warmup_steps=100,
        ema_decay=0.999,
        dropout=0.0,
        steps_per_dispatch=100,
        log_every=200,
        sample_every=0,
        checkpoint_every=1000,
        keep_every=0,
        sample_steps=50,
        guidance=0.0,
    ),
    # for tests: a few thousand parameters on 8x8 images, compiles in seconds on a CPU
    "tiny": dict(
        dataset="mnist5k",
        image_size=8,
        channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        num_heads=1,
        num_groups=4,
        dropout=0.0,
        num_timesteps=20,
        batch_size=16,
        num_steps=8,
        lr=1e-3,
        warmup_steps=2,
        ema_decay=0.9,
        steps_per_dispatch=2,
        log_every=2,
        sample_every=0,
        checkpoint_every=4,
        keep_every=0,
        sample_steps=5,
    ),
}

# Fields that may differ between a checkpoint and a resumed run without changing the result's
# mathematics (where and how often things are logged, sampling defaults). keep_every is not one:
# Orbax re-decides at every save which checkpoints to keep, so changing it could delete some.
OPERATIONAL_FIELDS = frozenset(
    {
        "data_dir",
        "log_every",
        "sample_every",
        "checkpoint_every",
        "sampler",
        "sample_steps",
        "guidance",
        "max_nonfinite_steps",
    }
)


def math_part(config: Config) -> Config:
    """``config`` with the operational fields reset to their defaults: two configs with equal
    math parts train identically (used as a compilation cache key)."""
    defaults = Config()
    return dataclasses.replace(config, **{k: getattr(defaults, k) for k in OPERATIONAL_FIELDS})


def get_config(preset: str = "mnist", **overrides) -> Config:
    """The preset ``preset`` with ``overrides`` applied, validated."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    return Config(**{**PRESETS[preset], **overrides}).validate()


def to_dict(config: Config) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def from_dict(d: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict`; unknown keys raise ValueError (a newer or foreign file)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}).validate()


def differences(a: Config, b: Config, ignore=OPERATIONAL_FIELDS) -> dict[str, tuple[Any, Any]]:
    """Fields (outside ``ignore``) whose values differ: {name: (a's, b's)}."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k: (da[k], db[k]) for k in da if k not in ignore and da[k] != db[k]}


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field`` flag per Config field (default: the preset's value) plus ``--preset``."""
    parser.add_argument(
        "--preset",
        default=None,
        choices=tuple(PRESETS),
        help="named configuration to start from (default: mnist for a new run, "
        "the saved config when resuming)",
    )
    group = parser.add_argument_group("config overrides (default: the preset's value)")
    for field in dataclasses.fields(Config):
        kind = field.type if isinstance(field.type, type) else str(field.type)
        if "tuple" in str(kind):
            parse = _parse_ints
        elif kind in ("int", int):
            parse = int
        elif kind in ("float", float):
            parse = float
        else:
            parse = str
        group.add_argument(f"--{field.name}", type=parse, default=None, metavar=field.name.upper())


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given explicitly on the command line."""
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
