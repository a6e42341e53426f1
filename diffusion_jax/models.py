"""The networks by name (:data:`NETWORKS`), building the configured one, and turning a Flax
module into a denoiser callable.

Adding a network is its module (satisfying :class:`Network`) and one entry in :data:`NETWORKS`;
``--model`` then offers it, and the config pairs it with the data sets of its ``input_kind``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.mlp import MLPDenoiser
from diffusion_jax.unet import UNet


class Network(Protocol):
    """What a registered network module is: a Flax module called as ``(x, t, labels, train)``
    on batches of the kind of data it declares."""

    # the data it denoises, a key of diffusion_jax.datasets.KINDS ("image", "points")
    input_kind: ClassVar[str]

    def check_input_shape(self, shape) -> None:
        """ValueError unless a batch of ``shape`` can pass: first datasets.check_shape (the
        rank of ``input_kind``), then the network's own limits. Its ``__call__`` calls it too."""

    # w: the guidance weight (B,), for a network built with guidance_embedding=True only
    def __call__(self, x, t, labels=None, train: bool = False, w=None) -> jax.Array: ...


class NetworkEntry(NamedTuple):
    module: type[Network]
    settings: Callable[[Any], dict]  # config -> the module's arguments beyond classes and dtype


NETWORKS: dict[str, NetworkEntry] = {
    "unet": NetworkEntry(
        UNet,
        lambda config: dict(
            channels=config.channels,
            channel_mults=tuple(config.channel_mults),
            num_res_blocks=config.num_res_blocks,
            attention_resolutions=tuple(config.attention_resolutions),
            num_heads=config.num_heads,
            dropout=config.dropout,
            num_groups=config.num_groups,
            patch_size=config.patch_size,
        ),
    ),
    "mlp": NetworkEntry(
        MLPDenoiser, lambda config: dict(hidden=config.mlp_hidden, num_layers=config.mlp_layers)
    ),
}


def build_model(config, guidance_embedding: bool = False) -> nn.Module:
    """The network that ``config`` (a :class:`~diffusion_jax.config.Config`) describes;
    ``guidance_embedding``: with the guidance weight w as an input (a distilled student, see
    :class:`~diffusion_jax.embeddings.Conditioning`)."""
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    entry = NETWORKS[config.model]
    return entry.module(
        num_classes=config.num_classes,
        dtype=dtype,
        guidance_embedding=guidance_embedding,
        **entry.settings(config),
    )


@functools.cache
def _jitted_init(model: nn.Module):
    return jax.jit(model.init)


def init_params(model: nn.Module, key: jax.Array, sample_shape: tuple[int, ...]):
    """Parameters for inputs of ``sample_shape`` = (B, ...), initialised under jit (compiled once
    per module)."""
    model.check_input_shape(sample_shape)
    x = jnp.zeros(sample_shape, jnp.float32)
    t = jnp.zeros(sample_shape[:1], jnp.int32)
    return _jitted_init(model)(key, x, t, t)["params"]


def abstract_params(model: nn.Module, sample_shape: tuple[int, ...]):
    """Shapes and dtypes of the parameters, without computing them (a restore target)."""
    model.check_input_shape(sample_shape)
    x = jax.ShapeDtypeStruct(sample_shape, jnp.float32)
    t = jax.ShapeDtypeStruct(sample_shape[:1], jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, t)["params"]


@functools.cache
def denoiser(module: nn.Module, train: bool = False):
    """``fn(params, x_t, t, labels, **apply_kwargs) -> output`` for a Linen ``module``.

    Cached per (module, train), so repeated calls return the *same* function object and the
    jitted samplers, whose denoiser is a static argument, do not recompile.
    """

    def fn(params, x_t, t, labels, **apply_kwargs):
        return module.apply({"params": params}, x_t, t, labels, train=train, **apply_kwargs)

    return fn
