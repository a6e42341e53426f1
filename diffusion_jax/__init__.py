"""diffusion_jax: DDPM with classifier-free guidance in JAX/Flax.

The folder listing is the architecture:

* mathematics: ``schedules`` (noise schedules, respacing), ``diffusion`` (forward process,
  posterior, parameterizations), ``losses`` (training objective, label dropout), ``solvers``
  (reverse-step update rules, one registry), ``guidance`` (classifier-free guidance, its
  interval and schedule), ``samplers`` (jitted ``lax.scan`` reverse chains), ``plans`` (how to
  sample, as one value), ``interpolation`` (class morphs, noise interpolation), ``inpainting``
  (RePaint);
* networks: ``embeddings``, ``unet``, ``mlp``, ``models`` (the network registry: config ->
  module -> denoiser);
* running: ``config`` (presets, flags), ``datasets`` (the data set registry and loaders),
  ``data`` (arrays and batches), ``optimization`` (learning rate, AdamW, EMA decay),
  ``training`` (state, step compiler, loop), ``dispatch`` (the size of a dispatch, waiting for
  it), ``runs`` (a run resolved from its workdir), ``hooks`` (signals, metrics log, progress,
  TensorBoard), ``workdir`` (a run's folder and its lock), ``checkpoints`` (Orbax),
  ``generation`` (sampling a checkpoint), ``visuals`` (morphs, inpainting and interpolations of
  a checkpoint, as files), ``outputs`` (where outputs go; atomic files and sets written all or
  nothing), ``images`` (grids, GIFs), ``cli`` (what the commands share), ``commands`` (train,
  sample, evaluate; their flags and error handling);
* measuring: ``classifier`` (the evaluation CNN), ``metrics`` (Frechet distance, Inception
  Score), ``evaluation`` (floors, sweeps, tables), ``evaluation_plots``.
"""

import importlib

# name -> module: imported on first use (PEP 562), so that importing a submodule such as
# ``diffusion_jax.commands.train`` or ``diffusion_jax.cli`` does not import jax.
_EXPORTS = {
    "PREDICTIONS": "diffusion",
    "q_posterior": "diffusion",
    "q_sample": "diffusion",
    "to_x0_eps": "diffusion",
    "diffusion_loss": "losses",
    "drop_labels": "losses",
    "MLPDenoiser": "mlp",
    "denoiser": "models",
    "SOLVERS": "samplers",
    "VARIANCES": "samplers",
    "SampleResult": "samplers",
    "SamplingPlan": "plans",
    "SamplerSettings": "samplers",
    "sample": "samplers",
    "SCHEDULES": "schedules",
    "SPACINGS": "schedules",
    "Schedule": "schedules",
    "make_schedule": "schedules",
    "on_timesteps": "schedules",
    "respace": "schedules",
    "UNet": "unet",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"diffusion_jax.{_EXPORTS[name]}"), name)
    try:  # a submodule, as ``dj.samplers`` after ``import diffusion_jax as dj``
        return importlib.import_module(f"diffusion_jax.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"diffusion_jax.{name}":
            raise  # the submodule exists but needs something missing
        raise AttributeError(f"module 'diffusion_jax' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "PREDICTIONS",
    "SOLVERS",
    "SCHEDULES",
    "SPACINGS",
    "VARIANCES",
    "MLPDenoiser",
    "SampleResult",
    "SamplingPlan",
    "SamplerSettings",
    "Schedule",
    "UNet",
    "denoiser",
    "diffusion_loss",
    "drop_labels",
    "make_schedule",
    "on_timesteps",
    "q_posterior",
    "q_sample",
    "respace",
    "sample",
    "to_x0_eps",
]
