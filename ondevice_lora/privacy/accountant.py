"""Rényi-DP accounting for DP-SGD: the Poisson-subsampled Gaussian mechanism.

One DP step samples each record with probability q, clips each record's gradient to norm C and
adds Gaussian noise of standard deviation sigma * C to their sum. Its Rényi divergence of order
alpha is log(A_alpha) / (alpha - 1) (Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy
of the Sampled Gaussian Mechanism"), where A_alpha is a finite binomial sum for integer alpha
and a convergent series of erfc terms for fractional alpha (their Section 3.3). T steps compose
by adding RDP; an (epsilon, delta) guarantee follows from the conversion of Canonne, Kamath &
Steinke 2020 (Proposition 12 of Asoodeh et al. / Balle et al.), minimised over the orders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Fractional orders near 1 matter for large noise, integer ones for small: both, by default.
DEFAULT_ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(11, 257)))
_SERIES_TERMS = 1000  # fractional orders: more terms than any convergent case needs


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _log_binomial(n: float, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate also where erfc(x) underflows (large x)."""
    if x < 20:
        return math.log(math.erfc(x))
    # Asymptotic series of erfc at infinity: exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + ...).
    inv = 1 / (x * x)
    series = 1 - inv / 2 + 3 * inv**2 / 4 - 15 * inv**3 / 8 + 105 * inv**4 / 16
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    # A_alpha = sum_k C(alpha, k) q^k (1 - q)^(alpha - k) exp((k^2 - k) / (2 sigma^2))
    k = np.arange(alpha + 1)
    log_binomials = np.array([_log_binomial(alpha, int(i)) for i in k])
    terms = (
        log_binomials
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + (k * k - k) / (2 * sigma**2)
    )
    top = terms.max()
    return float(top + math.log(np.exp(terms - top).sum()))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    # A_alpha splits at z0, where the two Gaussians' likelihood ratio crosses 1; each half is a
    # series over k of binomial-like terms times a Gaussian tail (erfc).
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    lower = upper = -math.inf
    last_lower = last_upper = -math.inf
    for k in range(_SERIES_TERMS):
        j = alpha - k
        log_coef = _log_binomial(alpha, k)
        term_lower = (
            log_coef + k * log_q + j * log_1mq + (k * k - k) / (2 * sigma**2)
            + math.log(0.5) + _log_erfc((k - z0) / (math.sqrt(2) * sigma))
        )  # fmt: skip
        term_upper = (
            log_coef + j * log_q + k * log_1mq + (j * j - j) / (2 * sigma**2)
            + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        )  # fmt: skip
        lower, upper = _log_add(lower, term_lower), _log_add(upper, term_upper)
        total = _log_add(lower, upper)
        # Both series have turned down and their terms no longer move the sum.
        converged = term_lower < last_lower and term_upper < last_upper
        if converged and max(term_lower, term_upper) < total - 30:
            return total
        last_lower, last_upper = term_lower, term_upper
    return math.inf  # did not converge: this order gives no bound


def rdp_sampled_gaussian(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step, at each order."""
    if not 0 <= q <= 1:
        raise ValueError(f"the sample rate must be in [0, 1], got {q}")
    if sigma < 0:
        raise ValueError(f"the noise multiplier must be >= 0, got {sigma}")

    def one(alpha: float) -> float:
        if q == 0:
            return 0.0
        if sigma == 0 or math.isinf(alpha):
            return math.inf
        if q == 1:
            return alpha / (2 * sigma**2)
        if float(alpha).is_integer():
            log_a = _log_a_integer(q, sigma, int(alpha))
        else:
            log_a = _log_a_fractional(q, sigma, alpha)
        return log_a / (alpha - 1)

    return np.array([one(a) for a in orders])


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float):
    """(epsilon, best order): the smallest epsilon any order gives for this delta."""
    if delta <= 0:
        return (0.0, None) if all(r == 0 for r in rdp) else (math.inf, None)
    best = (math.inf, None)
    for alpha, r in zip(orders, rdp):
        if r < 0 or delta**2 + math.expm1(-r) > 0:
            eps = 0.0  # the KL bound already gives delta: no privacy loss to pay
        elif alpha > 1.01:
            eps = r + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1)
        else:
            eps = math.inf  # too close to 1 for the bound to be stable
        if eps < best[0]:
            best = (eps, alpha)
    return max(0.0, best[0]), best[1]


def dp_sgd_epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> tuple[float, float | None]:
    """(epsilon, best order) after `steps` DP-SGD steps: RDP composes by addition."""
    rdp = steps * rdp_sampled_gaussian(sample_rate, noise_multiplier, orders)
    return epsilon_from_rdp(orders, rdp, delta)


def noise_for_epsilon(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, tolerance: float = 1e-3
) -> float:
    """The smallest noise multiplier whose epsilon after `steps` is at most the target
    (bisection: epsilon falls as the noise grows)."""
    if target_epsilon <= 0:
        raise ValueError(f"the target epsilon must be > 0, got {target_epsilon}")
    low, high = 0.0, 1.0
    while dp_sgd_epsilon(sample_rate, high, steps, delta)[0] > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(
                f"no noise multiplier up to 1e4 reaches epsilon {target_epsilon} with sample "
                f"rate {sample_rate}, {steps} steps and delta {delta}"
            )
    while high - low > tolerance:
        middle = (low + high) / 2
        if dp_sgd_epsilon(sample_rate, middle, steps, delta)[0] > target_epsilon:
            low = middle
        else:
            high = middle
    return high
