"""Samplers driven by the exact denoiser of a known distribution.

Two kinds of check: (1) for Gaussian data every sampler step is affine, so the output's exact mean
and variance are propagated in float64 (tests/exact.py, from the papers' update rules) and the
samples must match them within Monte-Carlo error, whatever the number of steps; (2) long chains
must reproduce the data distribution itself, including class-conditional means and the class
proportions of a mixture.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exact import (
    dpmpp2m_reference,
    gaussian_chain_moments,
    gaussian_eps_np,
    gaussian_flow,
    mixture_eps,
    mixture_params,
)

from diffusion_jax import diffusion, guidance, samplers, schedules, solvers
from diffusion_jax.samplers import sample
from diffusion_jax.schedules import make_schedule, respace, respaced_timesteps

N = 4000
MU, STD = np.array([0.5, -0.3]), 0.4


def moments_ok(x, mean, var, sigmas=5.0):
    """Sample mean/variance within ``sigmas`` standard errors of (mean, var), per dimension."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    assert np.all(np.abs(x.mean(0) - mean) < sigmas * np.sqrt(var / n)), (x.mean(0), mean)
    assert np.all(np.abs(x.var(0) - var) < sigmas * var * np.sqrt(2 / n)), (x.var(0), var)


CASES = [  # (solver, steps, variance, eta)
    ("ddpm", 100, "small", 0.0),
    ("ddpm", 100, "large", 0.0),
    ("ddpm", 10, "small", 0.0),  # strided ancestral
    ("ddim", 10, "small", 0.0),
    ("ddim", 10, "small", 0.5),
    ("ddim", 100, "small", 0.0),
]


@pytest.mark.parametrize("solver, steps, variance, eta", CASES)
def test_gaussian_matches_exact_chain(solver, steps, variance, eta):
    T = 100
    params = mixture_params(MU[None], STD, [1.0], make_schedule("linear", T).alpha_bar)
    sched = respace("linear", T, steps)
    out = sample(
        mixture_eps,
        params,
        sched,
        jax.random.PRNGKey(0),
        (N, 2),
        num_classes=1,
        labels=np.zeros(N, np.int32),
        solver=solver,
        variance=variance,
        eta=eta,
        clip=None,
    )
    mean, var = gaussian_chain_moments(sched.alpha_bar, MU, STD, solver, variance, eta)
    moments_ok(out.samples, mean, var)


@pytest.mark.parametrize("solver, steps", [("ddpm", 1000), ("ddim", 1000), ("ddim", 250)])
def test_long_chain_reproduces_the_gaussian(solver, steps):
    T = 1000
    params = mixture_params(MU[None], STD, [1.0], make_schedule("cosine", T).alpha_bar)
    out = sample(
        mixture_eps,
        params,
        respace("cosine", T, steps),
        jax.random.PRNGKey(1),
        (N, 2),
        num_classes=1,
        labels=np.zeros(N, np.int32),
        solver=solver,
        clip=None,
    )
    x = np.asarray(out.samples, np.float64)
    # The discretised chain's own bias here is < 1% in std (tests/exact.py), well inside 5 SE.
    moments_ok(x, MU, STD**2)


