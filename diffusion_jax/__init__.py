"""diffusion_jax: DDPM with classifier-free guidance in JAX/Flax.

The folder listing is the architecture: ``schedules`` (noise schedules, respacing),
``diffusion`` (forward process, posterior, parameterizations), ``losses`` (training objective and
label dropout), ``samplers`` (jitted ``lax.scan`` reverse chains with guidance), ``embeddings``,
``unet`` and ``mlp`` (networks), ``models`` (module -> denoiser callable).
"""

from diffusion_jax.diffusion import PREDICTIONS, q_posterior, q_sample, to_x0_eps
from diffusion_jax.losses import diffusion_loss, drop_labels
from diffusion_jax.mlp import MLPDenoiser
from diffusion_jax.models import denoiser
from diffusion_jax.samplers import METHODS, VARIANCES, SampleResult, sample
from diffusion_jax.schedules import SCHEDULES, Schedule, make_schedule, respace
from diffusion_jax.unet import UNet

__version__ = "0.1.0"

__all__ = [
    "PREDICTIONS",
    "METHODS",
    "SCHEDULES",
    "VARIANCES",
    "MLPDenoiser",
    "SampleResult",
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
