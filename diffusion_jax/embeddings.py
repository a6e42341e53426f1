"""Conditioning shared by the networks: a sinusoidal time embedding, a class embedding and,
optionally, an embedding of the guidance weight w (a distilled student's input, Meng et al.
2023)."""

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


# w is embedded as the sinusoid of W_SCALE * w: guidance weights of 0..10 then spread over the
# range of periods the timesteps 0..1000 use, so weights 0.1 apart get distinct features.
W_SCALE = 100.0


class Conditioning(nn.Module):
    """Time embedding (sinusoid -> MLP) plus a learned class embedding: (B,), (B,) -> (B, dim).

    The class table has ``num_classes + 1`` rows; row ``num_classes`` is the null label that
    classifier-free guidance trains with. ``num_classes=0`` makes a purely time-conditioned model.

    ``guidance_embedding=True`` adds an embedding of the guidance weight w (B,) (sinusoid of
    ``W_SCALE * w`` -> MLP), as a guided-distilled student takes w as an input. Its last layer is
    zero-initialised, so a network with it computes at initialisation exactly what the same
    network without it computes, at any w. Off (the default), the parameters are those of a
    network without it: existing checkpoints keep their structure.
    """

    dim: int
    num_classes: int
    dtype: jnp.dtype = jnp.float32
    guidance_embedding: bool = False

    @nn.compact
    def __call__(
        self, t: jnp.ndarray, labels: jnp.ndarray | None, w: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        emb = sinusoidal_embedding(t, self.dim)
        emb = nn.Dense(self.dim, dtype=self.dtype, name="time_dense0")(emb)
        emb = nn.Dense(self.dim, dtype=self.dtype, name="time_dense1")(nn.swish(emb))
        if self.num_classes > 0 and labels is not None:
            emb = emb + nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype, name="class")(
                labels
            )
        if self.guidance_embedding:
            emb = emb + self._guidance(t, w)
        elif w is not None:
            raise ValueError(
                "this network has no guidance-weight input (guidance_embedding=False); "
                "pass w only to a distilled student"
            )
        return emb

    def _guidance(self, t: jnp.ndarray, w: jnp.ndarray | None) -> jnp.ndarray:
        """The w-embedding (B, dim); w None (e.g. at ``init``) means w = 0."""
        w = jnp.zeros(t.shape, jnp.float32) if w is None else jnp.asarray(w, jnp.float32)
        w = jnp.broadcast_to(w, t.shape)
        h = nn.Dense(self.dim, dtype=self.dtype, name="guidance_dense0")(
            sinusoidal_embedding(W_SCALE * w, self.dim)
        )
        zeros = nn.initializers.zeros
        return nn.Dense(
            self.dim, dtype=self.dtype, kernel_init=zeros, bias_init=zeros, name="guidance_dense1"
        )(nn.swish(h))