MEANS = np.array([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.6]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
MIX_STD = 0.15


@pytest.fixture(scope="module")
def mixture():
    T = 1000
    return T, mixture_params(MEANS, MIX_STD, WEIGHTS, make_schedule("cosine", T).alpha_bar)


@pytest.mark.parametrize("solver, steps", [("ddpm", 1000), ("ddpm", 100), ("ddim", 50)])
def test_mixture_conditional_and_unconditional(mixture, solver, steps):
    T, params = mixture
    sched = respace("cosine", T, steps)
    labels = np.arange(N) % 3
    kw = dict(num_classes=3, solver=solver, clip=None)
    cond = np.asarray(
        sample(
            mixture_eps, params, sched, jax.random.PRNGKey(2), (N, 2), labels=labels, **kw
        ).samples,
        np.float64,
    )
    for c in range(3):
        # each class is a Gaussian, so its samples follow the exact chain's moments ...
        xc = cond[labels == c]
        moments_ok(xc, *gaussian_chain_moments(sched.alpha_bar, MEANS[c], MIX_STD, solver))
        # ... and their mean is the class mean
        assert np.all(np.abs(xc.mean(0) - MEANS[c]) < 5 * MIX_STD / np.sqrt(len(xc)) + 2e-3)
    uncond = np.asarray(
        sample(mixture_eps, params, sched, jax.random.PRNGKey(3), (N, 2), **kw).samples, np.float64
    )
    nearest = np.argmin(((uncond[:, None] - MEANS[None]) ** 2).sum(-1), axis=1)
    freq = np.bincount(nearest, minlength=3) / N
    assert np.all(np.abs(freq - WEIGHTS) < 5 * np.sqrt(WEIGHTS * (1 - WEIGHTS) / N)), freq
    np.testing.assert_allclose(uncond.mean(0), WEIGHTS @ MEANS, atol=0.03)


def counting_denoiser(batches):
    """A fresh denoiser (so jit traces it anew) that records the batch size of each trace call."""

    def fn(params, x, t, labels):
        batches.append(x.shape[0])
        return jnp.zeros_like(x) + labels[:, None].astype(x.dtype)

    return fn


@pytest.mark.parametrize("solver", solvers.TRAINED)
def test_no_unconditional_pass_at_w0(solver):
    """One denoiser call per step: on the batch at w = 0, on the doubled batch with guidance."""
    sched = respace("cosine", 50, 5)
    for w, expected in [(0.0, [8]), (1.5, [16])]:
        batches = []
        sample(
            counting_denoiser(batches),
            {},
            sched,
            jax.random.PRNGKey(0),
            (8, 2),
            num_classes=3,
            labels=np.zeros(8, np.int32),
            w=w,
            solver=solver,
        )
        # one call per step, traced once inside lax.scan
        assert batches == expected, (w, batches)


def test_guidance_combination():
    def fn(params, x, t, labels):  # conditional output = label, unconditional = null label (5)
        return jnp.broadcast_to(labels[:, None].astype(jnp.float32), x.shape)

    x = jnp.zeros((3, 2))
    labels = jnp.array([0, 2, 4])
    out = guidance.guided_output(fn, None, x, jnp.zeros(3, jnp.int32), labels, 0.5, 5, True)
    np.testing.assert_allclose(out[:, 0], 1.5 * np.array([0, 2, 4]) - 0.5 * 5)
    per_sample_w = jnp.array([0.0, 1.0, 2.0])
    out = guidance.guided_output(
        fn, None, x, jnp.zeros(3, jnp.int32), labels, per_sample_w, 5, True
    )
    np.testing.assert_allclose(out[:, 0], [0.0, 2 * 2 - 5, 3 * 4 - 2 * 5])


def test_guidance_sharpens_classes(mixture):
    """At w > 0 the guided score p(x|c)^(1+w) / p(x)^w pushes samples away from other classes."""
    T, params = mixture
    sched = respace("cosine", T, 50)
    labels = np.full(N, 2)
    spread = []
    for w in (0.0, 3.0):
        x = np.asarray(
            sample(
                mixture_eps,
                params,
                sched,
                jax.random.PRNGKey(4),
                (N, 2),
                num_classes=3,
                labels=labels,
                w=w,
                solver="ddim",
                clip=None,
            ).samples
        )
        spread.append(np.mean(x[:, 1]))
    assert spread[1] > spread[0] + 0.01  # class 2 sits above the others (y = 0.6 vs -0.4)


def test_determinism_and_snapshots(mixture):
    T, params = mixture
    sched = respace("cosine", T, 20)
    kw = dict(num_classes=3, labels=np.arange(16) % 3, solver="ddpm", num_snapshots=5, clip=None)
    a = sample(mixture_eps, params, sched, jax.random.PRNGKey(7), (16, 2), **kw)
    b = sample(mixture_eps, params, sched, jax.random.PRNGKey(7), (16, 2), **kw)
    c = sample(mixture_eps, params, sched, jax.random.PRNGKey(8), (16, 2), **kw)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.allclose(a.samples, c.samples)
    assert a.snapshots.shape == (5, 16, 2)
    np.testing.assert_array_equal(a.snapshots[-1], a.samples)
    # the first frame is the starting noise: standard normal, far from the data
    assert abs(float(a.snapshots[0].std()) - 1.0) < 0.4
    assert (
        sample(
            mixture_eps, params, sched, jax.random.PRNGKey(7), (16, 2), **{**kw, "num_snapshots": 0}
        ).snapshots
        is None
    )
    one = sample(
        mixture_eps, params, sched, jax.random.PRNGKey(7), (16, 2), **{**kw, "num_snapshots": 1}
    )
    np.testing.assert_array_equal(one.snapshots[0], a.samples)  # a single frame is the result


@pytest.mark.parametrize("solver, w", [("ddpm", 0.0)] + [(s, 2.0) for s in solvers.TRAINED])
def test_python_loop_and_unroll_match_the_scan(mixture, solver, w):
    """The benchmark's baselines compute the same chain: a Python loop over the jitted step, and
    the scan at another unroll factor."""
    T, params = mixture
    sched = respace("cosine", T, 12)
    labels = np.arange(16) % 3
    kw = dict(num_classes=3, labels=labels, w=w, solver=solver, eta=0.5, clip=None)
    scan = sample(mixture_eps, params, sched, jax.random.PRNGKey(5), (16, 2), **kw).samples
    unrolled = sample(
        mixture_eps, params, sched, jax.random.PRNGKey(5), (16, 2), unroll=4, **kw
    ).samples
    call = samplers.prepare_chain(mixture_eps, params, sched, jax.random.PRNGKey(5), (16, 2), **kw)
    loop = samplers.sample_python_loop(call)
    assert np.std(np.asarray(scan)) > 0.1  # real samples, not zeros
    np.testing.assert_allclose(unrolled, scan, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loop, scan, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(solver="euler"), "must be one of the registered"),
        (dict(threshold=1.5), "threshold is a quantile"),
        (dict(threshold=float("nan")), "threshold is a quantile"),
        (dict(clip=(1.0, -1.0)), "clip must be"),
        (dict(unroll=0), "unroll must be"),
        (dict(variance="learned"), "variance must be one of"),
        (dict(eta=-0.1), "eta must be"),
        (dict(eta=1.5), r"eta must be in \[0, 1\]"),
        (dict(labels=np.array([0, 4])), r"labels must be in \[0, 3\]"),
        (dict(labels=np.array([0, -1])), "labels must be in"),
        (dict(labels=np.array([0, 1, 2])), "labels has 3 entries"),
        (dict(w=-1.0), "w must be finite and >= 0"),
        (dict(w=1.0, labels=None), "guidance"),
        (dict(prediction="score"), "prediction must be one of"),
        (dict(num_snapshots=7), "num_snapshots"),
    ],
)
def test_bad_arguments(kw, match):
    sched = respace("cosine", 20, 5)
    args = {"num_classes": 3, "labels": np.array([0, 1]), **kw}
    with pytest.raises(ValueError, match=match):
        sample(mixture_eps, {}, sched, jax.random.PRNGKey(0), (2, 2), **args)


