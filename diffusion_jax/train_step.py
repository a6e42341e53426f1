"""The compiled optimiser step: the train state, its jitted initialisation and the dispatch
program that takes several steps on device-resident data.

One dispatch of :func:`make_train_steps` has no host round trip inside it on a GPU: its steps run
in chunks of :data:`CHUNK` inside a loop of static trip count (a loop whose count is a traced
value makes the host read the loop predicate back after every step), the non-finite-update check
selects instead of branching (:func:`~diffusion_jax.optimization.skip_nonfinite`), and the data
order is drawn once per dispatch rather than as a permutation of the data set in every step.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from diffusion_jax import config as config_lib
from diffusion_jax import data, losses, models, sharding
from diffusion_jax.optimization import ema_decay_at, make_optimizer
from diffusion_jax.schedules import make_schedule

# Steps per inner loop of a dispatch. A dispatch of n steps runs ceil(n / CHUNK) chunks, the
# steps past n computed and discarded, so the training loop sizes its dispatches in multiples of
# it (dispatch.chunked); 10 divides the presets' logging and checkpoint intervals.
CHUNK = 10


@struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: the number of optimizer steps taken
    params: Any
    opt_state: Any
    ema_params: Any


def init_state(config, model, example_shape) -> TrainState:
    """The step-0 state for inputs of ``example_shape`` = (B, ...): parameters, the optimiser
    state of :func:`make_optimizer` and the EMA copy, computed by one jitted program (built
    piecewise, they took some 55 small compiles before the first step)."""
    model.check_input_shape(example_shape)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    x = jnp.zeros(example_shape, jnp.float32)
    t = jnp.zeros(example_shape[:1], jnp.int32)
    return _init_program(config_lib.math_part(config), model)(key, x, t)


@functools.lru_cache(maxsize=8)
def _init_program(config, model):
    optimizer = make_optimizer(config)

    @jax.jit
    def init(key, x, t):
        params = model.init(key, x, t, t)["params"]
        return TrainState(
            step=jnp.int32(0),
            params=params,
            opt_state=optimizer.init(params),
            ema_params=jax.tree_util.tree_map(jnp.copy, params),
        )

    return init


def chunk_steps(steps_per_dispatch: int) -> int:
    """The inner loop's static trip count for dispatches of at most ``steps_per_dispatch``."""
    return min(CHUNK, steps_per_dispatch)


def make_train_steps(config, mesh=None, num_shards: int = 1):
    """A jitted ``fn(state, train_x, train_y, num_steps) -> (state, metric_sums)``.

    Takes ``num_steps`` optimizer steps, 1 <= num_steps <= ``config.steps_per_dispatch`` (a
    traced int: any count reuses the same program), on device-resident data. The input
    ``metric_sums`` maps each of :func:`step_metrics`' names to the sum of its
    values over those steps (``"loss"``: the sum of their losses), so a logged value is a mean
    over the steps since the last record. ``train_x`` (D, M, ...) and ``train_y`` (D, M) hold, on
    each of the mesh's D devices, the M examples of that device's data shard
    (:func:`device_data`); each step takes an equal part of the batch from every shard, and each
    device gathers its slice of the batch from its own rows. With ``steps_per_dispatch == 1`` the
    program is one straight-line step (``num_steps`` is then ignored). Cached per config (its
    mathematical fields), mesh and shard count, so a resumed run in the same process reuses the
    compiled program.
    """
    mesh = mesh or sharding.data_mesh()
    sharding.check_num_shards(num_shards, mesh)
    program = _make_train_steps(config_lib.math_part(config), mesh, num_shards)
    limit = config.steps_per_dispatch

    @functools.wraps(program)
    def train_steps(state, train_x, train_y, num_steps):
        try:
            n = operator.index(num_steps)
        except TypeError:  # traced (inside a caller's jit): the caller keeps to the limit
            n = None
        if n is not None and not 1 <= n <= limit:
            # (past the limit the dispatch's data orders would not cover its steps)
            raise ValueError(
                f"num_steps={n}: one dispatch takes 1 to steps_per_dispatch={limit} steps; "
                "split the steps over several calls"
            )
        return program(state, train_x, train_y, num_steps)

    train_steps.lower = program.lower  # ahead-of-time compiling (benchmarks)
    return train_steps


def device_data(dataset: data.Dataset, mesh, num_shards: int):
    """``(train_x, train_y)`` as (D, M, ...) and (D, M) global arrays for :func:`make_train_steps`:
    the training set split into ``num_shards`` shards (:func:`data.shard_rows`), each device
    holding its shard's M = N // num_shards examples. Each process builds only its devices' rows."""
    n = dataset.train_x.shape[0]

    def rows(s):
        return data.shard_rows(n, s, num_shards)

    return (
        sharding.put_sharded_rows(dataset.train_x, mesh, num_shards, rows),
        sharding.put_sharded_rows(dataset.train_y.astype(np.int32), mesh, num_shards, rows),
    )


