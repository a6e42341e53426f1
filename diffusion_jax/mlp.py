"""A small MLP denoiser for low-dimensional data such as the 2-D mixture of Gaussians."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax import datasets
from diffusion_jax.embeddings import Conditioning


class MLPDenoiser(nn.Module):
    """x (B, D), t int32 (B,), labels int32 (B,) in [0, num_classes] -> (B, D) float32.

    Residual MLP blocks, each told the time/class embedding; zero-initialised output layer.
    ``guidance_embedding``: also take the guidance weight w (B,) as an input (a distilled
    student; see :class:`~diffusion_jax.embeddings.Conditioning`).
    """

    num_classes: int = 0
    hidden: int = 128
    num_layers: int = 3
    dtype: jnp.dtype = jnp.float32
    guidance_embedding: bool = False

    input_kind: ClassVar[str] = "points"  # (B, D): see models.Network

    def check_input_shape(self, shape) -> None:
        datasets.check_shape(self.input_kind, shape, type(self).__name__)

    @nn.compact
    def __call__(self, x, t, labels=None, train: bool = False, w=None):
        self.check_input_shape(x.shape)
        emb = Conditioning(self.hidden, self.num_classes, self.dtype, self.guidance_embedding)(
            t, labels, w
        )
        h = nn.Dense(self.hidden, dtype=self.dtype)(x.astype(self.dtype))
        for _ in range(self.num_layers):
            y = nn.Dense(self.hidden, dtype=self.dtype)(nn.swish(h) + emb)
            h = h + nn.Dense(self.hidden, dtype=self.dtype)(nn.swish(y))
        out = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros)(
            nn.swish(h)
        )
        return out.astype(jnp.float32)
