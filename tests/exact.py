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


def mixture_eps_np(x, alpha_bar, means, std, weights):
    """Float64 optimal (unconditional) eps for a mixture of N(means[c], std^2 I), weights (C,),
    at cumulative product ``alpha_bar``: the responsibility-weighted per-component optimum.
    x (B, D)."""
    x, means = np.asarray(x, np.float64), np.asarray(means, np.float64)
    var = alpha_bar * std**2 + 1.0 - alpha_bar
    diff = x[:, None, :] - np.sqrt(alpha_bar) * means[None]  # (B, C, D)
    log_lik = -0.5 * np.sum(diff**2, axis=-1) / var + np.log(weights)
    resp = np.exp(log_lik - log_lik.max(axis=1, keepdims=True))
    resp /= resp.sum(axis=1, keepdims=True)
    return np.einsum("bc,bcd->bd", resp, np.sqrt(1.0 - alpha_bar) * diff / var)


# Gauss-Legendre nodes on [-1, 1]: exact for the polynomial part, and e^lambda over one step is
# resolved to float64 rounding.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


def exp_integral_of_interpolant(lam_s, lam_t, alpha_t, lams, values):
    """sigma_t * integral over [lam_s, lam_t] of e^lambda P(lambda) d lambda, where P is the
    Lagrange polynomial through (lams[j], values[j]) (the data prediction's interpolant in
    lambda) and sigma_t e^lambda = alpha_t e^(lambda - lam_t). By quadrature, float64.

    This is the exact solution's integral term of the data-prediction ODE (Lu et al. 2022,
    eq. 9 of DPM-Solver++) with x0_hat replaced by its interpolant."""
    half = 0.5 * (lam_t - lam_s)
    lam_q = lam_s + half * (_GL_NODES + 1.0)
    total = 0.0
    for j, lam_j in enumerate(lams):
        basis = np.ones_like(lam_q)
        for m, lam_m in enumerate(lams):
            if m != j:
                basis *= (lam_q - lam_m) / (lam_j - lam_m)
        weight = half * np.sum(_GL_WEIGHTS * alpha_t * np.exp(lam_q - lam_t) * basis)
        total = total + weight * values[j]
    return total


def _chain(alpha_bar, x_start):
    abar = np.asarray(alpha_bar, np.float64)
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    return alpha, sigma, np.log(alpha / sigma), np.asarray(x_start, np.float64)


def _record(states, x):
    if states is not None:
        states.append(np.array(x, np.float64))


def _order(max_order, history, i, num_rows, lower_order_final):
    """One more than the predictions already made, at most max_order; at most i (the row the
    step starts from) near the end of short chains."""
    order = min(max_order, history + 1)
    return min(order, i) if num_rows < lower_order_final else order


def dpmpp3m_reference(x_start, alpha_bar, eps_fn, lower_order_final=10, states=None):
    """DPM-Solver++(3M) in float64, not from the library: a third-order step integrates e^lambda
    times the quadratic through the last three data predictions exactly (quadrature of the
    Lagrange polynomial); second-order steps (the second step, and near the end of short chains)
    are DPM-Solver++(2M)'s, first-order ones hold the data prediction constant. Arguments as
    :func:`dpmpp2m_reference`; ``states``, a list, receives x at every row (noisiest first)."""
    alpha, sigma, lam, x = _chain(alpha_bar, x_start)
    K = len(lam)
    data = []  # (row, data prediction), newest last
    for i in range(K - 1, -1, -1):
        _record(states, x)
        data.append((i, (x - sigma[i] * eps_fn(x, i)) / alpha[i]))
        if i == 0:
            return data[-1][1]
        order = _order(3, len(data) - 1, i, K, lower_order_final)
        if order == 2:
            h, h_prev = lam[i - 1] - lam[i], lam[i] - lam[i + 1]
            d = data[-1][1] + h / (2.0 * h_prev) * (data[-1][1] - data[-2][1])
            increment = -alpha[i - 1] * np.expm1(-h) * d
        else:
            rows = [row for row, _ in data[-order:]]
            increment = exp_integral_of_interpolant(
                lam[i], lam[i - 1], alpha[i - 1], lam[rows], [v for _, v in data[-order:]]
            )
        x = sigma[i - 1] / sigma[i] * x + increment
    return x


