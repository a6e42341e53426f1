"""The registered solvers and the Karras time grid, against independent float64 computations.

Three kinds of check: (1) each few-step solver matches its float64 reference (tests/exact.py,
plain numpy loops written from the papers) sample by sample on the exact denoiser of a Gaussian
mixture; (2) its global error against the exact probability-flow solution of Gaussian data falls
at its order as the steps double; (3) contract tests over the registry ``solvers.SOLVERS`` itself:
every solver runs any chain length, is deterministic for a key, ends on x0_hat, and (the
deterministic ones) reproduces the data's moments at 50 steps. Last, the Karras time grid against
its formula in Python floats.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exact import (
    dpmpp3m_reference,
    gaussian_flow,
    ipndm_reference,
    mixture_eps,
    mixture_eps_np,
    mixture_params,
    unipc_reference,
)

from diffusion_jax import evaluation, samplers, schedules, solvers
from diffusion_jax.schedules import LOGSNR_MIN, make_schedule, respace, respaced_timesteps

T = 1000
MEANS = np.array([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.6]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
MIX_STD = 0.15
MU, STD = np.array([0.5, -0.3]), 0.4
REFERENCES = {"dpmpp3m": dpmpp3m_reference, "unipc": unipc_reference, "ipndm": ipndm_reference}

# The settings field naming the solver ("method" before the SamplingPlan refactor of issue 23).
_SOLVER_FIELD = (
    "solver"
    if "solver" in {f.name for f in dataclasses.fields(samplers.SamplerSettings)}
    else "method"
)


def run(params, schedule, name, n, key=0, num_classes=1, **kw):
    """``(SampleResult, x_T)``: a chain on the exact denoiser without clipping, and its starting
    noise (float64). ``kw`` are further sampler settings."""
    kw = {_SOLVER_FIELD: name, "clip": None, **kw}
    out = samplers.sample(
        mixture_eps,
        params,
        schedule,
        jax.random.PRNGKey(key),
        (n, 2),
        num_classes=num_classes,
        **kw,
    )
    x_start, _ = samplers.initial_noise(jax.random.PRNGKey(key), (n, 2))
    return out, np.asarray(x_start, np.float64)


@pytest.fixture(scope="module")
def mixture():
    return mixture_params(MEANS, MIX_STD, WEIGHTS, make_schedule("cosine", T).alpha_bar)


@pytest.fixture(scope="module")
def gaussian():
    return mixture_params(MU[None], STD, [1.0], make_schedule("cosine", T).alpha_bar)


# ------------------------------------------------------------------ float64 references


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize(
    "chain", [(3, "logsnr"), (8, "karras"), (20, "logsnr"), (9, "mid")], ids="{0[0]}-{0[1]}".format
)
def test_matches_float64_reference(mixture, name, chain):
    """Sample by sample on the three-component mixture; 3 and 8 rows exercise the lower-order
    steps at both ends of short chains, 20 the full-order ones. "mid" starts at middle noise
    (rho = sigma / alpha from 3 down to 0.3, where x0_hat still moves), so that the warm-up steps
    weigh in the result too."""
    steps, spacing = chain
    if spacing == "mid":
        alpha_bar, sched = even_chain(steps, "rho", 0.3, 3.0)
        mixture = mixture_params(MEANS, MIX_STD, WEIGHTS, alpha_bar)
    else:
        sched = respace("cosine", T, steps, spacing)
    out, x_start = run(mixture, sched, name, 256, num_classes=3, num_snapshots=steps + 1)
    abar = np.asarray(sched.alpha_bar, np.float64)
    states = []
    ref = REFERENCES[name](
        x_start,
        abar,
        lambda x, i: mixture_eps_np(x, abar[i], MEANS, MIX_STD, WEIGHTS),
        states=states,
    )
    # Every state of the chain (the snapshots: x at each row, then the samples), so that a step
    # whose error the later ones shrink is still seen. float32: on the cosine chains x0 from eps
    # at the noisiest row divides by sqrt(abar) ~ 6e-3, which magnifies the rounding of x and
    # eps (measured: max 6e-5, mean 3e-6); on "mid" max 1e-6, mean 6e-8. A warm-up weight off by
    # 1/12 moves "mid" by 1.6e-4.
    atol = 1e-5 if spacing == "mid" else 2e-4
    expected = np.stack(states + [ref])
    np.testing.assert_allclose(out.snapshots, expected, rtol=0, atol=atol)
    assert np.mean(np.abs(np.asarray(out.snapshots) - expected)) < atol / 10


# ------------------------------------------------------------------ orders of convergence


def even_chain(steps, variable, low, high, T_fine=1025):
    """A training chain of T_fine rows evenly spaced in ``variable`` ("lambda" = log(alpha /
    sigma), or "rho" = sigma / alpha) from ``high`` noise to ``low``, and its ``steps``-row
    respacing: with T_fine - 1 = 1024 the rows stay evenly spaced for steps = 2^j + 1, so
    doubling the steps halves the step."""
    grid = np.linspace(low, high, T_fine)
    if variable == "lambda":  # lambda falls as t grows
        alpha_bar = 1.0 / (1.0 + np.exp(2.0 * grid))
    else:
        alpha_bar = 1.0 / (1.0 + grid**2)
    keep = respaced_timesteps(T_fine, steps)
    return alpha_bar, schedules._schedule(keep, alpha_bar[keep], alpha_bar)


def global_error(name, steps, variable, low, high):
    """Mean |x - exact ODE solution| at row 0 (the last noise level, before the final jump to
    the data) for the 2-D Gaussian."""
    alpha_bar, sched = even_chain(steps, variable, low, high)
    params = mixture_params(MU[None], STD, [1.0], alpha_bar)
    out, x_start = run(params, sched, name, 256, num_snapshots=steps + 1)
    abar = np.asarray(sched.alpha_bar, np.float64)
    exact = gaussian_flow(x_start, abar[-1], abar[0], MU, STD)
    return np.mean(np.abs(np.asarray(out.snapshots[-2], np.float64) - exact))


# (name, grid, step counts, slope range). The counts are past the pre-asymptotic range and keep
# the errors (2e-3 .. 5e-6) well above float32 rounding (~5e-7 measured at 257 steps).
# UniPC-2 with its corrector is third order (measured slope 2.98). DPM-Solver++(3M) is third
# order (on the mixture in float64: error ratios 9-11 per doubling), on Gaussian data fourth
# (slope 3.9: its third-order error term vanishes for this linear ODE); its lower-order warm-up
# steps add an O(h^2) term set by how fast x0_hat moves at the noisy end, negligible here.
# iPNDM's Adams-Bashforth weights assume even steps in rho: on such a grid it is fourth order
# (slope 3.7 here, error ratios 11.4 then 14.8 approaching 16), on other grids second.
ORDERS = [
    ("unipc", ("lambda", -5.0, 5.0), (33, 65, 129), (2.7, 3.3)),
    ("dpmpp3m", ("lambda", -5.0, 5.0), (17, 33, 65), (2.8, 4.3)),
    ("ipndm", ("rho", 0.3, 5.0), (33, 65, 129), (3.4, 4.3)),
]


@pytest.mark.parametrize("name, grid, steps, slopes", ORDERS)
def test_global_error_order(name, grid, steps, slopes):
    steps = np.array(steps)
    errors = np.array([global_error(name, int(k), *grid) for k in steps])
    slope = -np.polyfit(np.log(steps - 1.0), np.log(errors), 1)[0]
    assert slopes[0] < slope < slopes[1], (slope, errors)


# ------------------------------------------------------------------ registry contract

NAMES = list(solvers.TRAINED)  # (the distilled solver: tests/test_distillation.py)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_every_solver_runs_any_chain_length(mixture, name, steps):
    """Finite samples on its own spacing, and the same samples for the same key."""
    sched = respace("cosine", T, steps, solvers.get(name).spacing)
    a, _ = run(mixture, sched, name, 64, key=3)
    b, _ = run(mixture, sched, name, 64, key=3)
    assert np.all(np.isfinite(a.samples)), name
    np.testing.assert_array_equal(a.samples, b.samples)


@pytest.mark.parametrize("name", [n for n in NAMES if not solvers.get(n).stochastic])
def test_deterministic_solvers_reach_the_data_at_50_steps(gaussian, name):
    """On Gaussian data every deterministic step is affine in x, so the output is p x_T + q per
    dimension: a least-squares fit gives (p, q) without Monte-Carlo error, and the output's
    moments (q, p^2) must be the data's N(MU, STD^2)."""
    sched = respace("cosine", T, 50, solvers.get(name).spacing)
    out, x_start = run(gaussian, sched, name, 256)
    y = np.asarray(out.samples, np.float64)
    for d in range(2):
        p, q = np.polyfit(x_start[:, d], y[:, d], 1)
        assert abs(q - MU[d]) < 0.02 * STD and abs(p**2 / STD**2 - 1.0) < 0.03, (d, p, q)


