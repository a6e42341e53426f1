"""Schedules against independently written float64 formulas."""

import math

import numpy as np
import pytest

from diffusion_jax import schedules
from diffusion_jax.schedules import (
    LOGSNR_MIN,
    SPACINGS,
    get_betas,
    make_schedule,
    max_steps,
    respace,
    respaced_timesteps,
)


def reference_alpha_bar(name, T):
    """alpha_bar written out step by step in plain Python floats (no numpy vectorisation)."""
    if name == "linear":
        lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
        betas = [min(lo + (hi - lo) * i / max(T - 1, 1), 0.999) for i in range(T)]
    elif name == "cosine":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    else:
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        f = lambda u: (sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3))  # noqa: E731
        betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    out, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return np.array(betas), np.array(out)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
@pytest.mark.parametrize("T", [10, 100, 1000])
def test_schedule_matches_reference(name, T):
    s = make_schedule(name, T)
    betas, abar = reference_alpha_bar(name, T)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(s.betas, betas, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(s.alpha_bar, abar, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(s.sqrt_one_minus_alpha_bar, np.sqrt(1 - abar), rtol=1e-5)
    np.testing.assert_allclose(s.sqrt_recip_alpha_bar, 1 / np.sqrt(abar), rtol=1e-5)
    # Posterior variance from Bayes' rule: 1 / (1 / (1 - abar_prev) + alpha / beta).
    alpha = 1 - betas
    expected_var = np.zeros(T)
    expected_var[1:] = 1 / (1 / (1 - abar_prev[1:]) + alpha[1:] / betas[1:])
    np.testing.assert_allclose(s.posterior_variance, expected_var, rtol=1e-4, atol=1e-12)
    assert s.posterior_variance[0] == 0
    assert np.all(np.isfinite(s.posterior_log_variance_clipped))
    np.testing.assert_array_equal(s.timesteps, np.arange(T))
    assert s.betas.dtype == np.float32 and s.num_steps == T


@pytest.mark.parametrize("name", schedules.SCHEDULES)
@pytest.mark.parametrize("T", [10, 50, 250, 1000, 4000])
def test_final_step_holds_no_signal(name, T):
    assert float(make_schedule(name, T).sqrt_alpha_bar[-1]) < 0.01


def test_linear_default_is_ddpm():
    s = make_schedule("linear", 1000)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)


@pytest.mark.parametrize("K", [1, 2, 7, 50, 100])
def test_respaced_consistent_with_full(K):
    full, sub = make_schedule("cosine", 100), respace("cosine", 100, K)
    ts = np.asarray(sub.timesteps)
    assert ts.shape == (K,) and ts[-1] == 99 and np.all(np.diff(ts) > 0)
    if K >= 2:
        assert ts[0] == 0
    # Same marginals, and the shorter chain's betas compose back to them.
    np.testing.assert_allclose(sub.alpha_bar, np.asarray(full.alpha_bar)[ts], rtol=1e-6)
    # (alphas, not 1 - betas: a float32 beta near 1 keeps few digits of 1 - beta.)
    np.testing.assert_allclose(
        np.cumprod(np.asarray(sub.alphas, np.float64)), sub.alpha_bar, rtol=1e-5
    )
    np.testing.assert_allclose(sub.betas, 1 - np.asarray(sub.alphas, np.float64), atol=1e-7)
    # A mean-predicting network was trained on the full chain's posterior means.
    np.testing.assert_allclose(sub.model_mean_coef1, np.asarray(full.posterior_mean_coef1)[ts])


def test_respace_all_steps_is_identity():
    full, same = make_schedule("linear", 30), respace("linear", 30, 30)
    for a, b in zip(full.__dict__.values(), same.__dict__.values(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_respaced_timesteps_even():
    np.testing.assert_array_equal(respaced_timesteps(1000, 5), [0, 250, 500, 749, 999])


def training_log_snr(name, T):
    alpha_bar = np.cumprod(1.0 - get_betas(name, T))
    return alpha_bar, np.log(alpha_bar / (1.0 - alpha_bar))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T, K", [(1000, 10), (1000, 20), (30, 20), (30, 30), (50, 2), (50, 1)])
def test_spacings_keep_distinct_steps_and_both_ends(name, spacing, T, K):
    alpha_bar, logsnr = training_log_snr(name, T)
    # logsnr and karras stop where the log-SNR falls below its floor (only the cosine tail does)
    top = np.max(np.nonzero(logsnr >= LOGSNR_MIN)) if spacing in schedules.SNR_SPACINGS else T - 1
    assert max_steps(name, T, spacing) == top + 1
    if K > top + 1:
        floor = f", {top + 1} above the log-SNR floor" if top < T - 1 else ""
        with pytest.raises(ValueError, match=rf"num_steps must be in \[1, {top + 1}\] .*{floor}\)"):
            respaced_timesteps(T, K, spacing, alpha_bar)
        return
    ts = respaced_timesteps(T, K, spacing, alpha_bar)
    assert ts.shape == (K,) and ts[-1] == top and np.all(np.diff(ts) > 0)
    assert K == 1 or ts[0] == 0
    assert np.all(respace(name, T, K, spacing).timesteps == ts)


def test_quadratic_spacing_is_the_formula():
    i = np.arange(10) / 9.0
    np.testing.assert_array_equal(respaced_timesteps(1000, 10, "quadratic"), np.round(999 * i**2))


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_logsnr_spacing_is_even_in_log_snr(name):
    """Each kept step is within one timestep of the one whose log-SNR is nearest its target, the
    targets evenly spaced in log-SNR from t = 0 to the last timestep at or above LOGSNR_MIN
    (brute force over all timesteps)."""
    T, K = 1000, 12
    alpha_bar, logsnr = training_log_snr(name, T)
    ts = respaced_timesteps(T, K, "logsnr", alpha_bar)
    top = np.max(np.nonzero(logsnr >= LOGSNR_MIN))
    targets = np.linspace(logsnr[0], logsnr[top], K)
    nearest = np.argmin(np.abs(logsnr[None, :] - targets[:, None]), axis=1)
    assert np.all(np.abs(ts - nearest) <= 1), (ts, nearest)
    assert (ts[-1] == T - 1) == (name == "linear")  # the cosine tail lies below the floor


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: respace("linear", 10, 3, "log"), "spacing must be one of"),
        (lambda: respaced_timesteps(10, 3, "logsnr"), "needs the training alpha_bar"),
        (lambda: make_schedule("quadratic", 10), "schedule must be one of"),
        (lambda: make_schedule("linear", 0), "num_timesteps"),
        (lambda: make_schedule("linear", 2.5), "num_timesteps"),
        (lambda: respace("linear", 10, 11), r"num_steps must be in \[1, 10\]"),
        (lambda: respace("linear", 10, 0), "num_steps"),
        (lambda: respace("linear", 10, 3.0), "num_steps"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
