"""analysis.stats and analysis.fit on constructed inputs with known answers."""
import math

import numpy as np
import pytest

from analysis import fit, stats


def gap_ci(cyclic, standard):
    """CI of mean(cyclic) - mean(standard) over one column; each side a list of (seed, value)."""
    boot = stats.bootstrap(stats.side([cyclic]), stats.side([standard]))
    lo, hi = stats.interval((boot.a - boot.b)[:, 0], boot.n_seeds) if boot.defined else (None, None)
    return lo, hi, boot.pairing


def test_zero_width_ci_only_with_two_or_more_equal_values():
    assert stats.mean_ci([5.0, 5.0]) == (5.0, 5.0)
    assert stats.mean_ci([5.0]) == (None, None)
    lo, hi = stats.mean_ci([5.0, 5.5])  # 5.25 +- t(1) 12.706 x sd 0.3536 / sqrt(2), by hand
    assert (lo, hi) == pytest.approx((5.25 - 12.706 * 0.25, 5.25 + 12.706 * 0.25))
    assert gap_ci([(0, 81.0)], [(0, 80.0)])[:2] == (None, None)  # one seed: no interval, not a zero-width one
    assert gap_ci([(0, 81.0), (1, 81.0)], [(0, 80.0), (1, 80.0)]) == (1.0, 1.0, "paired")


def test_pairing_by_seed_removes_the_seed_effect():
    rng = np.random.default_rng(1)
    seeds = range(5)
    effect = {s: 3.0 * rng.standard_normal() for s in seeds}  # seed effects 3x the gap
    cyclic = [(s, 81.0 + effect[s] + 0.05 * rng.standard_normal()) for s in seeds]
    standard = [(s, 80.0 + effect[s]) for s in seeds]
    lo, hi, pairing = gap_ci(cyclic, standard)
    assert pairing == "paired" and 0.9 < lo < 1 < hi < 1.1 and stats.resolved(lo, hi)
    lo, hi, pairing = gap_ci(cyclic, [(s + 10, v) for s, v in standard])  # other seeds: resampled apart, wide
    assert pairing == "independent" and lo < 0 < hi and not stats.resolved(lo, hi)


def test_noise_around_zero_is_not_resolved():
    gaps = [1.0, -1.0, 0.6, -0.8, 0.3]  # +-1 pp around 0
    lo, hi, _ = gap_ci([(s, 80 + g) for s, g in enumerate(gaps)], [(s, 80.0) for s in range(5)])
    mean, sd = np.mean(gaps), np.std(gaps, ddof=1)
    half = 2.776 * sd / 5 ** 0.5  # t(4) x sd / sqrt(5), by hand: not just any interval around 0
    assert (lo, hi) == pytest.approx((mean - half, mean + half), abs=0.02)
    assert lo < 0 < hi and stats.resolved(lo, hi) is False
    assert stats.resolved(None, None) is None


def test_a_seed_stays_whole_across_columns():
    # seed 0 is +1 at both budgets, seed 1 is -1 at both: the mean over budgets keeps the seed's sign per draw
    a = stats.side([[(0, 1.0), (1, -1.0)], [(0, 1.0), (1, -1.0)]])
    b = stats.side([[(0, 0.0), (1, 0.0)], [(0, 0.0), (1, 0.0)]])
    boot = stats.bootstrap(a, b)
    assert boot.paired and boot.n_seeds == 2 and boot.defined
    assert set(np.unique((boot.a - boot.b).mean(1))) == {-1.0, 0.0, 1.0}
    assert stats.bootstrap(a, b).a.tolist() == boot.a.tolist()  # fixed RNG seed: reproducible


def test_missing_budget_makes_the_sides_independent_and_the_column_undefined():
    a = stats.side([[(0, 1.0), (1, 2.0)], [(0, 3.0)]])
    b = stats.side([[(0, 0.0), (1, 0.0)], [(0, 0.0), (1, 0.0)]])
    boot = stats.bootstrap(a, b)
    assert not boot.paired and boot.defined_at.tolist() == [True, False] and not boot.defined


def test_kendall_tau_by_hand_for_four_methods():
    # A > B > C > D on one curve, A > C > B > D on the other: 5 concordant pairs, 1 discordant (B, C)
    tau, discordant = stats.kendall_tau([4, 3, 2, 1], [4, 2, 3, 1])
    assert tau == pytest.approx((5 - 1) / 6) and discordant == [(1, 2)]
    tau, discordant = stats.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1])
    assert tau == -1 and len(discordant) == 6
    # a tie on one side (tau-b): C=4, D=1, one pair tied only in y -> (4 - 1) / sqrt((5 + 1) * 5)
    tau, discordant = stats.kendall_tau([1, 2, 3, 4], [1, 1, 3, 2])
    assert tau == pytest.approx(3 / math.sqrt(30)) and discordant == [(2, 3)]
    assert stats.kendall_tau([1, 1], [2, 3])[0] is None


