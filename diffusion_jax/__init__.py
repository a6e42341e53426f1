"""diffusion_jax: DDPM with classifier-free guidance in JAX/Flax.

The folder listing is the architecture:

* mathematics: ``schedules`` (noise schedules, respacing), ``diffusion`` (forward process,
  posterior, parameterizations), ``losses`` (training objective, label dropout), ``solvers``
  (reverse-step update rules, one registry), ``samplers`` (jitted ``lax.scan`` reverse chains
  with guidance), ``interpolation`` (class morphs, noise interpolation), ``inpainting``
  (RePaint);
* networks: ``embeddings``, ``unet``, ``mlp``, ``models`` (config -> module -> denoiser);
* running: ``config`` (presets, flags), ``data`` (data sets), ``training`` (Optax loop, EMA),
  ``workdir`` (a run's folder and its lock),
  ``checkpoints`` (Orbax), ``generation`` (sampling a checkpoint), ``visuals`` (morphs,
  inpainting and interpolations of a checkpoint, as files), ``images`` (grids, GIFs),
  ``cli`` (error reporting of the scripts);
* measuring: ``classifier`` (the evaluation CNN), ``metrics`` (Frechet distance, Inception
  Score), ``evaluation`` (floors, sweeps, tables, plots).
"""

from diffusion_jax.diffusion import PREDICTIONS, q_posterior, q_sample, to_x0_eps
from diffusion_jax.losses import diffusion_loss, drop_labels
from diffusion_jax.mlp import MLPDenoiser
from diffusion_jax.models import denoiser
from diffusion_jax.samplers import METHODS, VARIANCES, SampleResult, SamplerSettings, sample
from diffusion_jax.schedules import SCHEDULES, SPACINGS, Schedule, make_schedule, respace
from diffusion_jax.unet import UNet

__version__ = "0.1.0"

__all__ = [
    "PREDICTIONS",
    "METHODS",
    "SCHEDULES",
    "SPACINGS",
    "VARIANCES",
    "MLPDenoiser",
    "SampleResult",
    "SamplerSettings",
    "Schedule",
    "UNet",
    "denoiser",
    "diffusion_loss",
    "drop_labels",
    "make_schedule",
    "q_posterior",
    "q_sample",
    "respace",
    "sample",
    "to_x0_eps",
]
