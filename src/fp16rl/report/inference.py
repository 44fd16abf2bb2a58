"""Small-sample inference on paired differences, with numpy and the standard library only.

A comparison of RL runs has few paired seeds (2 to 10), so every interval and test here is one whose
error rates hold at that n: the Student t interval (exact for normal differences), the exact
sign-flip permutation test (exact for any symmetric distribution), the two one-sided tests (TOST) of
equivalence, the exact sign test, and the power of the t-test for planning. The t distribution is
computed from the regularized incomplete beta function (continued fraction, Numerical Recipes §6.4),
because scipy is not a dependency.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ALPHA = 0.05  # two-sided level of the difference tests; TOST uses two one-sided tests at this level
POWER = 0.8
EXACT_FLIPS_MAX_N = 16  # 2^16 sign vectors; beyond, Monte Carlo
MONTE_CARLO_FLIPS = 20_000
FLIP_SEED = 0
MAX_SEEDS_NEEDED = 100_000  # the power search stops here ("more than")


def min_seeds_for_decision(alpha: float = ALPHA) -> int:
    """The fewest paired seeds at which the exact sign-flip test can reject at ``alpha``.

    Its smallest two-sided p-value is 2 / 2^n (all differences of one sign), so n must satisfy
    2^n > 2 / alpha: 6 seeds at alpha = 0.05 (p >= 0.031), while 5 give p >= 0.0625.
    """
    return math.floor(math.log2(2 / alpha)) + 1


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), valid for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        even = m * (b - m) * x / ((qam + m2) * (a + m2))
        odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        for numerator in (even, odd):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) = B(x; a, b) / B(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom: P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    two_tailed = betainc(df / 2.0, 0.5, df / (df + t * t))
    return two_tailed / 2.0 if t > 0 else 1.0 - two_tailed / 2.0


def t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    return t_sf(-t, df)


@functools.lru_cache(maxsize=1024)  # the same few levels and df come back in every power search
def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on the upper tail (monotone, so it always converges)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    low, high = 0.0, 1.0
    while t_sf(high, df) > tail:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_sf(mid, df) > tail:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return 0.5 * (low + high)


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


@dataclass
class PairedSummary:
    """Mean, sample SD and standard error of paired differences (sd and se None below 2 values)."""

    n: int
    mean: float
    sd: float | None
    se: float | None


def summarize(differences: Sequence[float]) -> PairedSummary:
    x = np.asarray(differences, dtype=float)
    if x.size == 0:
        raise ValueError("no differences to summarize")
    sd = float(np.std(x, ddof=1)) if x.size > 1 else None
    return PairedSummary(int(x.size), float(np.mean(x)), sd, sd / math.sqrt(x.size) if sd is not None else None)


def t_interval(differences: Sequence[float], confidence: float = 1 - ALPHA) -> tuple[float, float] | None:
    """mean ± t_{(1+c)/2, n-1} · sd / √n; None for fewer than 2 values (no spread to estimate)."""
    s = summarize(differences) if len(differences) else None
    if s is None or s.se is None:
        return None
    half = t_quantile(0.5 + confidence / 2, s.n - 1) * s.se
    return s.mean - half, s.mean + half


def sign_flip_p(differences: Sequence[float], seed: int = FLIP_SEED) -> tuple[float, bool]:
    """Two-sided p-value of the paired sign-flip permutation test of "mean difference 0"; (p, exact).

    Under the null each difference is as likely to have the other sign (same prompts, same random
    numbers: only the arm label is exchanged), so the statistic |mean(s_i d_i)| over every sign vector
    s gives the exact null distribution. All 2^n vectors for n <= 16; beyond, 20,000 random ones with
    a fixed seed and p = (1 + hits) / (1 + draws), which is a valid p-value.
    """
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        raise ValueError("no differences to test")
    observed = abs(float(d.mean()))
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))  # equal sums reached in another order count as ties
    if d.size <= EXACT_FLIPS_MAX_N:
        bits = (np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1
        means = np.abs((1.0 - 2.0 * bits) @ d) / d.size
        return float(np.mean(means >= observed - tolerance)), True
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(MONTE_CARLO_FLIPS, d.size))
    hits = int(np.sum(np.abs(signs @ d) / d.size >= observed - tolerance))
    return (1 + hits) / (1 + MONTE_CARLO_FLIPS), False


@dataclass
class Equivalence:
    """TOST: the mean difference lies within ±margin when both one-sided tests reject at alpha,
    equivalently when the (1 - 2 alpha) t interval lies inside (-margin, +margin)."""

    margin: float
    ci: tuple[float, float]  # the 90% interval for alpha = 0.05
    p: float  # max of the two one-sided p-values
    equivalent: bool


def tost(differences: Sequence[float], margin: float, alpha: float = ALPHA) -> Equivalence | None:
    """Two one-sided t-tests of H0: mean <= -margin and H0: mean >= +margin; None below 2 values."""
    if margin <= 0:
        raise ValueError(f"the equivalence margin must be > 0, got {margin}")
    if len(differences) < 2:
        return None
    s = summarize(differences)
    df = s.n - 1
    if s.se == 0:  # identical differences: the mean is known exactly
        inside = -margin < s.mean < margin
        return Equivalence(margin, (s.mean, s.mean), 0.0 if inside else 1.0, inside)
    p_lower = t_sf((s.mean + margin) / s.se, df)  # against mean <= -margin
    p_upper = t_cdf((s.mean - margin) / s.se, df)  # against mean >= +margin
    p = max(p_lower, p_upper)
    half = t_quantile(1 - alpha, df) * s.se
    return Equivalence(margin, (s.mean - half, s.mean + half), p, p < alpha)


def t_test_power(n: int, effect: float, sd: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample t-test with n pairs against a true mean ``effect``.

    With λ = effect·√n/sd, T = (Z + λ)/(W/√ν), W ~ chi with ν = n - 1 degrees of freedom, so
    power = E_W[Φ(λ - c·W/√ν) + Φ(-λ - c·W/√ν)], c = t_{1-α/2, ν}; the expectation is a trapezoid
    integral over W on a grid covering its mass (the exact noncentral-t power; the integrand is smooth
    and decays like a Gaussian, so 801 points give ~1e-9).
    """
    if n < 2:
        return 0.0
    nu = n - 1
    lam = abs(effect) * math.sqrt(n) / sd
    c = t_quantile(1 - alpha / 2, nu)
    w = np.linspace(max(0.0, math.sqrt(nu) - 12.0), math.sqrt(nu) + 12.0, 801)
    log_density = (nu - 1) * np.log(np.maximum(w, 1e-300)) - w * w / 2  # chi density up to a constant
    density = np.exp(log_density - log_density.max())
    scaled = c * w / math.sqrt(nu)
    rejection = np.array([normal_cdf(lam - s) + normal_cdf(-lam - s) for s in scaled.tolist()])
    # uniform grid: the trapezoid rule's step cancels in the ratio
    return float(_trapezoid(rejection * density) / _trapezoid(density))


def _trapezoid(y: np.ndarray) -> float:
    return float(y.sum() - (y[0] + y[-1]) / 2)


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest paired seeds whose two-sided t-test reaches ``power`` against ``effect``, and at least
    ``min_seeds_for_decision`` (the sign-flip test cannot reject with fewer); None beyond 100,000
    (or for a zero effect). Power grows with n: doubling brackets the smallest n, bisection finds it."""
    floor = min_seeds_for_decision(alpha)
    if effect == 0:
        return None
    if sd == 0:
        return floor
    low, high = 2, 4
    while t_test_power(high, effect, sd, alpha) < power:
        if high >= MAX_SEEDS_NEEDED:
            return None
        low, high = high + 1, min(2 * high, MAX_SEEDS_NEEDED)
    while low < high:  # power(high) >= target > power(low - 1)
        mid = (low + high) // 2
        if t_test_power(mid, effect, sd, alpha) >= power:
            high = mid
        else:
            low = mid + 1
    return max(floor, high)


def sign_test_p(better: int, worse: int) -> float:
    """Exact two-sided binomial sign test (ties dropped): 2 · P(X <= min(k, n - k)), X ~ Bin(n, 1/2)."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
