"""Uncertainty over seeds, Pearson's r and Kendall's tau; numpy only.

Intervals are Student-t intervals over seeds, mean +- t(n-1) x SE, with the standard error taken from a
bootstrap over seeds (scaled by sqrt(n / (n - 1)), the plug-in correction), so that statistics that are
not plain means (ratios, mean |gap|) get one too; for a mean over seeds this is exactly the textbook t
interval. A percentile bootstrap cannot be wider than the seeds' own spread: with 3 seeds its "95 %"
interval is [min, max] and covers the truth about 74 % of the time (52 % with 2 seeds; measured by
simulation, tests/test_stats.py checks the coverage of ours).

The bootstrap unit is a seed: one resample draws seeds with replacement and applies the draw to every column
(budget) at once, so a seed's cyclic run, whose points at all budgets are correlated, stays whole.
Two sides are paired (the same draw on both) when they hold the same seeds at the same columns, so each
cyclic seed s is compared with standard seed s; otherwise each side is resampled on its own.
"""
import functools
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

N_BOOT = 10000  # resamples: the bootstrap standard error moves by well under 1 % between RNG seeds
BOOT_SEED = 0  # fixed, so every table and figure is reproducible
LEVEL = 0.95  # the level of every interval (T975 holds its t quantiles)
CI_METHOD = (f"Student-t over seeds (t with n-1 degrees of freedom x the standard error of a bootstrap over seeds, "
             f"{N_BOOT} resamples, RNG seed {BOOT_SEED})")
# two-sided 95 % quantiles of Student's t by degrees of freedom; beyond the table the normal's 1.96 is within 1 %
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


@dataclass
class Side:
    """One side of a comparison: a row per seed, a column per budget, NaN where that seed has no point."""
    ids: list  # (seed, k): the k-th run of that seed at a column, so repeated seeds stay separate rows
    values: np.ndarray  # (len(ids), columns)

    def counts(self):
        """Seeds with a finite value, per column."""
        return np.isfinite(self.values).sum(0)


@dataclass
class Boot:
    """Resampled column means of both sides, (N_BOOT, columns) each, and how they were drawn."""
    a: np.ndarray
    b: np.ndarray
    paired: bool
    counts: np.ndarray  # per column: seeds on the side with fewer

    @property
    def defined_at(self):
        """Per column: 2+ seeds on each side, without which a CI would be a fake zero width."""
        return self.counts >= 2

    @property
    def defined(self):
        """A CI exists for statistics that use every column."""
        return bool(self.defined_at.all())

    @property
    def n_seeds(self):
        """The fewest seeds behind any column, on either side."""
        return int(self.counts.min()) if self.counts.size else 0

    @property
    def pairing(self):
        return "paired" if self.paired else "independent"


def side(samples_per_column):
    """A Side from one list of (seed, value) per column."""
    rows, cells = {}, []
    for j, samples in enumerate(samples_per_column):
        seen = Counter()
        for seed, value in samples:
            key = (seed, seen[seed])
            seen[seed] += 1
            rows.setdefault(key, len(rows))
            cells.append((rows[key], j, value))
    values = np.full((len(rows), len(samples_per_column)), np.nan)
    for i, j, v in cells:
        values[i, j] = v
    return Side(list(rows), values)


def resampled_means(values, idx):
    """Column means over the rows that `idx` (resamples, n) draws, skipping NaN; NaN where a draw has none."""
    picked = values[idx]
    finite = np.isfinite(picked)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, picked, 0.0).sum(1) / finite.sum(1)


def aligned(a, b):
    """Side b with its rows in a's seed order when both sides hold the same seeds with values at the same columns
    (they can be paired), else None."""
    if sorted(a.ids, key=repr) != sorted(b.ids, key=repr):
        return None
    values = b.values[[b.ids.index(i) for i in a.ids]]
    return Side(a.ids, values) if np.array_equal(np.isfinite(a.values), np.isfinite(values)) else None


def bootstrap(a, b, n_boot=N_BOOT, seed=BOOT_SEED):
    """Resampled column means of sides a and b: paired by seed when aligned(a, b) exists, else independently."""
    rng = np.random.default_rng(seed)
    b_paired = aligned(a, b)
    paired = b_paired is not None
    idx_a = rng.integers(0, len(a.ids), size=(n_boot, len(a.ids)))
    if paired:
        b = b_paired
        idx_b = idx_a
    else:
        idx_b = rng.integers(0, len(b.ids), size=(n_boot, len(b.ids)))
    counts = np.minimum(a.counts(), b.counts())
    return Boot(resampled_means(a.values, idx_a), resampled_means(b.values, idx_b), paired, counts)


def t975(df):
    """The 97.5 % quantile of Student's t with df degrees of freedom: the table's value at or below df (conservative);
    a fractional df under 10 (Satterthwaite's, which the table, whole to 10, would round down by up to a whole
    degree: at 1.2, 12.7 for 8.6), the quantile itself (fractional_t)."""
    if df != int(df) and 1 <= df < 10:
        return fractional_t(df)
    return T975[max(k for k in T975 if k <= df)] if df < 200 else 1.96