# ---------------------------------------------------------------- few-step solvers


def gaussian_setup(T, schedule="cosine"):
    return mixture_params(MU[None], STD, [1.0], make_schedule(schedule, T).alpha_bar)


def run_chain(params, sched, solver, n=N, key=0, **kw):
    """Samples and the starting noise x_T (float64) of a chain on the 2-D Gaussian."""
    kw = dict(num_classes=1, labels=np.zeros(n, np.int32), solver=solver, clip=None, **kw)
    out = sample(mixture_eps, params, sched, jax.random.PRNGKey(key), (n, 2), **kw)
    x_start, _ = samplers.initial_noise(jax.random.PRNGKey(key), (n, 2))
    return out, np.asarray(x_start, np.float64)


@pytest.mark.parametrize("steps, spacing", [(5, "uniform"), (10, "uniform"), (20, "logsnr")])
def test_dpmpp2m_matches_float64_reference(steps, spacing):
    """Sample by sample, against Algorithm 2 of the paper run in float64 (tests/exact.py)."""
    T = 1000
    sched = respace("cosine", T, steps, spacing)
    out, x_start = run_chain(gaussian_setup(T), sched, "dpmpp2m", n=256)
    abar = np.asarray(sched.alpha_bar, np.float64)
    ref = dpmpp2m_reference(x_start, abar, lambda x, i: gaussian_eps_np(x, abar[i], MU, STD))
    # float32: x0 from eps at the noisiest row divides by sqrt(abar) ~ 1e-3 (cosine, T = 1000),
    # which magnifies the rounding of x and eps; an error in the update rule would be far larger
    np.testing.assert_allclose(out.samples, ref, rtol=0, atol=1e-3)
    assert np.mean(np.abs(np.asarray(out.samples) - ref)) < 1e-4