def apply_gradients(state: TrainState, grads, optimizer, ema_decay: float) -> TrainState:
    """The state after one optimiser update with ``grads`` and the EMA's (``optimizer`` from
    ``optimization.make_optimizer``, whose skipped non-finite update leaves the EMA as it was
    too: parameters, EMA and optimiser state all stay put)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay)
    ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
    ema = jax.tree_util.tree_map(
        lambda new, old: jnp.where(opt_state.last_finite, new, old), ema, state.ema_params
    )
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def step_metrics(loss, grads) -> dict[str, jnp.ndarray]:
    """What one optimizer step reports: float32 scalars by name. A new metric is one entry here
    (metrics.jsonl, the progress bar and TensorBoard pick it up)."""
    return {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.lru_cache(maxsize=8)
def _make_train_steps(config, mesh, num_shards):
    model, optimizer = models.build_model(config), make_optimizer(config)
    schedule = make_schedule(config.schedule, config.num_timesteps)
    denoise = models.denoiser(model, train=True)
    base = jax.random.PRNGKey(config.seed)
    data_key, step_key = jax.random.fold_in(base, 1), jax.random.fold_in(base, 2)
    batched = sharding.batch_sharded(mesh)
    batch = config.batch_size

    def one_step(state: TrainState, train_x, train_y, shard_idx):
        """One optimizer step on the batch ``shard_idx``: (S, B/S) indices into each shard."""
        key = jax.random.fold_in(step_key, state.step)
        key_loss, key_dropout = jax.random.split(key)
        # -> (D, B/D): shard s's part split over its devices. Device d gathers from its own rows,
        # so no example crosses devices.
        idx = jax.lax.with_sharding_constraint(shard_idx.reshape(train_x.shape[0], -1), batched)
        # The batch is split over the mesh; the (replicated) parameters' gradients are then
        # all-reduced by XLA. The random draws do not depend on the split (partitionable
        # threefry), so with one shard any device count computes the same losses up to
        # summation order.
        x0, y0 = (
            jax.lax.with_sharding_constraint(
                jax.vmap(lambda rows, i: rows[i])(a, idx).reshape(-1, *a.shape[2:]), batched
            )
            for a in (train_x, train_y)
        )

        def loss_fn(params):
            loss, _ = losses.diffusion_loss(
                denoise,
                params,
                schedule,
                key_loss,
                x0,
                y0,
                null_label=config.null_label,
                prediction=config.prediction,
                loss_type=config.loss_type,
                weighting=config.weighting,
                min_snr_gamma=config.min_snr_gamma,
                p_uncond=config.p_uncond,
                rngs={"dropout": key_dropout},
            )
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return apply_gradients(state, grads, optimizer, config.ema_decay), step_metrics(loss, grads)

    if config.steps_per_dispatch == 1:
        # XLA:CPU runs convolution gradients inside a while loop ~25x slower than the same
        # gradients in straight-line code (measured here on jax 0.10.2: 58 s vs 2.2 s per step
        # of the cpu preset), so one step per dispatch compiles without a loop. The count
        # argument is then always 1.
        def train_steps(state, train_x, train_y, num_steps):
            shard_idx = data.shard_batch_indices(
                data_key, state.step, train_x.shape[1], batch, num_shards
            )
            return one_step(state, train_x, train_y, shard_idx)

    else:
        chunk = chunk_steps(config.steps_per_dispatch)
        def train_steps(state, train_x, train_y, num_steps):
            first = state.step
            shard_size = train_x.shape[1]
            # the epochs the dispatch's steps can touch, the masked ones past the last included
            span = -(-config.steps_per_dispatch // chunk) * chunk
            orders = data.dispatch_orders(
                data_key,
                first,
                shard_size,
                batch,
                num_shards,
                data.dispatch_epochs(span, shard_size, batch, num_shards),
            )

            def masked_step(i, carry):
                state, sums = carry
                idx = data.batch_from_orders(orders, first, state.step, batch, num_shards)
                new, values = one_step(state, train_x, train_y, idx)
                # Steps past num_steps (the end of the last chunk) are computed and dropped: a
                # select, as a branch would cost a host round trip on a GPU.
                active = i < num_steps
                state = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, state)
                sums = jax.tree_util.tree_map(
                    lambda s, v: s + jnp.where(active, v, 0), sums, values
                )
                return state, sums

            def run_chunk(c, carry):
                # a static trip count: no host round trip between the chunk's steps
                return jax.lax.fori_loop(
                    0, chunk, lambda j, cr: masked_step(c * chunk + j, cr), carry
                )

            # The metrics' structure, from step_metrics alone: tracing one_step for it would
            # trace the whole step a second time.
            loss = jax.ShapeDtypeStruct((), jnp.float32)
            shapes = jax.eval_shape(step_metrics, loss, state.params)
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            chunks = (num_steps + chunk - 1) // chunk
            return jax.lax.fori_loop(0, chunks, run_chunk, (state, zeros))

    return jax.jit(train_steps, donate_argnums=0)
