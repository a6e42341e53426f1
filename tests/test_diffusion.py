"""Forward process, posterior and parameterizations against closed forms in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion
from diffusion_jax.schedules import make_schedule, respace

SCHEDULE = make_schedule("linear", 100)


def test_q_sample_matches_step_by_step_chain():
    """x_k from q(x_k | x_0) has the moments of k+1 steps x <- sqrt(alpha) x + sqrt(beta) z."""
    rng = np.random.default_rng(0)
    betas = np.asarray(SCHEDULE.betas, np.float64)
    x0, n, k = 0.7, 200_000, 40
    x = np.full(n, x0)
    for i in range(k + 1):
        x = np.sqrt(1 - betas[i]) * x + np.sqrt(betas[i]) * rng.standard_normal(n)
    eps = jax.random.normal(jax.random.PRNGKey(0), (n, 1))
    xt = np.asarray(diffusion.q_sample(SCHEDULE, jnp.full((n, 1), x0), jnp.full((n,), k), eps))
    se_mean, se_var = np.sqrt(x.var() / n), x.var() * np.sqrt(2 / n)
    assert abs(xt.mean() - x.mean()) < 5 * np.sqrt(2) * se_mean
    assert abs(xt.var() - x.var()) < 5 * np.sqrt(2) * se_var
    abar = np.prod(1 - betas[: k + 1])
    assert abs(xt.mean() - np.sqrt(abar) * x0) < 5 * se_mean


@pytest.mark.parametrize(
    "schedule", [SCHEDULE, respace("cosine", 100, 9)], ids=["full", "respaced"]
)
def test_posterior_is_bayes_rule(schedule):
    """q(x_{k-1} | x_k, x_0) ∝ q(x_k | x_{k-1}) q(x_{k-1} | x_0), computed in float64."""
    rng = np.random.default_rng(1)
    K = schedule.num_steps
    k = np.arange(1, K)
    x0, xk = rng.uniform(-1, 1, (K - 1, 3)), rng.standard_normal((K - 1, 3))
    abar = np.asarray(schedule.alpha_bar, np.float64)
    a_prev, a = abar[k - 1], abar[k]
    alpha = a / a_prev
    beta = 1 - alpha
    prec = 1 / (1 - a_prev) + alpha / beta
    var = 1 / prec
    mean = var[:, None] * (
        np.sqrt(a_prev)[:, None] * x0 / (1 - a_prev)[:, None]
        + np.sqrt(alpha)[:, None] * xk / beta[:, None]
    )
    m, v, logv = diffusion.q_posterior(schedule, jnp.asarray(x0), jnp.asarray(xk), jnp.asarray(k))
    np.testing.assert_allclose(m, mean, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(v[:, 0], var, rtol=2e-4)
    np.testing.assert_allclose(logv[:, 0], np.log(var), atol=2e-4)


def test_posterior_at_first_step_is_the_data():
    x0, xk = jnp.full((2, 3), 0.3), jnp.full((2, 3), -2.0)
    m, v, _ = diffusion.q_posterior(SCHEDULE, x0, xk, jnp.zeros(2, jnp.int32))
    np.testing.assert_allclose(m, x0, atol=1e-6)
    assert float(v.max()) == 0.0


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
@pytest.mark.parametrize(
    "schedule", [SCHEDULE, respace("linear", 100, 10)], ids=["full", "respaced"]
)
def test_conversions_round_trip(prediction, schedule):
    key = jax.random.PRNGKey(2)
    x0 = jax.random.uniform(key, (64, 4, 4, 1), minval=-1, maxval=1)
    eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    k = jax.random.randint(jax.random.fold_in(key, 2), (64,), 0, schedule.num_steps)
    xk = diffusion.q_sample(schedule, x0, k, eps)
    out = diffusion.target(schedule, prediction, x0, xk, k, eps)
    x0_hat, eps_hat = diffusion.to_x0_eps(schedule, prediction, out, xk, k)
    # x0 from eps divides by sqrt(abar): the noisiest rows amplify float32 rounding.
    scale = np.asarray(schedule.sqrt_recip_alpha_bar)[np.asarray(k)][:, None, None, None]
    np.testing.assert_allclose(x0_hat, x0, atol=1e-5 * scale.max() + 1e-5)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-3)


def test_v_closed_form():
    a = float(SCHEDULE.alpha_bar[30])
    x0, eps = jnp.full((1, 2), 0.5), jnp.full((1, 2), -1.0)
    v = diffusion.v_from_x0_eps(SCHEDULE, x0, eps, jnp.array([30]))
    np.testing.assert_allclose(v, np.sqrt(a) * -1.0 - np.sqrt(1 - a) * 0.5, rtol=1e-5)


def test_mean_target_uses_training_chain_on_respaced_schedule():
    """A mean-predicting network outputs the *training* chain's posterior mean, even when the
    sampler walks a respaced chain."""
    sub = respace("linear", 100, 10)
    row = 5
    t = int(sub.timesteps[row])
    x0, xk = jnp.full((1, 2), 0.4), jnp.full((1, 2), 1.3)
    full_mean, _, _ = diffusion.q_posterior(SCHEDULE, x0, xk, jnp.array([t]))
    np.testing.assert_allclose(
        diffusion.model_mean_from_x0(sub, xk, jnp.array([row]), x0), full_mean, rtol=1e-6
    )


def test_clipping_keeps_x0_and_eps_consistent():
    k = jnp.full((8,), 90)
    xk = jnp.linspace(-3, 3, 16).reshape(8, 2)
    out = jnp.full((8, 2), -2.5)  # an eps that implies x0 far outside [-1, 1]
    x0, eps = diffusion.to_x0_eps(SCHEDULE, "eps", out, xk, k, clip=(-1.0, 1.0))
    assert float(jnp.abs(x0).max()) <= 1.0
    rebuilt = diffusion.q_sample(SCHEDULE, x0, k, eps)
    np.testing.assert_allclose(rebuilt, xk, atol=1e-5)


def test_dynamic_threshold_against_numpy():
    rng = np.random.default_rng(0)
    x0 = rng.normal(0, 1.5, (6, 4, 4, 1)).astype(np.float32)
    x0[0] = np.clip(x0[0], -0.9, 0.9)  # already inside the data range: left alone
    out = np.asarray(diffusion.dynamic_threshold(jnp.asarray(x0), 0.9))
    flat = np.abs(x0.reshape(6, -1).astype(np.float64))
    s = np.maximum(np.quantile(flat, 0.9, axis=1), 1.0)[:, None, None, None]
    np.testing.assert_allclose(out, np.clip(x0, -s, s) / s, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[0], x0[0])
    assert np.abs(out).max() <= 1.0


def test_thresholding_keeps_x0_and_eps_consistent():
    k = jnp.full((8,), 90)
    xk = jnp.linspace(-3, 3, 16).reshape(8, 2)
    out = jnp.full((8, 2), -2.5)
    x0, eps = diffusion.to_x0_eps(SCHEDULE, "eps", out, xk, k, clip=None, threshold=0.995)
    raw, _ = diffusion.to_x0_eps(SCHEDULE, "eps", out, xk, k)
    np.testing.assert_allclose(x0, diffusion.dynamic_threshold(raw, 0.995), rtol=1e-6)
    np.testing.assert_allclose(diffusion.q_sample(SCHEDULE, x0, k, eps), xk, atol=1e-5)


def test_unknown_prediction():
    with pytest.raises(ValueError, match="prediction must be one of"):
        diffusion.to_x0_eps(
            SCHEDULE, "score", jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros(1, int)
        )
