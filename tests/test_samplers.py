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
from exact import gaussian_chain_moments, mixture_eps, mixture_params

from diffusion_jax import samplers
from diffusion_jax.samplers import sample
from diffusion_jax.schedules import make_schedule, respace

N = 4000
MU, STD = np.array([0.5, -0.3]), 0.4


def moments_ok(x, mean, var, sigmas=5.0):
    """Sample mean/variance within ``sigmas`` standard errors of (mean, var), per dimension."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    assert np.all(np.abs(x.mean(0) - mean) < sigmas * np.sqrt(var / n)), (x.mean(0), mean)
    assert np.all(np.abs(x.var(0) - var) < sigmas * var * np.sqrt(2 / n)), (x.var(0), var)


CASES = [  # (method, steps, variance, eta)
    ("ddpm", 100, "small", 0.0),
    ("ddpm", 100, "large", 0.0),
    ("ddpm", 10, "small", 0.0),  # strided ancestral
    ("ddim", 10, "small", 0.0),
    ("ddim", 10, "small", 0.5),
    ("ddim", 100, "small", 0.0),
]


@pytest.mark.parametrize("method, steps, variance, eta", CASES)
def test_gaussian_matches_exact_chain(method, steps, variance, eta):
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
        method=method,
        variance=variance,
        eta=eta,
        clip=None,
    )
    mean, var = gaussian_chain_moments(sched.alpha_bar, MU, STD, method, variance, eta)
    moments_ok(out.samples, mean, var)


@pytest.mark.parametrize("method, steps", [("ddpm", 1000), ("ddim", 1000), ("ddim", 250)])
def test_long_chain_reproduces_the_gaussian(method, steps):
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
        method=method,
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


@pytest.mark.parametrize("method, steps", [("ddpm", 1000), ("ddpm", 100), ("ddim", 50)])
def test_mixture_conditional_and_unconditional(mixture, method, steps):
    T, params = mixture
    sched = respace("cosine", T, steps)
    labels = np.arange(N) % 3
    kw = dict(num_classes=3, method=method, clip=None)
    cond = np.asarray(
        sample(
            mixture_eps, params, sched, jax.random.PRNGKey(2), (N, 2), labels=labels, **kw
        ).samples,
        np.float64,
    )
    for c in range(3):
        # each class is a Gaussian, so its samples follow the exact chain's moments ...
        xc = cond[labels == c]
        moments_ok(xc, *gaussian_chain_moments(sched.alpha_bar, MEANS[c], MIX_STD, method))
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


def test_no_unconditional_pass_at_w0():
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
        )
        # one call per step, traced once inside lax.scan
        assert batches == expected, (w, batches)


def test_guidance_combination():
    def fn(params, x, t, labels):  # conditional output = label, unconditional = null label (5)
        return jnp.broadcast_to(labels[:, None].astype(jnp.float32), x.shape)

    x = jnp.zeros((3, 2))
    labels = jnp.array([0, 2, 4])
    out = samplers.guided_output(fn, None, x, jnp.zeros(3, jnp.int32), labels, 0.5, 5, True)
    np.testing.assert_allclose(out[:, 0], 1.5 * np.array([0, 2, 4]) - 0.5 * 5)
    per_sample_w = jnp.array([0.0, 1.0, 2.0])
    out = samplers.guided_output(
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
                method="ddim",
                clip=None,
            ).samples
        )
        spread.append(np.mean(x[:, 1]))
    assert spread[1] > spread[0] + 0.01  # class 2 sits above the others (y = 0.6 vs -0.4)


def test_determinism_and_snapshots(mixture):
    T, params = mixture
    sched = respace("cosine", T, 20)
    kw = dict(num_classes=3, labels=np.arange(16) % 3, method="ddpm", num_snapshots=5, clip=None)
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


@pytest.mark.parametrize("method, w", [("ddpm", 0.0), ("ddim", 2.0)])
def test_python_loop_and_unroll_match_the_scan(mixture, method, w):
    """The benchmark's baselines compute the same chain: a Python loop over the jitted step, and
    the scan at another unroll factor."""
    T, params = mixture
    sched = respace("cosine", T, 12)
    labels = np.arange(16) % 3
    kw = dict(num_classes=3, labels=labels, w=w, method=method, eta=0.5, clip=None)
    scan = sample(mixture_eps, params, sched, jax.random.PRNGKey(5), (16, 2), **kw).samples
    unrolled = sample(
        mixture_eps, params, sched, jax.random.PRNGKey(5), (16, 2), unroll=4, **kw
    ).samples
    loop = samplers.sample_python_loop(
        mixture_eps,
        params,
        sched,
        jax.random.PRNGKey(5),
        labels,
        w,
        0.5,
        shape=(16, 2),
        method=method,
        variance="small",
        prediction="eps",
        clip=None,
        guided=w > 0,
        null_label=3,
    )
    assert np.std(np.asarray(scan)) > 0.1  # real samples, not zeros
    np.testing.assert_allclose(unrolled, scan, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loop, scan, rtol=1e-5, atol=1e-5)


def test_same_shapes_do_not_recompile(mixture):
    T, params = mixture
    sched = respace("cosine", T, 10)
    kw = dict(num_classes=3, labels=np.arange(8) % 3, method="ddim")
    sample(mixture_eps, params, sched, jax.random.PRNGKey(0), (8, 2), w=1.0, **kw)
    before = samplers._sample_chain._cache_size()
    for i, w in enumerate([0.5, 2.0, 4.0]):
        sample(mixture_eps, params, sched, jax.random.PRNGKey(i), (8, 2), w=w, eta=0.3 * i, **kw)
    assert samplers._sample_chain._cache_size() == before


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="euler"), "method must be one of"),
        (dict(variance="learned"), "variance must be one of"),
        (dict(eta=-0.1), "eta must be"),
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