def unipc_reference(x_start, alpha_bar, eps_fn, lower_order_final=10, states=None):
    """UniPC with B(h) = e^h - 1, data prediction, UniP-2 + UniC, in float64, not from the library
    (Zhao et al. 2023). The predictor from row i is DPM-Solver++(2M)'s step (UniP-2 with its single
    coefficient 1/2) from the corrected x_i, first order on the first step and near the end of
    short chains. The corrector redoes that step once the network has seen the predicted x_{i-1}:
    after a first-order predictor with the data predictions at both ends weighted 1/2 each
    (UniC-1), else integrating e^lambda times the quadratic through the data predictions at rows
    i+1, i, i-1 exactly (UniC-2, whose coefficients solve its order conditions). No corrector
    after the last step. Arguments as :func:`dpmpp2m_reference`; ``states``, a list, receives the
    predicted x at every row (noisiest first)."""
    alpha, sigma, lam, x = _chain(alpha_bar, x_start)
    K = len(lam)
    data, corrected, orders = [], None, []  # orders: of the predictor steps taken
    for i in range(K - 1, -1, -1):
        _record(states, x)
        data.append((x - sigma[i] * eps_fn(x, i)) / alpha[i])
        if corrected is None:
            corrected = x
        else:
            ratio = sigma[i] / sigma[i + 1]
            if orders[-1] == 1:
                increment = -alpha[i] * np.expm1(lam[i + 1] - lam[i]) * 0.5 * (data[-1] + data[-2])
            else:
                increment = exp_integral_of_interpolant(
                    lam[i + 1], lam[i], alpha[i], lam[[i, i + 1, i + 2]], data[::-1][:3]
                )
            corrected = ratio * corrected + increment
        if i == 0:
            return data[-1]
        orders.append(_order(2, len(data) - 1, i, K, lower_order_final))
        h = lam[i - 1] - lam[i]
        d = data[-1]
        if orders[-1] == 2:
            d = d + h / (2.0 * (lam[i] - lam[i + 1])) * (data[-1] - data[-2])
        x = sigma[i - 1] / sigma[i] * corrected - alpha[i - 1] * np.expm1(-h) * d
    return x


# Adams-Bashforth weights for equal steps (newest first), orders 1 to 4.
AB_WEIGHTS = {
    1: [1.0],
    2: [1.5, -0.5],
    3: [23 / 12, -4 / 3, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -3 / 8],
}


def ipndm_reference(x_start, alpha_bar, eps_fn, states=None):
    """iPNDM (Zhang & Chen 2022, the DEIS paper) in float64, not from the library: DDIM's ODE
    dy/drho = eps in y = x / alpha, rho = sigma / alpha, stepped by Adams-Bashforth with the
    equal-step weights of order min(4, steps taken + 1). After row 0 the chain ends on the data
    prediction. Arguments as :func:`dpmpp2m_reference`; ``states``, a list, receives x at every
    row (noisiest first)."""
    alpha, sigma, _, x = _chain(alpha_bar, x_start)
    rho = sigma / alpha
    eps = []  # newest first
    for i in range(len(rho) - 1, -1, -1):
        _record(states, x)
        eps.insert(0, eps_fn(x, i))
        if i == 0:
            return (x - sigma[0] * eps[0]) / alpha[0]
        weights = AB_WEIGHTS[min(4, len(eps))]
        slope = sum(w * e for w, e in zip(weights, eps, strict=False))
        x = alpha[i - 1] * (x / alpha[i] + (rho[i - 1] - rho[i]) * slope)
    return x
