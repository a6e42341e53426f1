"""The training loss against closed-form minima, and label dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exact import mixture_eps, mixture_params

from diffusion_jax import losses
from diffusion_jax.schedules import make_schedule

SCHEDULE = make_schedule("cosine", 50)
MU, STD = np.array([0.5, -0.3]), 0.4
PARAMS = mixture_params(MU[None], STD, [1.0], SCHEDULE.alpha_bar)


def gaussian_batch(n, seed=0):
    return jnp.asarray(MU + STD * np.random.default_rng(seed).standard_normal((n, 2)), jnp.float32)


def loss_of(denoise_fn, prediction="eps", n=100_000, **kw):
    loss, per_example = jax.jit(
        lambda key, x0: losses.diffusion_loss(
            denoise_fn,
            PARAMS,
            SCHEDULE,
            key,
            x0,
            jnp.zeros(n, jnp.int32),
            null_label=1,
            prediction=prediction,
            **kw,
        )
    )(jax.random.PRNGKey(0), gaussian_batch(n))
    return float(loss), np.asarray(per_example)


def test_optimal_eps_loss_is_the_posterior_variance():
    """With the exact E[eps | x_t], the L2 loss is E_t[Var(eps | x_t)], which for Gaussian data is
    E_t[a s^2 / (a s^2 + 1 - a)] per dimension, t uniform over all T."""
    a = np.asarray(SCHEDULE.alpha_bar, np.float64)
    expected = np.mean(a * STD**2 / (a * STD**2 + 1 - a))
    loss, per_example = loss_of(mixture_eps)
    se = per_example.std() / np.sqrt(per_example.size)
    assert abs(loss - expected) < 5 * se


def test_zero_denoiser_eps_loss_is_one():
    loss, per_example = loss_of(lambda p, x, t, y: jnp.zeros_like(x))
    assert abs(loss - 1.0) < 5 * per_example.std() / np.sqrt(per_example.size)


def test_x0_loss_of_the_data_mean_is_the_data_variance():
    loss, per_example = loss_of(
        lambda p, x, t, y: jnp.broadcast_to(jnp.asarray(MU, jnp.float32), x.shape),
        prediction="x0",
        loss_type="l2",
    )
    assert abs(loss - STD**2) < 5 * per_example.std() / np.sqrt(per_example.size)


def test_l1_of_zero_denoiser_is_mean_abs_normal():
    loss, per_example = loss_of(lambda p, x, t, y: jnp.zeros_like(x), loss_type="l1")
    assert abs(loss - np.sqrt(2 / np.pi)) < 5 * per_example.std() / np.sqrt(per_example.size)


def test_vlb_weighting_divides_by_two_beta():
    seen_t = []

    def zero(p, x, t, y):
        seen_t.append(np.asarray(t))
        return jnp.zeros_like(x)

    key, x0 = jax.random.PRNGKey(3), gaussian_batch(256)
    labels = jnp.zeros(256, jnp.int32)
    kw = dict(null_label=1, prediction="mean")
    _, simple = losses.diffusion_loss(zero, PARAMS, SCHEDULE, key, x0, labels, **kw)
    _, vlb = losses.diffusion_loss(zero, PARAMS, SCHEDULE, key, x0, labels, weighting="vlb", **kw)
    np.testing.assert_array_equal(seen_t[0], seen_t[1])
    beta = np.asarray(SCHEDULE.betas, np.float64)[seen_t[0]]
    np.testing.assert_allclose(vlb, np.asarray(simple) / (2 * beta), rtol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weighting_per_example(prediction):
    """Each example's loss is scaled by min(SNR, gamma) expressed in the prediction's space
    (float64 numpy from alpha_bar of the timesteps the network saw)."""
    seen_t = []

    def zero(p, x, t, y):
        seen_t.append(np.asarray(t))
        return jnp.zeros_like(x)

    key, x0 = jax.random.PRNGKey(5), gaussian_batch(512)
    kw = dict(null_label=1, prediction=prediction)
    labels = jnp.zeros(512, jnp.int32)
    _, simple = losses.diffusion_loss(zero, PARAMS, SCHEDULE, key, x0, labels, **kw)
    _, weighted = losses.diffusion_loss(
        zero, PARAMS, SCHEDULE, key, x0, labels, weighting="min_snr", min_snr_gamma=3.0, **kw
    )
    np.testing.assert_array_equal(seen_t[0], seen_t[1])
    a = np.asarray(SCHEDULE.alpha_bar, np.float64)[seen_t[0]]
    snr = a / (1 - a)
    x0_weight = np.minimum(snr, 3.0)
    expected = {"eps": x0_weight / snr, "v": x0_weight / (snr + 1), "x0": x0_weight}[prediction]
    assert (expected < 1).any() and (expected > 0).all()  # the cap is active for some steps
    np.testing.assert_allclose(weighted, np.asarray(simple) * expected, rtol=2e-5)


def test_min_snr_eps_loss_of_zero_denoiser():
    """With eps = 0 predicted, E[|eps|^2]/d = 1, so the loss is E_t[min(SNR, g) / SNR]."""
    a = np.asarray(SCHEDULE.alpha_bar, np.float64)
    snr = a / (1 - a)
    expected = np.mean(np.minimum(snr, 5.0) / snr)
    loss, per_example = loss_of(lambda p, x, t, y: jnp.zeros_like(x), weighting="min_snr")
    assert abs(loss - expected) < 5 * per_example.std() / np.sqrt(per_example.size)


def test_label_dropout_rate_under_jit():
    labels = jnp.arange(200_000, dtype=jnp.int32) % 10
    dropped = jax.jit(losses.drop_labels, static_argnums=(2, 3))(
        jax.random.PRNGKey(4), labels, 0.1, 10
    )
    dropped = np.asarray(dropped)
    rate = np.mean(dropped == 10)
    assert abs(rate - 0.1) < 5 * np.sqrt(0.1 * 0.9 / labels.size)
    kept = dropped != 10
    np.testing.assert_array_equal(dropped[kept], np.asarray(labels)[kept])


@pytest.mark.parametrize("p_uncond", [0.25, None])  # None: the documented default, 0.1
def test_loss_sees_dropped_labels(p_uncond):
    """The denoiser receives the null label for about p_uncond of the batch."""
    seen = []

    def spy(p, x, t, y):
        seen.append(y)
        return jnp.zeros_like(x)

    n = 20_000
    kw = {} if p_uncond is None else {"p_uncond": p_uncond}
    losses.diffusion_loss(
        spy,
        PARAMS,
        SCHEDULE,
        jax.random.PRNGKey(5),
        gaussian_batch(n),
        jnp.zeros(n, jnp.int32),
        null_label=1,
        **kw,
    )
    p = 0.1 if p_uncond is None else p_uncond
    rate = float(jnp.mean(seen[0] == 1))
    assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(prediction="noise"), "prediction must be one of"),
        (dict(loss_type="huber"), "loss_type must be one of"),
        (dict(weighting="snr"), "weighting must be one of"),
        (dict(weighting="vlb", prediction="eps"), "applies to prediction='mean'"),
        (dict(weighting="min_snr", prediction="mean"), "applies to prediction eps, v or x0"),
    ],
)
def test_bad_loss_config(kw, match):
    with pytest.raises(ValueError, match=match):
        losses.check_loss_config(
            **{"prediction": "eps", "loss_type": "l2", "weighting": "simple", **kw}
        )
