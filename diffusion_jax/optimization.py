"""The optimiser of training: the learning-rate schedule, AdamW with clipping that skips
non-finite updates, and the EMA decay's warm-up. (``training`` re-exports them.)"""

from __future__ import annotations

import jax
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
    return skip_nonfinite(opt)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, except that an update with a non-finite gradient is skipped: zero updates, the
    inner state kept, and the skip counted, in :class:`optax.ApplyIfFiniteState` (so the
    optimiser state, and with it every checkpoint, has the structure it had under
    ``optax.apply_if_finite``).

    ``optax.apply_if_finite`` picks the branch with ``lax.cond``, which a GPU runs by copying the
    predicate to the host and waiting for it: a host round trip inside every step of a dispatch.
    Here both outcomes are computed and one is selected with ``jnp.where``, which stays on the
    device; the inner update of AdamW is elementwise and cheap next to the gradient. (Unlike
    ``apply_if_finite`` with a finite limit, skips never give up: the training loop stops a run
    after ``max_nonfinite_steps`` of them.)
    """

    def init(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update(updates, state, params=None):
        finite = jnp.all(
            jnp.array([jnp.all(jnp.isfinite(u)) for u in jax.tree_util.tree_leaves(updates)])
        )
        new_updates, new_inner = inner.update(updates, state.inner_state, params)

        def pick(new, old):
            return jnp.where(finite, new, old)

        skipped = jnp.logical_not(finite).astype(jnp.int32)
        return jax.tree_util.tree_map(lambda u: jnp.where(finite, u, 0), new_updates), (
            optax.ApplyIfFiniteState(
                notfinite_count=jnp.where(finite, 0, state.notfinite_count + 1),
                last_finite=finite,
                total_notfinite=state.total_notfinite + skipped,
                inner_state=jax.tree_util.tree_map(pick, new_inner, state.inner_state),
            )
        )

    return optax.GradientTransformation(init, update)


def ema_decay_at(step, decay: float):
    """EMA decay with a warm-up, min(decay, (1 + step) / (10 + step)), so short runs are usable."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
