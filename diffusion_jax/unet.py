"""A Flax Linen U-Net denoiser for small images (28x28 without padding, 32x32, ...).

Call signature: ``UNet(...).apply(params, x, t, labels, train=False, rngs=...)`` with x (B, H, W, C)
in any float dtype, t int32 (B,) training timesteps, labels int32 (B,) in [0, num_classes] (the last
value is the null label); returns (B, H, W, out_channels) float32. H and W must be divisible by
patch_size * 2 ** (len(channel_mults) - 1): 28 -> 14 -> 7 with three levels, or with patch_size=2
and two levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax import datasets
from diffusion_jax.embeddings import Conditioning


def space_to_depth(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """Non-overlapping p x p patches as channels: (B, H, W, C) -> (B, H/p, W/p, p*p*C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """The inverse of :func:`space_to_depth`: (B, H, W, p*p*C) -> (B, H*p, W*p, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv, plus the projected embedding, then the same again, residual."""

    features: int
    num_groups: int
    dropout: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, emb, train: bool):
        h = nn.swish(nn.GroupNorm(self.num_groups, dtype=self.dtype)(x))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(h)
        h = h + nn.Dense(self.features, dtype=self.dtype)(nn.swish(emb))[:, None, None, :]
        h = nn.swish(nn.GroupNorm(self.num_groups, dtype=self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    num_heads: int
    num_groups: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = nn.GroupNorm(self.num_groups, dtype=self.dtype)(x).reshape(b, h * w, c)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y)
        return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
    """DDPM-style U-Net with time and class conditioning in every residual block.

    Attributes:
      num_classes: classes of the data; the class table gets one extra null row. 0 = unconditional.
      channels: width of the first level.
      channel_mults: width multiplier of each level; one downsampling between levels.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attention_resolutions: spatial sizes (e.g. (7, 14)) at which self-attention is used.
      num_heads: attention heads.
      dropout: dropout rate inside residual blocks (active only with ``train=True``).
      num_groups: GroupNorm groups; must divide every level's width.
      out_channels: output channels; None = as many as the input.
      patch_size: the network works on non-overlapping p x p patches folded into channels
        (:func:`space_to_depth`) and unfolds its output the same way. p = 2 moves all the work
        off the full 28x28 grid, where XLA:CPU's convolutions are slowest (docs/BENCHMARKS.md);
        1 is the plain U-Net. ``attention_resolutions`` count the patched grid (14, 7 for p=2).
      dtype: activation dtype (jnp.bfloat16 for mixed precision); parameters stay float32.
      guidance_embedding: also take the guidance weight w (B,) as an input, ``__call__(...,
        w=w)`` (a distilled student; see :class:`~diffusion_jax.embeddings.Conditioning`). Off,
        the parameters are exactly those of the U-Net without it.
    """

    num_classes: int = 10
    channels: int = 64
    channel_mults: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (7,)
    num_heads: int = 4
    dropout: float = 0.1
    num_groups: int = 8
    out_channels: int | None = None
    patch_size: int = 1
    dtype: jnp.dtype = jnp.float32
    guidance_embedding: bool = False

    input_kind: ClassVar[str] = "image"  # (B, H, W, C): see models.Network

    def check_input_shape(self, shape) -> None:
        """Raise ValueError if images of ``shape`` (B, H, W, C) cannot pass through this U-Net."""
        datasets.check_shape(self.input_kind, shape, type(self).__name__)
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        factor = self.patch_size * 2 ** (len(self.channel_mults) - 1)
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(
                f"UNet with channel_mults={tuple(self.channel_mults)} and patch_size="
                f"{self.patch_size} downsamples by {factor}: height and width must be divisible "
                f"by {factor}, got {shape[1]}x{shape[2]} (e.g. 28x28 works with 3 levels, or "
                "with 2 levels and patch_size 2; 32x32 with up to 6 levels)"
            )
        for width in [self.channels] + [self.channels * m for m in self.channel_mults]:
            if width % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} must divide every level's width "
                    f"(channels and channels * mult), not {width}"
                )
        # attention runs at the bottom level and at attention_resolutions
        widths = {
            shape[1] // self.patch_size // 2**i: self.channels * m
            for i, m in enumerate(self.channel_mults)
        }
        bottom = self.channels * self.channel_mults[-1]
        for width in [bottom] + [w for r, w in widths.items() if r in self.attention_resolutions]:
            if width % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} must divide the attention width {width}"
                )

    @nn.compact
    def __call__(self, x, t, labels=None, train: bool = False, w=None):
        self.check_input_shape(x.shape)
        block = dict(num_groups=self.num_groups, dropout=self.dropout, dtype=self.dtype)
        emb = Conditioning(
            4 * self.channels, self.num_classes, self.dtype, self.guidance_embedding
        )(t, labels, w)

        p = self.patch_size
        h = x.astype(self.dtype)
        if p > 1:
            h = space_to_depth(h, p)
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="stem")(h)
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels * mult, **block)(h, emb, train)
                h = self._maybe_attend(h)
                skips.append(h)
            if level < len(self.channel_mults) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
                skips.append(h)

        h = ResBlock(h.shape[-1], **block)(h, emb, train)
        h = AttentionBlock(self.num_heads, self.num_groups, self.dtype)(h)
        h = ResBlock(h.shape[-1], **block)(h, emb, train)

        for level, mult in reversed(list(enumerate(self.channel_mults))):
            for _ in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(self.channels * mult, **block)(h, emb, train)
                h = self._maybe_attend(h)
            if level > 0:
                b, hh, ww, c = h.shape
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = nn.Conv(c, (3, 3), dtype=self.dtype)(h)

        h = nn.swish(nn.GroupNorm(self.num_groups, dtype=self.dtype)(h))
        # Zero-initialised output: the untrained model predicts 0 (the mean of eps), a calm start.
        h = nn.Conv(
            (self.out_channels or x.shape[-1]) * p * p,
            (3, 3),
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros,
            name="head",
        )(h)
        if p > 1:
            h = depth_to_space(h, p)
        return h.astype(jnp.float32)

    def _maybe_attend(self, h):
        if h.shape[1] in self.attention_resolutions:
            h = AttentionBlock(self.num_heads, self.num_groups, self.dtype)(h)
        return h
