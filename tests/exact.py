"""Closed-form optimal denoisers for Gaussian and Gaussian-mixture data, used to test samplers.

For x_0 ~ N(mu, s^2 I) and x_t = sqrt(a) x_0 + sqrt(1 - a) eps, the optimal noise prediction is
E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a). For a mixture, the unconditional
optimum is the responsibility-weighted average of the components' predictions.
"""

import jax
import jax.numpy as jnp
import numpy as np


def mixture_params(means, std, weights, alpha_bar):
    """Arrays the exact denoiser reads: means (C, D), std scalar, weights (C,), alpha_bar (T,)."""
    return {
        "means": jnp.asarray(means, jnp.float32),
        "std": jnp.float32(std),
        "log_weights": jnp.log(jnp.asarray(weights, jnp.float32)),
        "alpha_bar": jnp.asarray(alpha_bar, jnp.float32),
    }


def mixture_eps(params, x, t, labels):
    """The optimal eps for x (B, D) at training timesteps t (B,); label C means unconditional."""
    a = params["alpha_bar"][t][:, None, None]  # (B, 1, 1)
    mu = params["means"][None]  # (1, C, D)
    var = a * params["std"] ** 2 + 1.0 - a
    diff = x[:, None, :] - jnp.sqrt(a) * mu  # (B, C, D)
    eps_c = jnp.sqrt(1.0 - a) * diff / var  # per-component optimum
    log_lik = -0.5 * jnp.sum(diff**2, axis=-1) / var[..., 0] + params["log_weights"]
    resp = jax.nn.softmax(log_lik, axis=-1)  # (B, C)
    num_classes = mu.shape[1]
    onehot = jax.nn.one_hot(labels, num_classes)  # the null label C gives a zero row
    conditional = labels < num_classes
    weights = jnp.where(conditional[:, None], onehot, resp)
    return jnp.einsum("bc,bcd->bd", weights, eps_c)


def gaussian_moments(samples):
    s = np.asarray(samples, np.float64)
    return s.mean(axis=0), s.var(axis=0)


def gaussian_chain_moments(alpha_bar, mu, std, method, variance="small", eta=0.0):
    """Mean and variance (per dimension) of what a sampler produces for N(mu, std^2) data.

    Float64 numpy, written from the papers' update rules (DDPM eq. 11, DDIM eq. 12), not from
    the library: with the exact denoiser every step is affine in x plus Gaussian noise, so the
    sampler's output is Gaussian and its moments can be propagated exactly. ``alpha_bar`` (K,) are
    the cumulative products of the chain the sampler walks (last row first).
    """
    alpha_bar = np.asarray(alpha_bar, np.float64)
    mu = np.asarray(mu, np.float64)
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for k in range(len(alpha_bar) - 1, -1, -1):
        a = alpha_bar[k]
        a_prev = alpha_bar[k - 1] if k > 0 else 1.0
        alpha, beta = a / a_prev, 1.0 - a / a_prev
        # eps_hat(x) = g * x + h with the optimal denoiser
        g = np.sqrt(1.0 - a) / (a * std**2 + 1.0 - a)
        h = -g * np.sqrt(a) * mu
        beta_tilde = (1.0 - a_prev) / (1.0 - a) * beta
        if method == "ddpm":
            # x' = (x - beta / sqrt(1 - a) * eps_hat) / sqrt(alpha) + sigma z
            scale = beta / np.sqrt(1.0 - a)
            p, q = (1.0 - scale * g) / np.sqrt(alpha), -scale * h / np.sqrt(alpha)
            sigma2 = 0.0 if k == 0 else (beta_tilde if variance == "small" else beta)
        else:
            # x' = sqrt(a_prev) (x - sqrt(1 - a) eps_hat) / sqrt(a) + sqrt(1 - a_prev - s^2) eps_hat
            sigma2 = eta**2 * beta_tilde
            d = np.sqrt(1.0 - a_prev - sigma2)
            r = np.sqrt(a_prev / a)
            p = r * (1.0 - np.sqrt(1.0 - a) * g) + d * g
            q = (-r * np.sqrt(1.0 - a) + d) * h
        m, v = p * m + q, p**2 * v + sigma2
    return m, v


def gaussian_eps_np(x, alpha_bar, mu, std):
    """Float64 optimal eps for N(mu, std^2 I) data at cumulative product ``alpha_bar``."""
    return (
        np.sqrt(1.0 - alpha_bar)
        * (x - np.sqrt(alpha_bar) * mu)
        / (alpha_bar * std**2 + 1.0 - alpha_bar)
    )


def dpmpp2m_reference(x_start, alpha_bar, eps_fn, lower_order_final=10):
    """DPM-Solver++(2M) in float64, written from Lu et al. (2022), Algorithm 2, not the library.

    ``alpha_bar`` (K,) are the cumulative products of the chain's rows, visited from the last
    (noisiest) to row 0; ``eps_fn(x, i)`` the noise prediction at row i. After row 0 the chain
    ends on the data prediction (sigma = 0). Chains of fewer than ``lower_order_final`` rows take
    a first-order step into row 0, as the paper advises for short chains.
    """
    abar = np.asarray(alpha_bar, np.float64)
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha / sigma)
    K = len(abar)
    x = np.asarray(x_start, np.float64)
    previous = None  # (x0 prediction, h) of the step before
    for i in range(K - 1, -1, -1):
        data = (x - sigma[i] * eps_fn(x, i)) / alpha[i]
        if i == 0:
            return data
        h = lam[i - 1] - lam[i]
        if previous is None or (i == 1 and K < lower_order_final):
            d = data
        else:
            r = previous[1] / h
            d = (1.0 + 1.0 / (2.0 * r)) * data - 1.0 / (2.0 * r) * previous[0]
        x = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * np.expm1(-h) * d
        previous = (data, h)
    return x


def gaussian_flow(x_start, alpha_bar_start, alpha_bar_end, mu, std):
    """The exact probability-flow ODE map for N(mu, std^2) data, float64: it keeps the standardised
    value (x - sqrt(abar) mu) / sqrt(abar std^2 + 1 - abar) constant along the trajectory."""
    z = (np.asarray(x_start, np.float64) - np.sqrt(alpha_bar_start) * mu) / np.sqrt(
        alpha_bar_start * std**2 + 1.0 - alpha_bar_start
    )
    return np.sqrt(alpha_bar_end) * mu + np.sqrt(alpha_bar_end * std**2 + 1.0 - alpha_bar_end) * z


def correlated_gaussian_params(mu, cov, alpha_bar):
    return {
        "mu": jnp.asarray(mu, jnp.float32),
        "cov": jnp.asarray(cov, jnp.float32),
        "alpha_bar": jnp.asarray(alpha_bar, jnp.float32),
    }


def correlated_gaussian_eps(params, x, t, labels):
    """The optimal eps for x0 ~ N(mu, cov) (any covariance): x_t ~ N(sqrt(a) mu, a cov +
    (1 - a) I), so E[eps | x_t] = sqrt(1 - a) (a cov + (1 - a) I)^-1 (x_t - sqrt(a) mu). Labels
    are ignored (one class)."""
    a = params["alpha_bar"][t][:, None, None]  # (B, 1, 1)
    eye = jnp.eye(x.shape[-1])
    marginal_cov = a * params["cov"][None] + (1.0 - a) * eye  # (B, D, D)
    centred = x - jnp.sqrt(a[:, :, 0]) * params["mu"]
    return jnp.sqrt(1.0 - a[:, :, 0]) * jnp.linalg.solve(marginal_cov, centred[..., None])[..., 0]