@pytest.mark.parametrize("name", NAMES)
def test_the_last_step_returns_x0_hat(name):
    """A denoiser predicting a fixed x0: every solver's sample is that x0 after clipping (no
    correction or noise after the last network call)."""
    target = np.array([[3.0, 0.5], [0.2, -0.4]], np.float32)

    def fixed_x0(params, x, t, labels):
        return jnp.broadcast_to(jnp.asarray(target), x.shape)

    sched = respace("cosine", 50, 5, solvers.get(name).spacing)
    out = samplers.sample(
        fixed_x0,
        {},
        sched,
        jax.random.PRNGKey(0),
        (2, 2),
        num_classes=1,
        prediction="x0",
        **{_SOLVER_FIELD: name},
    )
    np.testing.assert_allclose(out.samples, np.clip(target, -1, 1), atol=1e-6)


def test_registry_drives_the_names():
    for name, solver in solvers.SOLVERS.items():
        assert solver.name == name and solver.spacing in schedules.SPACINGS
        assert solvers.default_steps(name, 1000) == (solver.default_steps or 1000)
        assert solvers.get(name) is solver
    assert {"unipc", "dpmpp3m", "ipndm"} <= set(solvers.SOLVERS)
    assert set(solvers.SOLVERS) - set(solvers.TRAINED) == {"distilled"}  # a student's only
    specs = evaluation.parse_samplers(",".join(f"{n}:10" for n in NAMES), 1000)
    assert [tuple(s) for s in specs] == [(n, 10) for n in NAMES]


