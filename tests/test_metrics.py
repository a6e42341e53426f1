"""Frechet distance and Inception Score against closed forms."""

import warnings

import numpy as np
import pytest

from diffusion_jax import metrics


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_matches_closed_form_for_commuting_covariances():
    """With S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T the trace term is sum(sqrt(a b)); the
    rotation makes the matrices full, so the matrix square root is really exercised."""
    rng = np.random.default_rng(0)
    d = 6
    q = random_rotation(d, rng)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_general_covariances_against_scipy_on_the_product():
    """Non-commuting covariances: tr((S1 S2)^(1/2)) from the eigenvalues of S1 S2 (real, >= 0)."""
    rng = np.random.default_rng(1)
    d = 5
    m1, m2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    tr_sqrt = np.sum(np.sqrt(np.real(np.linalg.eigvals(s1 @ s2))))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert metrics.frechet_distance(np.zeros(d), s1, np.zeros(d), s2) == pytest.approx(
        expected, rel=1e-8
    )


def test_one_dimensional():
    fd = metrics.frechet_distance([1.0], [[4.0]], [3.0], [[1.0]])
    assert fd == pytest.approx((1 - 3) ** 2 + (2 - 1) ** 2)


def test_feature_sets_identical_and_order_free():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
    assert metrics.frechet_distance_of_features(a, a) < 1e-8
    b = rng.standard_normal((500, 8)) + 0.5
    assert metrics.frechet_distance_of_features(a, b) == pytest.approx(
        metrics.frechet_distance_of_features(a[::-1], rng.permutation(b)), rel=1e-10
    )


def test_sample_estimate_approaches_population_value():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((20_000, 3))
    b = rng.standard_normal((20_000, 3)) * 2 + 1
    expected = 3 * 1.0 + 3 * (1 + 4 - 2 * 2)  # ||mu||^2 + tr(I + 4I - 2*2I)
    assert metrics.frechet_distance_of_features(a, b) == pytest.approx(expected, rel=0.05)


def test_few_samples_warn_with_the_count_needed():
    with pytest.warns(metrics.FewSamplesWarning, match="at least 17 samples"):
        metrics.feature_statistics(np.ones((10, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.feature_statistics(np.random.default_rng(0).standard_normal((17, 16)))


def test_few_samples_warning_starts_exactly_where_the_covariance_is_singular():
    """N samples give a covariance of rank at most N - 1: singular for N = D, full for N = D + 1."""
    rng = np.random.default_rng(4)
    d = 6
    with pytest.warns(metrics.FewSamplesWarning):
        _, cov = metrics.feature_statistics(rng.standard_normal((d, d)))
    assert np.linalg.matrix_rank(cov) == d - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, cov = metrics.feature_statistics(rng.standard_normal((d + 1, d)))
    assert np.linalg.matrix_rank(cov) == d


def test_inception_score_limits():
    confident = np.eye(10)[np.arange(1000) % 10]
    assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    constant = np.tile(np.full(10, 0.1), (50, 1))
    assert metrics.inception_score(constant) == pytest.approx(1.0)
    one_class = np.eye(10)[np.zeros(50, int)]
    assert metrics.inception_score(one_class) == pytest.approx(1.0)


def test_accuracy_and_counts():
    probs = np.eye(3)[[0, 1, 1, 2]]
    assert metrics.conditional_accuracy(probs, [0, 1, 2, 2]) == 0.75
    assert metrics.class_counts(probs, 4) == [1, 2, 1, 0]
