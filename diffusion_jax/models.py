"""Turning a Flax module into the denoiser callable the losses and samplers take."""

from __future__ import annotations

import functools

import flax.linen as nn


@functools.cache
def denoiser(module: nn.Module, train: bool = False):
    """``fn(params, x_t, t, labels, **apply_kwargs) -> output`` for a Linen ``module``.

    Cached per (module, train), so repeated calls return the *same* function object and the
    jitted samplers, whose denoiser is a static argument, do not recompile.
    """

    def fn(params, x_t, t, labels, **apply_kwargs):
        return module.apply({"params": params}, x_t, t, labels, train=train, **apply_kwargs)

    return fn
