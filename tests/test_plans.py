"""SamplingPlan (how to sample, as one value), explicit time grids, and guidance that changes
along the chain (an interval of timesteps, a schedule in t)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exact import mixture_eps, mixture_params

from diffusion_jax import guidance, plans, samplers, schedules, solvers
from diffusion_jax.config import get_config
from diffusion_jax.plans import SamplingPlan
from diffusion_jax.samplers import sample
from diffusion_jax.schedules import (
    SPACINGS,
    get_betas,
    make_schedule,
    respace,
    respaced_timesteps,
)

T = 200
MEANS = np.array([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.6]])
N = 64


@pytest.fixture(scope="module")
def mixture():
    return mixture_params(MEANS, 0.15, [0.5, 0.3, 0.2], make_schedule("cosine", T).alpha_bar)


def draw(params, sched, *, key=0, **kw):
    kw = dict(num_classes=3, labels=np.arange(N) % 3, clip=None, **kw)
    return sample(mixture_eps, params, sched, jax.random.PRNGKey(key), (N, 2), **kw)


# ---------------------------------------------------------------- guidance along the chain


def test_guidance_scale_closed_forms():
    t = np.array([0, 50, 99, 150, 199])
    last = T - 1
    np.testing.assert_array_equal(guidance.guidance_scale(t, T), np.ones(5))
    np.testing.assert_allclose(guidance.guidance_scale(t, T, schedule="linear"), 2 * (1 - t / last))
    np.testing.assert_allclose(
        guidance.guidance_scale(t, T, schedule="reverse_linear"), 2 * t / last
    )
    # the ramps average 1 over every training timestep, as the constant does
    every = np.arange(T)
    for name in guidance.SCHEDULES:
        assert guidance.guidance_scale(every, T, schedule=name).mean() == pytest.approx(1.0)
    inside = guidance.guidance_scale(t, T, (50, 150), "linear")
    np.testing.assert_allclose(inside, np.where((t >= 50) & (t <= 150), 2 * (1 - t / last), 0))
    with pytest.raises(ValueError, match="guidance schedule must be one of"):
        guidance.guidance_scale(t, T, schedule="cosine")
    with pytest.raises(ValueError, match="0 <= LO <= HI <= 199"):
        guidance.guidance_scale(t, T, (150, 50))


@pytest.mark.parametrize("solver", solvers.TRAINED)
def test_interval_covering_everything_is_plain_guidance(mixture, solver):
    sched = respace("cosine", T, 8)
    plain = draw(mixture, sched, solver=solver, w=2.0, eta=0.5)
    scale = guidance.guidance_scale(np.asarray(sched.timesteps), T, (0, T - 1))
    covered = draw(mixture, sched, solver=solver, w=2.0, eta=0.5, guidance_scale=scale)
    np.testing.assert_array_equal(covered.samples, plain.samples)


@pytest.mark.parametrize("solver", solvers.TRAINED)
def test_empty_interval_is_the_conditional_model(mixture, solver):
    """An interval holding none of the chain's timesteps: no guidance at all, the unconditional
    branch not even compiled (one denoiser call on the plain batch per step)."""
    sched = respace("cosine", T, 5)  # timesteps 0, 50, 100, 149, 199
    scale = guidance.guidance_scale(np.asarray(sched.timesteps), T, (60, 90))
    assert not scale.any()
    unguided = draw(mixture, sched, solver=solver, w=0.0)
    empty = draw(mixture, sched, solver=solver, w=3.0, guidance_scale=scale)
    np.testing.assert_array_equal(empty.samples, unguided.samples)
    batches = []

    def counting(params, x, t, labels):
        batches.append(x.shape[0])
        return mixture_eps(params, x, t, labels)

    kw = dict(num_classes=3, labels=np.arange(N) % 3, w=3.0, guidance_scale=scale)
    sample(counting, mixture, sched, jax.random.PRNGKey(0), (N, 2), solver=solver, **kw)
    assert batches == [N]


def test_guidance_applies_only_inside_the_interval(mixture):
    """Guided only on the last rows (t <= 50): the same as an unguided chain down to row 2,
    continued with guidance on an explicit grid of the remaining timesteps (DDIM, eta = 0:
    deterministic and without a carry, so the chain can be cut)."""
    sched = respace("cosine", T, 5)  # timesteps 0, 50, 100, 149, 199
    t = np.asarray(sched.timesteps)
    scale = guidance.guidance_scale(t, T, (0, 50))
    np.testing.assert_array_equal(scale, [1, 1, 0, 0, 0])
    whole = draw(mixture, sched, solver="ddim", w=2.0, guidance_scale=scale)
    head = draw(mixture, sched, solver="ddim", w=0.0, num_snapshots=6)
    x_row2 = head.snapshots[3]  # after 3 steps: the state at row 1, timestep 50
    tail_sched = schedules.on_timesteps("cosine", T, (50, 0))
    tail = draw(mixture, tail_sched, solver="ddim", w=2.0, x_init=x_row2)
    np.testing.assert_allclose(whole.samples, tail.samples, atol=1e-6)
    assert not np.allclose(whole.samples, head.samples, atol=1e-3)  # guidance did act


def test_schedule_weights_reach_each_step(mixture):
    """The chain's per-row weights are w times the schedule's closed form."""
    sched = respace("cosine", T, 6)
    t = np.asarray(sched.timesteps, np.float64)
    plan = SamplingPlan("ddim", 6, w=1.5, guidance_schedule="linear")
    options = plan.chain_options(sched, T)
    call = samplers.prepare_chain(
        mixture_eps,
        mixture,
        sched,
        jax.random.PRNGKey(0),
        (N, 2),
        num_classes=3,
        labels=np.arange(N) % 3,
        solver="ddim",
        **options,
    )
    w_rows = np.asarray(call.args[4])
    np.testing.assert_allclose(w_rows[:, 0], 1.5 * 2 * (1 - t / (T - 1)), rtol=1e-6)
    ramped = call.run().samples
    constant = draw(mixture, sched, solver="ddim", w=1.5).samples
    assert not np.allclose(ramped, constant, atol=1e-3)


def test_guidance_scale_is_checked(mixture):
    sched = respace("cosine", T, 4)
    for bad in (np.ones(3), -np.ones(4), np.full(4, np.nan)):
        with pytest.raises(ValueError, match="guidance_scale must be"):
            draw(mixture, sched, solver="ddim", w=1.0, guidance_scale=bad)


# ---------------------------------------------------------------- explicit time grids


@pytest.mark.parametrize("spacing", SPACINGS)
def test_explicit_timesteps_give_the_respaced_chain(mixture, spacing):
    alpha_bar = np.cumprod(1.0 - get_betas("cosine", T))
    grid = tuple(int(v) for v in respaced_timesteps(T, 7, spacing, alpha_bar)[::-1])
    respaced = respace("cosine", T, 7, spacing)
    explicit = schedules.on_timesteps("cosine", T, grid)
    for a, b in zip(jax.tree.leaves(respaced), jax.tree.leaves(explicit), strict=True):
        np.testing.assert_array_equal(a, b)
    by_grid = SamplingPlan("dpmpp2m", 7, timesteps=grid)
    by_spacing = SamplingPlan("dpmpp2m", 7, spacing=spacing)
    a = draw(mixture, by_grid.schedule("cosine", T), solver="dpmpp2m").samples
    b = draw(mixture, by_spacing.schedule("cosine", T), solver="dpmpp2m").samples
    np.testing.assert_array_equal(a, b)
    assert by_grid.steps == 7 and "_t" in by_grid.tag()


def test_explicit_timesteps_are_checked():
    with pytest.raises(ValueError, match="decreasing order"):
        SamplingPlan("ddim", 3, timesteps=(0, 300, 999))
    with pytest.raises(ValueError, match="decreasing order"):
        SamplingPlan("ddim", 3, timesteps=(999, 999, 0))
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 199\]"):
        SamplingPlan("ddim", 3, timesteps=(999, 300, 0)).schedule("cosine", T)


# ---------------------------------------------------------------- the plan


def test_resolve_fills_the_defaults_from_the_config():
    config = get_config("mnist")
    plan = plans.resolve(config)
    own = (config.sampler, config.sample_steps, config.guidance)
    assert (plan.solver, plan.steps, plan.w) == own
    assert plan.spacing == solvers.get(config.sampler).spacing and plan.x0 == "clip"
    for name in solvers.TRAINED:  # each solver's own steps and spacing when it is not the config's
        p = plans.resolve(config, solver=name)
        if name != config.sampler:
            assert p.steps == solvers.default_steps(name, config.num_timesteps)
        assert p.spacing == solvers.get(name).spacing
    assert plans.for_config(config, {"steps": 7}).steps == 7
    assert plans.for_config(config, plan) is plan
    with pytest.raises(ValueError, match=r"--steps must be in \[1, 1000\]"):
        plans.resolve(config, steps=5000)


def test_plan_is_frozen_hashable_and_checked():
    plan = SamplingPlan("ddim", 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = 3
    assert len({plan, SamplingPlan("ddim", 10), plan.replace(w=1.0)}) == 2
    for kw, match in [
        (dict(solver="euler"), "registered"),
        (dict(eta=1.5), "eta must be"),
        (dict(w=-1.0), "w must be"),
        (dict(steps=0), "steps must be"),
        (dict(spacing="karras?"), "spacing must be"),
        (dict(x0="round"), "x0 must be"),
        (dict(variance="learned"), "variance must be"),
        (dict(threshold_quantile=0.0), "threshold_quantile"),
        (dict(guidance_schedule="cosine"), "guidance_schedule"),
    ]:
        with pytest.raises(ValueError, match=match):
            plan.replace(**kw)


def test_plan_settings_and_tag():
    plan = SamplingPlan("ddim", 50, eta=0.5, spacing="quadratic", x0="threshold")
    settings = plan.settings("v", num_snapshots=3)
    assert settings.solver is solvers.get("ddim") and settings.prediction == "v"
    assert (settings.clip, settings.threshold, settings.num_snapshots) == ((-1, 1), 0.995, 3)
    assert plan.tag() == "ddim50_eta0.5_quadratic_x0threshold"
    assert SamplingPlan("dpmpp2m", 20, spacing="logsnr").tag() == "dpmpp2m20"
    assert SamplingPlan("ddpm", 10, variance="large").tag() == "ddpm10_large"
    quantile = SamplingPlan("ddim", 5, x0="threshold", threshold_quantile=0.9)
    assert quantile.tag() == "ddim5_x0threshold_q0.9"
    guided = SamplingPlan("ddim", 50, guidance_interval=(100, 800), guidance_schedule="linear")
    assert guided.tag() == "ddim50_gi100,800_glinear"
    assert (
        SamplingPlan("ddim", 50).chain_options(respace("cosine", T, 50), T)["guidance_scale"]
        is None
    )  # constant guidance everywhere: the plain chain


def test_sample_is_prepare_chain_run(mixture):
    sched = respace("cosine", T, 4)
    kw = dict(num_classes=3, labels=np.arange(8) % 3, w=1.0, solver="dpmpp2m")
    key = jax.random.PRNGKey(2)
    a = sample(mixture_eps, mixture, sched, key, (8, 2), **kw)
    b = samplers.prepare_chain(mixture_eps, mixture, sched, key, (8, 2), **kw).run()
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.timing is None
    timed = sample(mixture_eps, mixture, sched, key, (8, 2), timed=True, **kw)
    np.testing.assert_allclose(timed.samples, a.samples, atol=1e-6)
    assert timed.timing.compile_s > 0 and timed.timing.sample_s > 0
    assert isinstance(jnp.asarray(timed.samples), jnp.ndarray)