def affine_moments(samples, x_start):
    """Mean and variance of a deterministic sampler's output for x_T ~ N(0, I): on Gaussian data
    with the exact denoiser every step is affine, so output = p x_T + q per dimension; a least
    squares fit recovers (p, q) exactly (no Monte-Carlo error) and the moments are (q, p^2)."""
    y = np.asarray(samples, np.float64)
    moments = []
    for d in range(y.shape[1]):
        p, q = np.polyfit(x_start[:, d], y[:, d], 1)
        moments.append((q, p**2))
    mean, var = np.array(moments).T
    return mean, var


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp2m_closer_to_the_data_than_ddim(steps):
    """Each on the spacing it is registered with (DDIM uniform in t, DPM-Solver++ its own)."""
    T = 1000
    params = gaussian_setup(T)
    errors = {}
    for solver in ("ddim", "dpmpp2m"):
        sched = respace("cosine", T, steps, solvers.get(solver).spacing)
        out, x_start = run_chain(params, sched, solver, n=512)
        mean, var = affine_moments(out.samples, x_start)
        errors[solver] = np.max(np.abs(mean - MU)) / STD + np.max(np.abs(var / STD**2 - 1))
        if solver == "ddim":  # the fit agrees with DDIM's own float64 moment propagation
            exact = gaussian_chain_moments(sched.alpha_bar, MU, STD, "ddim")
            np.testing.assert_allclose((mean, var), exact, rtol=1e-3, atol=1e-4)
    assert errors["dpmpp2m"] < 0.5 * errors["ddim"], errors


def lambda_uniform_chain(steps, T=1025):
    """A training chain whose half log-SNR falls linearly from 5 to -5 over T steps, and its
    ``steps``-row respacing: with T - 1 = 1024 the rows are exactly evenly spaced in lambda for
    steps = 2^j + 1, so doubling the steps halves the solver's step h. (Named schedules cannot
    do this: near the data, consecutive integer timesteps are already ~0.35 apart in lambda.)"""
    alpha_bar = 1.0 / (1.0 + np.exp(-2.0 * np.linspace(5.0, -5.0, T)))
    keep = respaced_timesteps(T, steps)
    return alpha_bar, schedules._schedule(keep, alpha_bar[keep], alpha_bar)


def global_error(solver, steps):
    """Mean |x - exact ODE solution| at row 0 (the last noise level, before the final jump to
    the data) for the 2-D Gaussian."""
    alpha_bar, sched = lambda_uniform_chain(steps)
    params = mixture_params(MU[None], STD, [1.0], alpha_bar)
    out, x_start = run_chain(params, sched, solver, n=256, num_snapshots=steps + 1)
    abar = np.asarray(sched.alpha_bar, np.float64)
    exact = gaussian_flow(x_start, abar[-1], abar[0], MU, STD)
    return np.mean(np.abs(np.asarray(out.snapshots[-2], np.float64) - exact))


def test_global_error_orders():
    """DPM-Solver++(2M)'s global error falls at second order as the step count doubles; DDIM's,
    measured the same way, at first order (a control that the measurement tells them apart)."""
    # 17 is the first count past the pre-asymptotic range (tests/exact.py reference: error ratios
    # 1.4, 3.5, 3.9, 4.0 from 9 to 129 steps)
    steps = np.array([17, 33, 65, 129])
    slopes = {}
    for solver in ("ddim", "dpmpp2m"):
        errors = np.array([global_error(solver, int(k)) for k in steps])
        slopes[solver] = np.polyfit(np.log(steps - 1.0), np.log(errors), 1)[0]
    assert -2.2 < slopes["dpmpp2m"] < -1.8, slopes
    assert -1.2 < slopes["ddim"] < -0.8, slopes


