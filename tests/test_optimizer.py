"""The optimiser side of a training step against independent float64 computations: the
learning-rate schedule, global-norm clipping feeding AdamW, the EMA with its warm-up, and skipped
non-finite updates. (The losses and samplers are tested elsewhere; these are what every sample is
drawn from: the EMA parameters.)"""

import math

import jax
import numpy as np
import pytest

from diffusion_jax import dispatch, optimization, sharding, train_step, training
from diffusion_jax.config import get_config


def lr_reference(step, lr, warmup, num_steps):
    """The documented schedule: linear from 0 over the warm-up (shortened to num_steps - 1),
    then a half cosine from lr to lr / 10 at num_steps, lr / 10 after."""
    warmup = min(warmup, num_steps - 1)
    end = lr / 10
    if step < warmup:
        return lr * step / warmup
    if step >= num_steps:
        return end
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (num_steps - warmup)))


@pytest.mark.parametrize("warmup, num_steps", [(100, 1000), (0, 50), (100, 5), (10, 11)])
def test_learning_rate_follows_the_documented_formula(warmup, num_steps):
    schedule = training.learning_rate(
        get_config("tiny", lr=3e-3, warmup_steps=warmup, num_steps=num_steps)
    )
    steps = {0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, num_steps // 2, num_steps - 1}
    for step in sorted(s for s in steps | {num_steps, num_steps + 7} if s >= 0):
        expected = lr_reference(step, 3e-3, warmup, num_steps)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-10), step


def adamw_reference(params, grads, lrs, clip, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
    """float64 AdamW on the concatenated parameters, each gradient first scaled to a global norm
    of at most ``clip``."""
    p = np.concatenate([np.ravel(a) for a in params]).astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        g = np.concatenate([np.ravel(a) for a in g]).astype(np.float64)
        g = g * min(1.0, clip / np.linalg.norm(g))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        p = p - lr * (step + weight_decay * p)
    return p


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def test_clipped_adamw_matches_a_float64_reference_and_skips_nonfinite_gradients():
    config = get_config("tiny", lr=0.1, warmup_steps=0, num_steps=10, weight_decay=0.01)
    optimizer = training.make_optimizer(config)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5, np.float32)]
    # global norms about 9, 0.3 and 4: the first and last are clipped to 1, the middle is not
    grads = [
        [scale * rng.standard_normal(a.shape).astype(np.float32) for a in params]
        for scale in (2.0, 0.07, 1.0)
    ]
    nan = [np.full_like(a, np.nan) for a in params]
    state = optimizer.init(params)
    current = params
    for g in (grads[0], grads[1], nan, grads[2]):
        before = (current, state.inner_state)
        updates, state = optimizer.update(g, state, current)
        current = jax.tree.map(lambda p, u: p + u, current, updates)
        if g is nan:  # skipped: parameters and the inner AdamW state are unchanged
            np.testing.assert_array_equal(flat(current), flat(before[0]))
            np.testing.assert_array_equal(flat(state.inner_state), flat(before[1]))
            assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
    lrs = [lr_reference(s, 0.1, 0, 10) for s in range(3)]  # the skipped step takes no LR step
    expected = adamw_reference(params, grads, lrs, config.grad_clip, 0.01)
    np.testing.assert_allclose(flat(current), expected, rtol=1e-5, atol=1e-6)
    unclipped = adamw_reference(params, grads, lrs, np.inf, 0.01)
    assert np.abs(unclipped - expected).max() > 1e-2  # the check could see a missing clip


def test_ema_decay_warms_up_then_caps():
    for step in range(0, 40, 3):
        expected = min(0.8, (1 + step) / (10 + step))  # capped from step 26 on
        assert float(training.ema_decay_at(step, 0.8)) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def ema_run(tiny_data):
    """(config, jitted steps, [state after 0..4 steps], [loss of steps 1..4]) of the tiny preset,
    one step per call (the config of the session's straight_run, so the step program is compiled
    once)."""
    config = get_config("tiny")
    mesh = sharding.data_mesh()
    steps = training.make_train_steps(config, mesh)
    train_x, train_y = training.device_data(tiny_data, mesh, 1)
    model = training.models.build_model(config)
    state = training.init_state(config, model, (1, *tiny_data.train_x.shape[1:]))
    # placed and called as training.train does, so the session's compiled step is reused
    state = sharding.replicate(state, mesh)
    states, step_losses = [state], []
    for _ in range(4):
        # (a copy: the step donates its input state's buffers, and the fixture keeps them all)
        state, sums = steps(dispatch.snapshot(state), train_x, train_y, 1)
        loss = sums["loss"]
        states.append(state)
        step_losses.append(float(loss))
    return config, steps, states, step_losses


def test_ema_follows_the_warmed_up_recurrence(ema_run):
    config, _, states, _ = ema_run
    ema = flat(states[0].params)  # the EMA starts at the initial parameters
    for k in range(4):
        decay = min(config.ema_decay, (1 + k) / (10 + k))
        ema = decay * ema + (1 - decay) * flat(states[k + 1].params)
        np.testing.assert_allclose(flat(states[k + 1].ema_params), ema, rtol=1e-5, atol=1e-7)
    assert not np.allclose(flat(states[4].ema_params), flat(states[4].params))


