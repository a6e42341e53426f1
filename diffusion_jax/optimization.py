"""The optimiser of training: the learning-rate schedule, AdamW with clipping that skips
non-finite updates, and the EMA decay's warm-up. (``training`` re-exports them.)"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def learning_rate(config) -> optax.Schedule:
    """Linear warm-up to ``config.lr``, then cosine decay to lr / 10 at ``num_steps``.

    The warm-up is shortened to leave at least one decay step in runs shorter than it.
    """
    warmup = min(config.warmup_steps, config.num_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=config.num_steps,  # > warmup, which is at most num_steps - 1
        end_value=config.lr / 10,
    )


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping and AdamW; non-finite updates are skipped (and counted)."""
    opt = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(learning_rate(config), weight_decay=config.weight_decay),
    )
    # The training loop stops long before this many consecutive skips are reached.
    return optax.apply_if_finite(opt, max_consecutive_errors=2**30)


def ema_decay_at(step, decay: float):
    """EMA decay with a warm-up, min(decay, (1 + step) / (10 + step)), so short runs are usable."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