def interval(resamples, n, center=None, df=None):
    """95 % CI (lo, hi) of a statistic from its bootstrap resamples over n seeds: center +- t(df) x SE, SE the
    resamples' standard deviation x sqrt(n / (n - 1)), df n - 1 unless given (Satterthwaite's, where the resamples
    are a sum over strata); center defaults to their mean. (None, None) when n < 2 or nothing is finite."""
    r = np.asarray(resamples, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0 or n < 2:
        return None, None
    c = float(r.mean()) if center is None else float(center)
    half = t975(n - 1 if df is None else df) * float(r.std()) * math.sqrt(n / (n - 1))
    return c - half, c + half


def satterthwaite(variances, dfs):
    """Welch-Satterthwaite's degrees of freedom of a sum of independent variance components, each estimated with its
    own degrees of freedom: (sum v)^2 / sum(v^2 / df), between the smallest df of a component that is not 0 and
    their sum (held there against rounding); None where every component is 0."""
    spread = sum(v * v / d for v, d in zip(variances, dfs))
    if not spread > 0:
        return None
    return min(max(sum(variances) ** 2 / spread, min(d for v, d in zip(variances, dfs) if v > 0)), sum(dfs))


def mean_ci(values):
    """95 % t interval of the mean of `values` (one per seed); (None, None) with fewer than 2 finite values."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size < 2:
        return None, None
    half = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return float(v.mean()) - half, float(v.mean()) + half


def median_ci(values, level=LEVEL):
    """(median, lo, hi, coverage) of repeated timings: the sample median and the distribution-free interval between
    the order statistics x_(k) and x_(n+1-k), k the largest whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least
    `level`; with too few values for that (n < 6 at 95 %) [min, max] and its own coverage, 1 - 2^(1-n). No interval
    (None, None, None) with one value. Timings are skewed (a disturbed round is slow, never fast), which a median
    and this interval withstand and a mean and a t interval do not."""
    v = sorted(float(x) for x in values)
    n = len(v)
    median = (v[(n - 1) // 2] + v[n // 2]) / 2
    if n < 2:
        return median, None, None, None
    below = lambda k: sum(math.comb(n, i) for i in range(k)) / 2 ** n  # P(Binomial(n, 1/2) < k)  # noqa: E731
    k = max([k for k in range(1, n // 2 + 1) if 1 - 2 * below(k) >= level], default=1)
    return median, v[k - 1], v[n - k], 1 - 2 * below(k)


def resolved(lo, hi):
    """True when the CI excludes 0, None when there is no CI."""
    return None if lo is None else bool(lo > 0 or hi < 0)


def pearson(xs, ys):
    """Pearson's r, or None with fewer than 2 points or a constant side."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def kendall_tau(xs, ys):
    """(tau-b, discordant index pairs) of two score lists; pairs tied on either side are neither."""
    concordant, discordant, ties_x, ties_y = 0, [], 0, 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = np.sign(xs[i] - xs[j]), np.sign(ys[i] - ys[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant.append((i, j))
    untied = concordant + len(discordant)
    denominator = math.sqrt((untied + ties_y) * (untied + ties_x))
    return ((concordant - len(discordant)) / denominator if denominator else None), discordant


# ---- tests over families of intervals, and seeds to plan (issue 45) ------------------------------------------

POWER = 0.80  # the power the minimum detectable effect is quoted at


def t_within(t, df):
    """P(|T| < |t|) for Student's t with df >= 1 degrees of freedom: a whole df in closed form (Abramowitz and
    Stegun 26.7.3-4), a fractional one by fractional_within; the normal's beyond 200, as t975 does."""
    if df >= 200:
        return math.erf(abs(t) / math.sqrt(2))
    if df != int(df):
        return fractional_within(t, df)
    df = int(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), (df - 1) / 2 terms
        term, total = c, 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * j) / (2 * j + 1)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df / 2 terms
    for j in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * j - 1) / (2 * j)
    return s * total


def fractional_within(t, df, points=2001):
    """P(|T| < |t|) for a fractional df: with x = sqrt(df) tan(phi), 2 Gamma((df + 1) / 2) / (sqrt(pi) Gamma(df / 2))
    x the integral of cos(phi)^(df - 1) from 0 to atan(|t| / sqrt(df)) (the closed forms' integrand), by Simpson's
    rule (within 1e-10 of scipy.stats.t at df 1-10, |t| < 60)."""
    phi = np.linspace(0.0, math.atan(abs(t) / math.sqrt(df)), points)
    weights = np.ones(points)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    scale = 2 * math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    return float(scale * np.sum(weights * np.cos(phi) ** (df - 1)) * (phi[1] - phi[0]) / 3)


@functools.lru_cache(maxsize=None)
def fractional_t(df, level=LEVEL):
    """The two-sided `level` quantile of Student's t at a fractional df (bisection on fractional_within)."""
    lo, hi = 0.0, 100.0  # t(1)'s 99.9 % quantile is 637: 100 covers the 95 % one at every df >= 1
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fractional_within(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def table_df(df):
    """The degrees of freedom t975 reads its quantile at (the table's row at or below df; a fractional df under 10
    itself)."""
    if df != int(df) and 1 <= df < 10:
        return df
    return max(k for k in T975 if k <= df) if df < 200 else 200


def p_value(center, lo, hi, n, df=None):
    """Two-sided p of 'the statistic is 0' from its t interval center +- t975(df) x SE over n seeds (df: n - 1 unless
    given): the same SE and degrees of freedom, so p < 0.05 where the interval excludes 0 (to the t table's 3
    decimals). (p, None), or (None, why) without an interval or with one of zero width (every seed alike: no spread
    to test against)."""
    if lo is None or center is None or n is None or n < 2:
        return None, "no CI"
    df = n - 1 if df is None else df
    se = (hi - lo) / 2 / t975(df)
    if not se > 1e-9 * max(1.0, abs(center)):  # a zero width up to rounding: every seed's value alike
        return None, "no spread over seeds"
    return 1.0 - t_within(center / se, table_df(df)), None


def holm(ps, alpha=1 - LEVEL):
    """Holm's step-down verdicts at familywise level alpha over a family of p-values, None where a member has none
    (not counted in the family): sorted ascending, the k-th smallest (k from 0) is rejected while each so far is
    <= alpha / (m - k)."""
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out, rejecting = [None] * len(ps), True
    for k, (p, i) in enumerate(order):
        rejecting = rejecting and p <= alpha / (len(order) - k)
        out[i] = rejecting
    return out


def spread_from_ci(lo, hi, n):
    """The per-seed standard deviation behind a t interval over n seeds: SE x sqrt(n), SE = half width / t975."""
    return (hi - lo) / 2 / t975(n - 1) * math.sqrt(n)


def normal_cdf(x):
    """Phi of each element of the array x (math.erfc: accurate far into both tails)."""
    return np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in np.ravel(x)]).reshape(np.shape(x))


