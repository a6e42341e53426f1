"""Configuration as data: one frozen dataclass, named presets, and command-line overrides.

``get_config("cpu", lr=1e-3)`` gives a validated :class:`Config`; :func:`add_config_flags` and
:func:`config_from_flags` expose every field as ``--field value`` on the command line. The
resolved config is stored with every checkpoint (:func:`to_dict` / :func:`from_dict`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from typing import Any

from diffusion_jax import datasets
from diffusion_jax.cli import list_type
from diffusion_jax.diffusion import PREDICTIONS
from diffusion_jax.losses import LOSS_TYPES, WEIGHTINGS, check_loss_config
from diffusion_jax.models import NETWORKS
from diffusion_jax.schedules import SCHEDULES
from diffusion_jax.solvers import TRAINED

DATASETS = datasets.DATASETS  # the registries: datasets.REGISTRY, models.NETWORKS
MODELS = tuple(NETWORKS)
DTYPES = ("float32", "bfloat16")


# jax.random.PRNGKey keeps only the low 32 bits of a larger seed (seed 2**32 is seed 0) and
# overflows at 2**63, so a seed is an unsigned 32-bit integer.
SEED_MAX = 2**32 - 1
# counts and sizes end up in int32 arrays (the step counter, timesteps, indices)
INT_MAX = 2**31 - 1

# Every integer field: (smallest, largest) allowed value.
INT_RANGES: dict[str, tuple[int, int]] = {
    "image_size": (0, INT_MAX),  # 0 = native size
    "channels": (1, INT_MAX),
    "num_res_blocks": (0, INT_MAX),  # 0: no block on the way down, one on the way up
    "num_heads": (1, INT_MAX),
    "num_groups": (1, INT_MAX),
    "patch_size": (1, INT_MAX),
    "mlp_hidden": (1, INT_MAX),
    "mlp_layers": (1, INT_MAX),  # the time and class reach the MLP only through its layers
    "num_timesteps": (1, INT_MAX),
    "batch_size": (1, INT_MAX),
    "num_steps": (1, INT_MAX),
    "warmup_steps": (0, INT_MAX),
    "max_nonfinite_steps": (1, INT_MAX),
    "seed": (0, SEED_MAX),
    "steps_per_dispatch": (1, INT_MAX),
    "log_every": (1, INT_MAX),
    "sample_every": (0, INT_MAX),  # 0 = never
    "checkpoint_every": (1, INT_MAX),
    "keep_every": (0, INT_MAX),  # 0 = keep none for good
    "sample_steps": (1, INT_MAX),
}

# Every float field: (low, high, low_open, high_open); NaN and infinity are never allowed.
FLOAT_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "dropout": (0.0, 1.0, False, True),
    "min_snr_gamma": (0.0, math.inf, True, True),
    "p_uncond": (0.0, 1.0, False, True),
    "lr": (0.0, math.inf, True, True),
    "weight_decay": (0.0, math.inf, False, True),
    "grad_clip": (0.0, math.inf, True, True),  # the largest global gradient norm
    "ema_decay": (0.0, 1.0, False, True),
    "guidance": (0.0, math.inf, False, True),
}


def check_int(name: str, value, low: int, high: int) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return int(value)


def check_seed(value, name: str = "seed") -> int:
    """A seed for ``jax.random.PRNGKey``: an integer in [0, 2**32 - 1]."""
    return check_int(name, value, 0, SEED_MAX)


def check_float(
    name: str,
    value,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """``value`` as a float; ValueError naming ``name`` and the allowed range unless it is a
    finite number in the interval (``low_open``/``high_open``: that end excluded)."""
    if math.isinf(low) and math.isinf(high):
        allowed = "a finite number"
    elif math.isinf(high):
        allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif math.isinf(low):
        allowed = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (low < value if low_open else low <= value)
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


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
        return datasets.get(self.dataset).num_classes

    def validate(self) -> Config:
        """Raise ValueError naming the field and the allowed values if anything is off."""
        for field in dataclasses.fields(self):
            check_field(field.name, getattr(self, field.name))
        if self.sample_steps > self.num_timesteps:
            raise ValueError(
                f"sample_steps ({self.sample_steps}) cannot exceed num_timesteps "
                f"({self.num_timesteps})"
            )
        spec = datasets.get(self.dataset)
        if spec.needs_data_dir and not self.data_dir:
            raise ValueError(f"dataset={spec.name!r} needs --data_dir, {spec.needs_data_dir}")
        if NETWORKS[self.model].module.input_kind != spec.kind:
            raise ValueError(pairings())
        check_loss_config(self.prediction, self.loss_type, self.weighting)  # the pairings
        return self


def pairings() -> str:
    """Which data go with which networks, e.g. "toy2d data goes with model='mlp', images with
    model='unet'" (from the registries: each data set's kind, each network's input kind)."""
    parts = []
    for kind, about in datasets.KINDS.items():
        names = "/".join(s.name for s in datasets.REGISTRY.values() if s.kind == kind)
        nets = " or ".join(repr(n) for n, e in NETWORKS.items() if e.module.input_kind == kind)
        what = about.noun.format(names=names)
        parts.append(f"{what} {'' if parts else 'goes '}with model={nets}")
    return ", ".join(parts)


CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS,
    "model": MODELS,
    "dtype": DTYPES,
    "schedule": SCHEDULES,
    "prediction": PREDICTIONS,
    "loss_type": LOSS_TYPES,
    "weighting": WEIGHTINGS,
    "sampler": TRAINED,  # (a training run samples with these)
}


def check_field(name: str, value) -> None:
    """Raise ValueError naming the field and the allowed values unless ``value`` is one that
    field ``name`` may take on its own (:meth:`Config.validate` adds the checks across fields)."""
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {CHOICES[name]}, got {value!r}")
    elif name in INT_RANGES:
        check_int(name, value, *INT_RANGES[name])
    elif name in FLOAT_RANGES:
        check_float(name, value, *FLOAT_RANGES[name])
    elif name in ("channel_mults", "attention_resolutions"):
        if not isinstance(value, tuple | list) or (name == "channel_mults" and not value):
            raise ValueError(
                f"{name} must be a {'non-empty ' if name == 'channel_mults' else ''}"
                f"comma-separated list of integers >= 1, got {value!r}"
            )
        for v in value:
            check_int(f"every entry of {name}", v, 1, INT_MAX)
    elif name == "data_dir":
        if not isinstance(value, str):
            raise ValueError(f"data_dir must be a path (a string), got {value!r}")
    else:
        raise ValueError(f"unknown config field {name!r}")


def check_overrides(overrides: dict[str, Any]) -> None:
    """:func:`check_field` for each override: what can be refused before a run's saved config
    is read (train.py does this before it creates the workdir)."""
    for name, value in overrides.items():
        check_field(name, value)


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
    # "mnist" for a GPU (expected, unmeasured): bf16 activations, 4x the batch to fill the chip,
    # lr x2 (square-root scaling), as many images seen (7,500 x 512 = 30,000 x 128)
    "mnist_gpu": dict(dtype="bfloat16", batch_size=512, lr=4e-4, num_steps=7500, warmup_steps=250),
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


def _ints_flag(name: str):
    """The flag type of tuple field ``name``: comma-separated integers; a text of nothing but
    commas and spaces is the empty tuple (``--attention_resolutions ""``: no attention)."""
    parse = list_type(int, name=f"--{name}", example="1,2,2" if name == "channel_mults" else "7")

    def ints(text: str) -> tuple[int, ...]:
        return tuple(parse(text)) if text.replace(",", "").strip() else ()

    return ints


# Config's fields fall into these sections, in field order, each starting at the named field.
# The dataclass stays flat (config.json, old checkpoints and the flags all use plain field
# names); the sections group ``--help`` and the docs.
_SECTION_STARTS = {
    "dataset": "data",
    "model": "model",
    "schedule": "diffusion",
    "batch_size": "optimisation",
    "steps_per_dispatch": "loop",
    "sampler": "sampling",
}


def sections() -> dict[str, tuple[str, ...]]:
    """{section: its field names}: data, model, diffusion, optimisation, loop, sampling."""
    out: dict[str, list[str]] = {}
    section = None
    for field in dataclasses.fields(Config):
        section = _SECTION_STARTS.get(field.name, section)
        out.setdefault(section, []).append(field.name)
    return {k: tuple(v) for k, v in out.items()}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field`` flag per Config field (default: the preset's value), grouped by
    :func:`sections`, plus ``--preset``."""
    parser.add_argument(
        "--preset",
        default=None,
        choices=tuple(PRESETS),
        help="named configuration to start from (default: mnist for a new run, "
        "the saved config when resuming)",
    )
    groups = {
        name: parser.add_argument_group(f"config: {name} (default: the preset's value)")
        for name in sections()
    }
    section_of = {f: name for name, fields in sections().items() for f in fields}
    for field in dataclasses.fields(Config):
        group = groups[section_of[field.name]]
        kind = field.type if isinstance(field.type, type) else str(field.type)
        if "tuple" in str(kind):
            parse = _ints_flag(field.name)
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