# ------------------------------------------------------------------ the Karras grid


@pytest.mark.parametrize("name, K", [("cosine", 12), ("linear", 12), ("cosine", 30)])
def test_karras_spacing_is_the_formula(name, K):
    """sigma_i = (sigma_max^(1/7) + i/(K-1) (sigma_min^(1/7) - sigma_max^(1/7)))^7 in the
    schedule's sigma = sqrt((1 - abar) / abar), from t = 0 to the last timestep above the log-SNR
    floor, written out in Python floats; each kept step within one timestep of the one whose
    log-sigma is nearest its target (brute force over all timesteps)."""
    alpha_bar = np.cumprod(1.0 - schedules.get_betas(name, T))
    sigma = [math.sqrt((1.0 - a) / a) for a in alpha_bar]
    top = max(t for t in range(T) if math.log(alpha_bar[t] / (1.0 - alpha_bar[t])) >= LOGSNR_MIN)
    hi, lo = sigma[top] ** (1 / 7), sigma[0] ** (1 / 7)
    targets = [(hi + i / (K - 1) * (lo - hi)) ** 7 for i in range(K)][::-1]
    ts = respaced_timesteps(T, K, "karras", alpha_bar)
    nearest = [min(range(T), key=lambda t: abs(math.log(sigma[t] / s))) for s in targets]
    assert ts[0] == 0 and ts[-1] == top and np.all(np.diff(ts) > 0)
    assert np.all(np.abs(ts - np.array(nearest)) <= 1), (ts, nearest)
    np.testing.assert_allclose(schedules.karras_sigmas(sigma[0], sigma[top], K), targets[::-1])
    assert schedules.max_steps(name, T, "karras") == top + 1
