"""Conditioning shared by the networks: a sinusoidal time embedding and a class embedding."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


def sinusoidal_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """Transformer-style features of integer or real timesteps: (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Conditioning(nn.Module):
    """Time embedding (sinusoid -> MLP) plus a learned class embedding: (B,), (B,) -> (B, dim).

    The class table has ``num_classes + 1`` rows; row ``num_classes`` is the null label that
    classifier-free guidance trains with. ``num_classes=0`` makes a purely time-conditioned model.
    """

    dim: int
    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jnp.ndarray, labels: jnp.ndarray | None) -> jnp.ndarray:
        emb = sinusoidal_embedding(t, self.dim)
        emb = nn.Dense(self.dim, dtype=self.dtype, name="time_dense0")(emb)
        emb = nn.Dense(self.dim, dtype=self.dtype, name="time_dense1")(nn.swish(emb))
        if self.num_classes > 0 and labels is not None:
            emb = emb + nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype, name="class")(
                labels
            )
        return emb
