"""Class morphs and noise interpolation, with the exact denoiser of a 2-D Gaussian mixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exact import mixture_eps, mixture_params

from diffusion_jax import interpolation, samplers
from diffusion_jax.schedules import make_schedule, respace

T = 200
MEANS = np.array([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.6]])


@pytest.fixture(scope="module")
def setup():
    params = mixture_params(MEANS, 0.15, [1 / 3] * 3, make_schedule("cosine", T).alpha_bar)
    return params, respace("cosine", T, 20)


@pytest.mark.parametrize("solver, w", [("ddim", 0.0), ("dpmpp2m", 1.5)])
def test_morph_ends_are_plain_samples_of_those_classes(setup, solver, w):
    params, sched = setup
    key = jax.random.PRNGKey(4)
    out = interpolation.class_morph(
        mixture_eps,
        params,
        sched,
        key,
        (2,),
        [0, 1, 2],
        num_classes=3,
        frames=5,
        w=w,
        solver=solver,
        clip=None,
    ).samples
    assert out.shape == (11, 2)
    key_noise, key_chain = jax.random.split(key)
    noise = jax.random.normal(key_noise, (1, 2))
    for index, label in [(0, 0), (5, 1), (10, 2)]:  # mix 0 at each class
        plain = samplers.sample(
            mixture_eps,
            params,
            sched,
            key_chain,
            (1, 2),
            num_classes=3,
            labels=np.array([label]),
            w=w,
            x_init=noise,
            solver=solver,
            clip=None,
        ).samples
        np.testing.assert_allclose(out[index], plain[0], atol=1e-6)


def test_morph_frames_change_smoothly(setup):
    """Under fixed noise the frames travel from class 0's mode to class 1's without jumps:
    every step between consecutive frames is under three times the mean step (a sampler that
    snapped to one class or the other would move in one jump)."""
    params, sched = setup
    out = np.asarray(
        interpolation.class_morph(
            mixture_eps,
            params,
            sched,
            jax.random.PRNGKey(0),
            (2,),
            [0, 1],
            num_classes=3,
            frames=24,
            solver="ddim",
            clip=None,
        ).samples
    )
    steps = np.linalg.norm(np.diff(out, axis=0), axis=1)
    assert np.linalg.norm(out[-1] - out[0]) > 0.8  # it does go from one mode to the other
    assert steps.max() < 3 * steps.mean(), steps


def test_slerp_against_numpy():
    rng = np.random.default_rng(0)
    z0, z1 = rng.normal(size=(2, 64))
    out = np.asarray(interpolation.slerp(z0, z1, [0.0, 0.5, 1.0]), np.float64)
    np.testing.assert_allclose(out[0], z0, atol=1e-5)
    np.testing.assert_allclose(out[2], z1, atol=1e-5)
    theta = np.arccos(z0 @ z1 / np.linalg.norm(z0) / np.linalg.norm(z1))
    mid = (np.sin(theta / 2) * (z0 + z1)) / np.sin(theta)
    np.testing.assert_allclose(out[1], mid, rtol=1e-4, atol=1e-5)
    # equal norms stay equal all along (a straight line would dip to ~0.71 of them)
    same = z1 / np.linalg.norm(z1) * np.linalg.norm(z0)
    path = np.asarray(interpolation.slerp(z0, same, np.linspace(0, 1, 7)))
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), np.linalg.norm(z0), rtol=1e-5)


def test_slerp_of_parallel_noises_is_the_straight_line():
    z = np.array([0.3, -1.2, 0.5])
    out = np.asarray(interpolation.slerp(z, 2 * z, [0.0, 0.5, 1.0]))
    np.testing.assert_allclose(out, [z, 1.5 * z, 2 * z], rtol=1e-6)


def test_noise_interpolation_ends(setup):
    params, sched = setup
    key = jax.random.PRNGKey(2)
    out = interpolation.noise_interpolation(
        mixture_eps,
        params,
        sched,
        key,
        (2,),
        1,
        num_classes=3,
        frames=4,
        solver="ddim",
        clip=None,
    ).samples
    k0, k1, key_chain = jax.random.split(key, 3)
    for index, k in [(0, k0), (3, k1)]:
        plain = samplers.sample(
            mixture_eps,
            params,
            sched,
            key_chain,
            (1, 2),
            num_classes=3,
            labels=np.array([1]),
            x_init=jax.random.normal(k, (1, 2)),
            solver="ddim",
            clip=None,
        ).samples
        np.testing.assert_allclose(out[index], plain[0], atol=1e-5)


def test_bad_morphs():
    with pytest.raises(ValueError, match="labels must be in"):
        interpolation.class_morph(
            mixture_eps,
            {},
            respace("cosine", 10, 2),
            jax.random.PRNGKey(0),
            (2,),
            [0, 3],
            num_classes=3,
        )
    with pytest.raises(ValueError, match="at least two classes"):
        interpolation.morph_path([1], 4)
    assert jnp.all(interpolation.morph_path([0, 1], 2)[2] == jnp.array([0.0, 0.5, 0.0]))
