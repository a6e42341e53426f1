"""Sample-quality metrics on classifier outputs, in float64 numpy.

* Frechet distance between Gaussians fitted to two feature sets,
  ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), with a real matrix square root
  from symmetric eigendecompositions.
* Classifier Inception Score, exp(E_x KL(p(y|x) || p(y))).
* Conditional accuracy and per-class counts.
"""

from __future__ import annotations

import warnings

import numpy as np


class FewSamplesWarning(UserWarning):
    """Too few samples for a full-rank covariance of the features."""


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64.

    Warns (FewSamplesWarning) when N <= D: the covariance is then singular and the distance
    unstable; it says how many samples are needed.
    """
    f = np.asarray(features, np.float64)
    n, d = f.shape
    if n <= d:
        warnings.warn(
            f"{n} samples for {d}-dimensional features: the covariance is singular and the "
            f"Frechet distance unstable. Use at least {d + 1} samples (10x that for a stable one).",
            FewSamplesWarning,
            stacklevel=2,
        )
    return f.mean(axis=0), np.cov(f, rowvar=False)


def sqrtm_psd_product(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """A real symmetric matrix with the trace of (S1 S2)^(1/2), for covariances S1, S2.

    (S1 S2)^(1/2) is similar to (S1^(1/2) S2 S1^(1/2))^(1/2), which is symmetric PSD, so two
    symmetric eigendecompositions give it without the complex round-off of a general sqrtm, and
    singular covariances (dead features) need no special case.
    """
    r1 = _psd_sqrt(s1)
    return _psd_sqrt(r1 @ s2 @ r1)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    s = (s + s.T) / 2
    vals, vecs = np.linalg.eigh(s)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2) (float64)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    covmean_trace = np.trace(sqrtm_psd_product(s1, s2))
    value = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * covmean_trace
    return float(max(value, 0.0))


def frechet_distance_of_features(a, b) -> float:
    """Frechet distance between the Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def inception_score(probs, eps: float = 1e-12) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) for class probabilities (N, C); between 1 and C."""
    p = np.asarray(probs, np.float64)
    marginal = p.mean(axis=0, keepdims=True)
    kl = np.sum(p * (np.log(p + eps) - np.log(marginal + eps)), axis=1)
    return float(np.exp(kl.mean()))


def conditional_accuracy(probs, labels) -> float:
    """Fraction of samples whose predicted class is the label they were asked for."""
    return float(np.mean(np.argmax(np.asarray(probs), axis=1) == np.asarray(labels)))


def class_counts(probs, num_classes: int) -> list[int]:
    """How many samples the classifier assigns to each class (mode collapse shows here)."""
    return np.bincount(np.argmax(np.asarray(probs), axis=1), minlength=num_classes).tolist()