@pytest.mark.parametrize("prediction", ["x0", "v", "mean"])
def test_dpmpp2m_with_every_prediction_type(prediction):
    """The same chain whatever the network predicts: an exact denoiser converted to each
    parameterisation gives the eps-prediction samples."""
    T = 200
    params, sched = gaussian_setup(T), respace("cosine", T, 10)
    full = make_schedule("cosine", T)

    def as_prediction(p, x, t, labels):
        eps = mixture_eps(p, x, t, labels)
        x0 = diffusion.x0_from_eps(full, x, t, eps)
        return diffusion.target(full, prediction, x0, x, t, eps)

    kw = dict(num_classes=1, labels=np.zeros(64, np.int32), solver="dpmpp2m", clip=None, w=1.0)
    ref = sample(mixture_eps, params, sched, jax.random.PRNGKey(3), (64, 2), **kw).samples
    out = sample(
        as_prediction, params, sched, jax.random.PRNGKey(3), (64, 2), prediction=prediction, **kw
    ).samples
    np.testing.assert_allclose(out, ref, atol=2e-4)


def test_dynamic_threshold_reaches_the_samples():
    """A denoiser predicting a fixed x0: the last step returns x0_hat, so the samples are that
    x0 after fixed clipping, or after dynamic thresholding (numpy, per sample)."""
    target = np.array([[3.0, 0.5], [0.2, -0.4]], np.float32)

    def fixed_x0(params, x, t, labels):
        return jnp.broadcast_to(jnp.asarray(target), x.shape)

    sched = respace("cosine", 50, 5)
    kw = dict(num_classes=1, labels=np.zeros(2, np.int32), prediction="x0")
    for solver in solvers.TRAINED:  # every solver's last step, into the data, is x0_hat
        clipped = sample(fixed_x0, {}, sched, jax.random.PRNGKey(0), (2, 2), solver=solver, **kw)
        dynamic = sample(
            fixed_x0, {}, sched, jax.random.PRNGKey(0), (2, 2), solver=solver, threshold=1.0, **kw
        )
        np.testing.assert_allclose(clipped.samples, np.clip(target, -1, 1), atol=1e-6)
        s = np.maximum(np.quantile(np.abs(target.astype(np.float64)), 1.0, axis=1), 1.0)
        np.testing.assert_allclose(dynamic.samples, target / s[:, None], atol=1e-6)


@pytest.mark.parametrize("solver", solvers.TRAINED)
def test_w_eta_labels_and_key_do_not_recompile(mixture, solver):
    T, params = mixture
    sched = respace("cosine", T, 10)
    kw = dict(num_classes=3, solver=solver)
    sample(
        mixture_eps,
        params,
        sched,
        jax.random.PRNGKey(0),
        (8, 2),
        w=1.0,
        labels=np.arange(8) % 3,
        **kw,
    )
    before = samplers._sample_chain._cache_size()
    for i, w in enumerate([0.5, 2.0, 4.0]):
        labels = (np.arange(8) + i) % 3
        key = jax.random.PRNGKey(i)
        sample(mixture_eps, params, sched, key, (8, 2), w=w, labels=labels, eta=0.3 * i, **kw)
    assert samplers._sample_chain._cache_size() == before


def test_registry_drives_the_choices():
    assert samplers.SOLVERS == tuple(solvers.SOLVERS)
    assert {"ddpm", "ddim", "dpmpp2m"} <= set(solvers.SOLVERS)
    for name, solver in solvers.SOLVERS.items():  # settings keep the object, found by name
        assert samplers.SamplerSettings(solver=name).solver is solver
    assert solvers.default_steps("ddpm", 1000) == 1000
    assert solvers.default_steps("dpmpp2m", 1000) == 20
    assert solvers.default_steps("dpmpp2m", 8) == 8
    with pytest.raises(ValueError, match="registered samplers"):
        solvers.get("euler")
    # the x0 modes of the command line, with Saharia et al.'s quantile by default
    assert solvers.x0_settings("threshold") == {"clip": (-1.0, 1.0), "threshold": 0.995}
    assert solvers.x0_settings("none") == {"clip": None, "threshold": None}
    assert solvers.x0_settings("clip", 0.9) == {"clip": (-1.0, 1.0), "threshold": None}


def test_timing_reports_compile_and_sampling_seconds():
    out = sample(
        mixture_eps,
        mixture_params(MU[None], STD, [1.0], make_schedule("cosine", 50).alpha_bar),
        respace("cosine", 50, 4),
        jax.random.PRNGKey(0),
        (8, 2),
        num_classes=1,
        solver="dpmpp2m",
        timed=True,
    )
    assert out.samples.shape == (8, 2)
    timing = out.timing
    assert 0 < timing.compile_s < 300 and 0 < timing.sample_s < 300, timing