@pytest.mark.parametrize("a,b,c", [(90.0, 20.0, 0.7), (95.0, 60.0, 1.3), (76.0, 30.0, 0.25)])
def test_power_law_fit_recovers_known_parameters(a, b, c):
    x = np.array([1.0, 2, 4, 8, 16, 32])
    f = fit.fit_power_law(x, a - b * x ** -c)
    assert (f.a, f.b, f.c) == pytest.approx((a, b, c), rel=1e-6)
    assert f.rmse < 1e-6 and f.predict(64) == pytest.approx(a - b * 64 ** -c)


def test_power_law_fit_with_noise_and_too_few_points():
    rng = np.random.default_rng(0)
    x = np.geomspace(1, 64, 12)
    f = fit.fit_power_law(x, 90 - 20 * x ** -0.7 + 0.01 * rng.standard_normal(x.size))
    assert (f.a, f.b, f.c) == pytest.approx((90, 20, 0.7), rel=0.02)
    with pytest.raises(fit.FitError, match="needs 3"):
        fit.fit_power_law([1, 2, 2], [1, 2, 3])


def test_area_between_two_curves_that_differ_by_a_constant():
    x = np.array([1.0, 2, 4, 8])
    f, g = fit.fit_power_law(x, 91 - 20 * x ** -0.5), fit.fit_power_law(x * 2, 90 - 20 * (x * 2) ** -0.5)
    assert fit.common_range(f, g) == (2, 8)
    assert fit.area_between(f, g, 2, 8) == pytest.approx(1 * math.log(4), rel=1e-6)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_the_95_percent_interval_covers_95_percent_with_few_seeds(n):
    """A percentile bootstrap covers 52 % (n=2) / 74 % (n=3) of the time; the intervals used must cover ~95 %,
    both the t interval of a mean and the bootstrap-SE one of a paired gap."""
    rng = np.random.default_rng(7)
    hits_mean = hits_gap = 0
    trials = 400
    for _ in range(trials):
        v = rng.normal(0.0, 1.0, n)
        lo, hi = stats.mean_ci(v)
        hits_mean += lo <= 0 <= hi
        seed_effect = rng.normal(0.0, 3.0, n)
        lo, hi, _ = gap_ci([(s, 80 + 0.5 + seed_effect[s] + v[s]) for s in range(n)],
                           [(s, 80 + seed_effect[s]) for s in range(n)])
        hits_gap += lo <= 0.5 <= hi
    assert 0.91 <= hits_mean / trials <= 0.99 and 0.91 <= hits_gap / trials <= 0.99, (hits_mean, hits_gap)


def test_a_fractional_degrees_of_freedom_reads_the_t_quantile_itself():
    """Satterthwaite's degrees of freedom are fractional: under 10 t975 gives the quantile itself (scipy.stats.t.ppf:
    8.3879 at 1.22, 3.5445 at 2.53, 2.2303 at 9.93), not the table's row below (12.706 at 1.22); between two whole
    degrees it lies between their table values, and a whole df reads the table as before. The p-value at the same
    df puts 0.05 exactly at the interval's edge; at whole df the fractional integral equals the closed form."""
    for df, q in ((1.22, 8.387863), (2.53, 3.544510), (9.93, 2.230270)):
        assert stats.t975(df) == pytest.approx(q, abs=1e-5)
        assert stats.t975(math.ceil(df)) < stats.t975(df) < stats.t975(math.floor(df))
        assert stats.p_value(1.0, 0.0, 2.0, 3, df)[0] == pytest.approx(1 - stats.t_within(stats.t975(df), df))
        assert stats.p_value(stats.t975(df), 0.0, 2 * stats.t975(df), 3, df)[0] == pytest.approx(0.05, abs=1e-9)
    assert (stats.t975(2), stats.t975(11), stats.t975(12.5)) == (4.303, 2.228, 2.179)
    for df in range(1, 11):
        assert stats.fractional_within(2.0, df) == pytest.approx(stats.t_within(2.0, df), abs=1e-10)


def test_satterthwaites_degrees_of_freedom_of_a_sum_of_strata():
    """Welch's textbook case: variances of the means 4/10 and 9/20 over 9 and 19 degrees of freedom give
    0.85^2 / (0.16 / 9 + 0.2025 / 19) = 25.5; one component alone gives its own; a zero one is not counted."""
    assert stats.satterthwaite([0.4, 0.45], [9, 19]) == pytest.approx(0.85 ** 2 / (0.16 / 9 + 0.2025 / 19))
    assert stats.satterthwaite([0.0, 0.3], [2, 1]) == 1 and stats.satterthwaite([0.0, 0.0], [2, 1]) is None
    assert 1 <= stats.satterthwaite([1e-6, 1.0], [2, 1]) < 1.001