def power_of(delta, n, points=2001):
    """The chance that a 95 % t interval over n seeds (t975(n - 1), as every interval here) excludes 0 when the true
    difference is delta standard errors (d x sqrt(n) / sd): P(|T| > c) for T noncentral t with n - 1 degrees of
    freedom. T = (Z + delta) / U with U = sqrt(chi2(df) / df), so the power is E[Phi(delta - c U) + Phi(-delta - c U)]
    over U's density, integrated by Simpson's rule on [0, 1 + 10 / sqrt(df)] (beyond it the density is below
    1e-20). Exact to ~1e-9 against scipy.stats.nct (not a dependency); the textbook (t(0.975) + t(power)) x SE
    gives ~73-79 % where it claims 80 % at 2-6 seeds."""
    df, c = n - 1, t975(n - 1)
    u = np.linspace(0.0, 1.0 + 10.0 / math.sqrt(df), points)
    log_u = np.log(u, out=np.full_like(u, -np.inf), where=u > 0)
    log_density = (math.log(2) + df / 2 * math.log(df / 2) - math.lgamma(df / 2) - df * u ** 2 / 2
                   + (0.0 if df == 1 else (df - 1) * log_u))
    weights = np.ones(points)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    both_tails = normal_cdf(delta - c * u) + normal_cdf(-delta - c * u)
    return float(np.sum(weights * np.exp(log_density) * both_tails) * (u[1] - u[0]) / 3)


def min_detectable(sd, n, power=POWER):
    """The smallest true difference a two-sided 95 % t interval over n seeds resolves with this power: delta x sd /
    sqrt(n) for the noncentrality delta at which power_of reaches it (bisection)."""
    lo, hi = 0.0, 200.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power_of(mid, n) < power else (lo, mid)
    return hi * sd / math.sqrt(n)


def seeds_needed(sd, detect, power=POWER, most=1000):
    """The fewest seeds (2+) whose t interval resolves a true difference of `detect` with this power, or None beyond
    `most` (bisection: the power grows with the seeds)."""
    enough = lambda n: power_of(detect * math.sqrt(n) / sd, n) >= power  # noqa: E731
    if not enough(most):
        return None
    lo, hi = 1, most  # enough(hi); lo: not enough (1 seed has no interval)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def kendall_tau_rows(xs, ys):
    """Kendall's tau-b of each row of two (rows, items) score arrays, as kendall_tau; NaN where undefined."""
    i, j = np.triu_indices(xs.shape[1], 1)
    dx, dy = np.sign(xs[:, i] - xs[:, j]), np.sign(ys[:, i] - ys[:, j])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (dx * dy).sum(1) / np.sqrt((dx != 0).sum(1) * (dy != 0).sum(1))
