"""Power-law fits acc(x) = a - b x^(-c) of tradeoff curves, and the area between two fitted curves; numpy only.

For a fixed c the model is linear in (a, b), so c is searched (a log grid, then golden-section refinement
around the best grid value) and (a, b) solved by linear least squares at each c.
"""
import math
from dataclasses import dataclass

import numpy as np

from analysis import stats

C_GRID = np.geomspace(1e-3, 10.0, 400)
MIN_POINTS = 3  # three parameters


class FitError(ValueError):
    """A curve that cannot be fitted; the message says why."""


@dataclass
class PowerLaw:
    """acc(x) = a - b x^(-c), fitted to (xs, ys)."""
    a: float
    b: float
    c: float
    xs: np.ndarray
    ys: np.ndarray

    def predict(self, x):
        """Fitted accuracy at x (a number or an array of them, x > 0)."""
        return self.a - self.b * np.power(np.asarray(x, dtype=float), -self.c)

    @property
    def residuals(self):
        """Measured minus fitted accuracy at each fitted point."""
        return self.ys - self.predict(self.xs)

    @property
    def rmse(self):
        return float(np.sqrt(np.mean(self.residuals ** 2)))

    @property
    def dof(self):
        """Degrees of freedom: points beyond the three parameters (0: the curve passes exactly through them)."""
        return self.xs.size - MIN_POINTS


def solve_ab(xs, ys, c):
    """(a, b, sum of squared residuals) of the least-squares fit at a fixed exponent c."""
    design = np.stack([np.ones_like(xs), -np.power(xs, -c)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, ys, rcond=None)
    return a, b, float(np.sum((ys - design @ np.array([a, b])) ** 2))


def fit_power_law(xs, ys):
    """Least-squares PowerLaw through the points; FitError with fewer than 3 distinct positive x."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys) & (xs > 0)
    xs, ys = xs[keep], ys[keep]
    if np.unique(xs).size < MIN_POINTS:
        raise FitError(f"needs {MIN_POINTS}+ points at distinct budgets, has {np.unique(xs).size}")
    sse = [solve_ab(xs, ys, c)[2] for c in C_GRID]
    best = int(np.argmin(sse))
    lo, hi = C_GRID[max(best - 1, 0)], C_GRID[min(best + 1, len(C_GRID) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):  # golden section: the SSE is unimodal in c within one grid step of its grid minimum
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if solve_ab(xs, ys, m1)[2] <= solve_ab(xs, ys, m2)[2]:
            hi = m2
        else:
            lo = m1
    c = (lo + hi) / 2
    a, b, _ = solve_ab(xs, ys, c)
    return PowerLaw(float(a), float(b), float(c), xs, ys)


def fit_curve(points, x="time"):
    """PowerLaw of a curve's mean accuracy (analysis.runs.CurvePoint) against its mean training time or epochs."""
    return fit_power_law([p.x(x) for p in points], [p.acc_mean for p in points])


def common_range(f, g):
    """(lo, hi) of x covered by the points of both fits, or None when they do not overlap."""
    lo, hi = max(f.xs.min(), g.xs.min()), min(f.xs.max(), g.xs.max())
    return (float(lo), float(hi)) if hi > lo else None


def area_between(f, g, lo, hi, n=1024):
    """Integral of f - g over ln x from lo to hi (pp x ln units); divided by ln(hi/lo) it is a mean gap in pp."""
    u = np.linspace(math.log(lo), math.log(hi), n)
    d = f.predict(np.exp(u)) - g.predict(np.exp(u))
    return float(np.sum((d[1:] + d[:-1]) / 2 * np.diff(u)))


def param_ci(f):
    """95 % CIs [(lo, hi)] of (a, b, c), linearised least squares: t(dof) x the standard errors of
    s^2 (J^T J)^-1, s^2 = SSE / dof, J the model's derivatives at the fit. None with no degree of freedom (an exact
    curve, not a fit) or where J^T J is singular."""
    if f.dof < 1:
        return None
    u = np.power(f.xs, -f.c)
    jac = np.stack([np.ones_like(u), -u, f.b * u * np.log(f.xs)], axis=1)
    try:
        cov = np.linalg.inv(jac.T @ jac) * float(np.sum(f.residuals ** 2)) / f.dof
    except np.linalg.LinAlgError:
        return None
    with np.errstate(invalid="ignore"):
        half = stats.t975(f.dof) * np.sqrt(np.diag(cov))
    if not np.all(np.isfinite(half)):
        return None
    return [(v - h, v + h) for v, h in zip((f.a, f.b, f.c), half.tolist())]