def test_a_skipped_step_leaves_parameters_ema_and_optimiser_state(ema_run, tiny_data):
    _, steps, states, _ = ema_run
    mesh = sharding.data_mesh()
    bad = tiny_data._replace(train_x=np.full_like(tiny_data.train_x, np.nan))
    train_x, train_y = training.device_data(bad, mesh, 1)
    state, sums = steps(dispatch.snapshot(states[4]), train_x, train_y, 1)
    loss = sums["loss"]
    assert not np.isfinite(float(loss)) and int(state.step) == 5
    for field in ("params", "ema_params"):
        np.testing.assert_array_equal(flat(getattr(state, field)), flat(getattr(states[4], field)))
    np.testing.assert_array_equal(
        flat(state.opt_state.inner_state), flat(states[4].opt_state.inner_state)
    )
    assert int(state.opt_state.notfinite_count) == 1


def test_a_long_streak_of_non_finite_steps_is_all_skipped(ema_run, tiny_data):
    """The optimiser never gives up skipping by itself (the loop stops a diverging run at
    max_nonfinite_steps): 61 non-finite steps in a row change nothing."""
    _, steps, states, _ = ema_run
    bad = tiny_data._replace(train_x=np.full_like(tiny_data.train_x, np.nan))
    train_x, train_y = training.device_data(bad, sharding.data_mesh(), 1)
    state = dispatch.snapshot(states[4])
    for n in [2] * 30 + [1]:  # (dispatches of the tiny preset's steps_per_dispatch)
        state, _ = steps(state, train_x, train_y, n)
    assert int(state.opt_state.notfinite_count) == 61 and int(state.step) == 65
    for field in ("params", "ema_params"):
        np.testing.assert_array_equal(flat(getattr(state, field)), flat(getattr(states[4], field)))


def test_one_dispatch_of_several_steps_is_those_steps_one_by_one(ema_run, tiny_data):
    """``num_steps`` steps in one dispatch reach the state of as many single-step dispatches,
    and the returned loss is the sum of their losses (one compiled program: the count is traced)."""
    config, steps, states, step_losses = ema_run
    assert config.steps_per_dispatch > 1  # the fori_loop program
    train_x, train_y = training.device_data(tiny_data, sharding.data_mesh(), 1)
    state, sums = steps(dispatch.snapshot(states[2]), train_x, train_y, 2)
    loss_sum = sums["loss"]
    assert int(state.step) == 4
    for field in ("params", "ema_params"):
        np.testing.assert_allclose(
            flat(getattr(state, field)), flat(getattr(states[4], field)), rtol=1e-5, atol=1e-6
        )
    assert float(loss_sum) == pytest.approx(sum(step_losses[2:]), rel=1e-5)


def test_the_train_step_runs_the_network_in_training_mode(monkeypatch):
    """Dropout is active in training: the step's denoiser is built with train=True. (The tiny
    preset has no dropout, so the steps above cannot see it; no program is compiled here.)"""
    seen = []
    real = train_step.models.denoiser
    monkeypatch.setattr(
        train_step.models, "denoiser", lambda model, train=False: seen.append(train) or real(model)
    )
    config = training.config_lib.math_part(get_config("tiny", dropout=0.1))
    train_step._make_train_steps.__wrapped__(config, sharding.data_mesh(), 1)  # uncached
    assert seen == [True]


def test_skipping_nonfinite_updates_matches_optax_apply_if_finite_without_a_branch():
    """skip_nonfinite gives optax.apply_if_finite's updates and state, step for step, through a
    streak of non-finite gradients; its compiled update has no conditional (a GPU reads a
    conditional's predicate back to the host), apply_if_finite's has one."""
    import optax

    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=0.01))
    ours, theirs = optimization.skip_nonfinite(inner), optax.apply_if_finite(inner, 99)
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(5, np.float32)}
    grads = [jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), params)
             for _ in range(5)]
    grads[1] = jax.tree.map(lambda a: np.full_like(a, np.inf), params)
    grads[2] = dict(grads[2], b=np.full(5, np.nan, np.float32))
    state_a, state_b = ours.init(params), theirs.init(params)
    assert jax.tree.structure(state_a) == jax.tree.structure(state_b)  # checkpoints unchanged
    for g in grads:
        up_a, state_a = jax.jit(ours.update)(g, state_a, params)
        up_b, state_b = jax.jit(theirs.update)(g, state_b, params)
        np.testing.assert_array_equal(flat(up_a), flat(up_b))
        for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state_a.total_notfinite) == 2 and int(state_a.notfinite_count) == 0

    def hlo(opt, state):
        return jax.jit(opt.update).lower(grads[0], state, params).compile().as_text()

    assert " conditional(" not in hlo(ours, state_a)
    assert " conditional(" in hlo(theirs, state_b)  # (what the test would miss otherwise)
