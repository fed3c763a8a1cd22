"""What a reviewer asks of a report's many intervals (issue 45), added per group to analysis.compare's tables.

- Families: each test in a table that makes several at once gets a p-value (from the same t and standard error as
  its CI, so p < 0.05 where the CI excludes 0) and Holm's verdict over its family at familywise 95 %. The families of
  a group: the mean gaps of one estimator (every method set; the calibrated one's only where the cyclic row's gap -
  baseline's, the same question, has no seed: own_test); the differences in gaps against the baseline of one
  estimator; the improvements over the baseline on one curve (every set and budget); the
  standard-curve differences behind one estimator's swaps (ranking.csv); the per-run |gap| differences of one
  estimator pair. With 4+ seeds behind a test, `robust`: its verdict is the same whichever one seed is left out of
  the whole group (every statistic recomputed without it), unadjusted and under Holm over the same family.
- Seeds to plan (power.csv): per comparison, from its CI's per-seed spread, the smallest true difference its seeds
  resolve (95 % CI, 80 % power, exact: the noncentral t, stats.power_of) and the seeds --detect pp needs.
- The baseline-calibrated estimator (estimators.csv rows, estimator CALIBRATED): each set's cyclic curve shifted, at
  each budget, by the baseline's standard - cyclic difference of the seed-averaged curves, so that the baseline's own
  cyclic bias cancels. Its cost, every set's cyclic run plus the baseline's standard curve, is split evenly over the
  N sets of the group: each row costs its cyclic run plus 1/N of the baseline's standard curve. Its intervals draw
  the baseline's seeds with the set's (in strata where the two hold other seeds), the shift recomputed in each draw
  (joint_draws), t with the seeds' - 1 degrees of freedom where paired, in strata Satterthwaite's over the strata
  (each stratum's seeds - 1: the baseline's own 2 of 5 under a set of 3 have 1, not 2; the row's note gives them).
  The baseline's own row is in-sample (point estimates; in no family, pair or pooled gap). Its gap - baseline's is
  cyclic's: in no family; its mean gap asks what the cyclic row's gap - baseline's asks (the set's cyclic miss
  beyond the baseline's): one test per set and question, so in no family either wherever that has an interval, a
  test of its own only where the set and the baseline share at most one seed.
- Estimator against estimator (estimator_pairs.csv): per set, the difference of two estimators' per-run |gap|,
  paired by seed, and pooled over the sets (per seed, the mean over sets) over the seeds every set holds.
- The cost ratio paired by seed; Kendall's tau with a CI over seeds; the power-law fits' degrees of freedom and
  parameter CIs, and an exact curve (3 points for 3 parameters) named as no fit, without a fitted gap.
A statistic that cannot be computed (one seed, every seed alike, no baseline) is empty, its reason in stats_note
(power.csv, estimator_pairs.csv: note).
"""
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import numpy as np

from analysis import fit, stats
from analysis.runs import curve_point, match, order_methods, restrict
from analysis.tables import (REVIEW_COLUMNS, compare_one, group_tables, nonnegative, on_shared_seeds,
                             standard_difference, tag)

CALIBRATED = "baseline-calibrated"
DETECT = 0.3  # pp: the smallest difference of interest the paper reads
LOO_SEEDS = 4  # a leave-one-seed-out check needs this many seeds behind a test
# why a calibrated row's mean_gap_p, _resolved_holm, _robust and _robust_holm are empty (stats_note, report.md;
# untested() adds the seeds)
UNTESTED = "mean gap: in no Holm family"
# why power.csv plans no seeds for a calibrated mean gap (a test only where drawn in strata)
NO_POWER = ("no power.csv row: its error is largely the baseline's own seeds, which more of the set's do not shrink "
            "(not as 1 / sqrt(n)), and set seeds the baseline holds would make the cyclic row's gap - baseline's its "
            "test")
# the two tests of an estimators.csv row: (family, its columns' prefix, the estimate's column, its seeds', label)
GAP_TESTS = (("mean_gap", "mean_gap", "mean_gap_pp", "n_seeds", "mean gap"),
             ("delta", "delta_gap_vs_baseline", "delta_gap_vs_baseline", "delta_gap_seeds", "gap - baseline's"))


def extend(tables, group, cmap, min_epochs, x, detect=DETECT):
    """Fill this module's columns of one group's rows of `tables` ({name: (columns, rows)}, rows tagged with their
    group) and add the group's rows of estimators.csv (the calibrated estimator), estimator_pairs.csv, tests.csv and
    power.csv."""
    full = {**cmap, **calibrated_curves(cmap, min_epochs)}
    tables["estimators.csv"][1].extend(tag(group, calibrated_rows(full, min_epochs, x)))
    own = {name: [r for r in rows if r["group"] == group] for name, (_, rows) in tables.items()}
    own["estimator_pairs.csv"] = tag(group, pair_rows(own["estimators.csv"]))
    tables["estimator_pairs.csv"][1].extend(own["estimator_pairs.csv"])
    for name, extra in REVIEW_COLUMNS.items():
        for r in own[name]:
            r.update({c: None for c in extra if c not in r})
    for r in own["estimators.csv"]:
        if r["time_ratio_paired_lo"] is not None:  # the calibrated estimator's, from its joint draws
            continue
        (r["time_ratio_paired"], r["time_ratio_paired_lo"], r["time_ratio_paired_hi"],
         r["time_ratio_paired_seeds"], why) = paired_cost_ratio(full, r["methods"], r["estimator"], min_epochs)
        add_note(r, why and r["time_ratio"] is not None and f"paired cost ratio: {why}")
    tests = families(own, cmap, min_epochs, x)
    tables["tests.csv"][1].extend(tag(group, tests))
    for r in own["ranking.csv"]:
        tau_ci(r)
    fit_freedom(own["fits.csv"])
    tables["power.csv"][1].extend(tag(group, power_rows(tests, detect)))


def add_note(row, text, key="stats_note"):
    """Append `text` (when not empty) to the row's note column."""
    if text:
        row[key] = "; ".join(filter(None, [row.get(key), text]))


# ---- the baseline-calibrated estimator ---------------------------------------------------------------------

def baseline_pairs(cmap, min_epochs=0.0):
    """The baseline's matched (cyclic, standard) points: where they differ is the calibrated estimator's shift."""
    return match(cmap.get(("baseline", "cyclic"), []), cmap.get(("baseline", "standard"), []), min_epochs)


def calibrated_curves(cmap, min_epochs=0.0):
    """{(methods, CALIBRATED): [CurvePoint]}: each set's cyclic points at the budgets where the baseline has both
    curves, every seed's accuracy shifted by the baseline's standard - cyclic mean there, each cost raised by 1/N of
    the baseline's standard curve (N: the sets calibrated). Empty without the baseline's two curves."""
    base = baseline_pairs(cmap, min_epochs)
    sets = order_methods(m for m, s in cmap if s == "cyclic")
    if not base or not sets:
        return {}
    shift = {id(c): s.acc_mean - c.acc_mean for c, s in base}
    share = sum(s.time_mean for _, s in base) / len(sets)
    axis = [s.axis_time_mean for _, s in base]  # the same share on a --x calibrated or flops axis, where annotated
    axis_share = None if None in axis else sum(axis) / len(sets)
    out = {}
    for m in sets:
        points = []
        for p in cmap[(m, "cyclic")]:
            near = match([p], [c for c, _ in base])
            if near:
                d = shift[id(near[0][1])]
                axis_costs = [None if c is None or axis_share is None else c + axis_share for c in p.axis_costs]
                points.append(curve_point(m, CALIBRATED, p.epochs, p.seeds, [a + d for a in p.accs], p.times,
                                          [c + share for c in p.costs], p.axis_times, axis_costs,
                                          [None] * len(p.axis_rounds)))
        if points:
            out[(m, CALIBRATED)] = points
    return out


def calibrated_rows(full, min_epochs=0.0, x="time"):
    """estimators.csv rows of the calibrated curves in `full` (a curve map that holds them), as compare_one writes
    them, but with every interval from joint_draws: the baseline's seeds drawn too, the shift recomputed in each
    resample (compare_one's take it as known: at 3 seeds those 'resolved' ~40 % of null replications,
    test_review). The baseline's own row is in-sample (its shift is its own standard - cyclic difference): point
    estimates only, in no family, pair or pooled gap. No set's gap - baseline's: it is cyclic's, the shift cancels
    (a second family of the same tests); its mean gap is in no family either where the cyclic row's gap - baseline's
    has an interval, else in a family of its own (own_test; families() explains its p and Holm columns in
    stats_note)."""
    keys = [k for k in full if k[1] == CALIBRATED]
    rows = []
    for m in order_methods(m for m, _ in keys):
        r = compare_one(full, m, CALIBRATED, min_epochs, x)
        r["_points"] = []  # its per-budget gaps are the differences against the baseline's: fig9 draws runs' curves
        for c in r:  # compare_one's intervals and its gap - baseline's, replaced below
            if c.endswith(("_lo", "_hi", "resolved")) or c.startswith("delta_gap"):
                r[c] = None
        r["_abs_boot"] = r["_cost_boot"] = None
        note = f"cost: its cyclic run + 1/{len(keys)} of the baseline's standard curve"
        repeated = has_repeated_seeds(full, m)
        draws = None if repeated else calibrated_draws(full, m, min_epochs)
        if repeated:
            note += "; a seed with two runs in one of its curves: no interval (the joint draws take a run per seed)"
        if draws:
            r["_draws"] = draws
            r["n_seeds"] = draws.n
            fill_intervals(r, draws, in_sample=m == "baseline")
            note += ("; in-sample (shifted by its own standard - cyclic difference): no interval, in no family, "
                     "pair or pooled gap" if m == "baseline" else "; " + draws.strata_text(r["_df"]))
        if m != "baseline":
            note += "; gap - baseline's: cyclic's (the shift cancels)"
        r["_in_sample"] = m == "baseline"
        add_note(r, note, "note")
        rows.append(r)
    return rows


# a calibrated row's statistics, each a function of its Draws (or of one of their parts: Draws.df)
MEAN_GAP, ABS_GAP = (lambda d: d.gaps.mean(1)), (lambda d: np.abs(d.gaps).mean(1))
RUN_GAP, COST = (lambda d: d.over_draws(d.runs)), (lambda d: d.standard_apart / d.cost)
COST_PAIRED = lambda d: d.standard / d.cost  # noqa: E731


def fill_intervals(row, draws, in_sample=False):
    """A calibrated row's intervals from its joint draws: the cost ratio's (time_ratio's with the standard curve
    drawn apart, as every estimator's; time_ratio_paired's with the same draw), and unless in-sample the gaps'; each
    with its t's degrees of freedom (Draws.df), in row["_df"] by statistic."""
    n, ratio, dfs = draws.n, row["time_ratio"], {}

    def ci(name, statistic, centre):
        dfs[name] = draws.df(statistic)
        return stats.interval(statistic(draws), n, centre, dfs[name])

    row["_df"] = dfs
    if ratio:
        row["_cost_boot"] = (draws.cost, draws.standard_apart)
        lo, row["time_ratio_hi"] = ci("cost ratio", COST, ratio)
        row["time_ratio_lo"] = nonnegative(lo)
        lo, hi = ci("paired cost ratio", COST_PAIRED, ratio)
        if lo is not None:
            row.update(time_ratio_paired=ratio, time_ratio_paired_lo=nonnegative(lo), time_ratio_paired_hi=hi,
                       time_ratio_paired_seeds=n)
    if in_sample:
        return
    row["mean_gap_lo"], row["mean_gap_hi"] = ci("mean gap", MEAN_GAP, row["mean_gap_pp"])
    row["resolved"] = stats.resolved(row["mean_gap_lo"], row["mean_gap_hi"])
    row["_abs_boot"] = ABS_GAP(draws)
    lo, row["mean_abs_gap_hi"] = ci("mean |gap|", ABS_GAP, row["mean_abs_gap_pp"])
    row["mean_abs_gap_lo"] = nonnegative(lo)
    if row["per_run_abs_gap_pp"] is not None:
        row["_run_boot"] = RUN_GAP(draws)
        lo, row["per_run_abs_gap_hi"] = ci("per-run |gap|", RUN_GAP, row["per_run_abs_gap_pp"])
        row["per_run_abs_gap_lo"] = nonnegative(lo)


@dataclass
class Draws:
    """One calibrated row's statistics over resamples of the seeds of its four curves (the set's cyclic and
    standard, the baseline's cyclic and standard), the shift recomputed in each: seed s of each drawn together where
    the set and the baseline hold the same seeds, else in strata (joint_draws)."""
    seeds: list  # the set's seeds, those the baseline holds too first (paired: every seed of the four curves)
    base_seeds: list  # the baseline's seeds at the budgets matched with the set's, the same ones first
    paired: bool  # one draw for the four curves (the set and the baseline hold the same seeds), else strata
    idx: np.ndarray  # (resamples, len(seeds)): each resample's draw of the set's seeds, indices into seeds
    n: int  # the fewest seeds behind a budget of any of the four curves (stats.interval's sqrt(n / (n - 1)))
    gaps: np.ndarray  # (resamples, budgets): calibrated - standard, seed-averaged
    runs: np.ndarray  # (resamples, len(seeds)): each seed's per-run |gap| under that resample's shift (NaN: none)
    cost: np.ndarray  # (resamples,): the calibrated cost (its share of the baseline's standard curve resampled too)
    standard: np.ndarray  # (resamples,): the set's standard curve's time, in the same draws
    standard_apart: np.ndarray  # (resamples,): the same, in draws of its own (time_ratio's CI draws the sides apart)
    strata: object = None  # the set's Strata where not paired
    parts: list = ()  # in strata, per source of noise: (these Draws with only it drawn, its degrees of freedom)

    def df(self, statistic):
        """The t's degrees of freedom of statistic(draws), (resamples,): None where paired (the seeds' - 1, as every
        t interval); in strata Satterthwaite's over the sources of noise (each stratum's seeds - 1; a one-seed
        stratum's lent spread, its side's seeds - 1), each source's part of the variance that of statistic(the
        Draws with only it drawn)."""
        return self.df_from([statistic(p) for p, _ in self.parts])

    def df_from(self, part_resamples):
        """df() from the statistic's resamples in each of parts' Draws (or of a statistic pooled over rows that drew
        alike: the same sources); None also where no source varies it (no spread: no interval)."""
        var = [float(np.var(r[np.isfinite(r)])) if np.isfinite(r).any() else 0.0 for r in part_resamples]
        return stats.satterthwaite(var, [df for _, df in self.parts]) if self.parts else None

    def over_draws(self, per_seed):
        """(resamples,): each resample's mean of per_seed (resamples, len(seeds)) over its drawn seeds with a value
        (in strata: Strata.means)."""
        if self.strata is not None:
            return self.strata.means(per_seed[:, :, None])[:, 0]
        return finite_mean(np.take_along_axis(per_seed, self.idx, 1), 1)

    def strata_text(self, dfs):
        """How the seeds were drawn, for a row's note; dfs: {statistic: its t's degrees of freedom}."""
        if self.paired:
            return "CIs draw the baseline's seeds with the set's"  # (the same seeds: paired)
        k = len(set(self.seeds) & set(self.base_seeds))
        own = (("set", len(self.seeds) - k), ("baseline", len(self.base_seeds) - k))
        strata = [f"{k} both hold, drawn for both" if k else "none both hold"] + [
            f"the {side}'s {c} own" for side, c in own if c]
        return (f"CIs draw the set's seeds and the baseline's (other seeds) in strata ({', '.join(strata)}), t with "
                "Satterthwaite's degrees of freedom over the strata (each stratum's seeds - 1): "
                + ", ".join(f"{name} {df:.2f}" for name, df in dfs.items() if df is not None))


@dataclass
class Strata:
    """One side's seeds (the set's, or the baseline's) in strata, where the set and the baseline hold other seeds:
    the seeds both hold, drawn together for both sides (seed s fixes the data order and the initialisation of every
    set's runs: their gaps are correlated), and the side's own, drawn for it alone. A resampled mean over the side's
    seeds is its strata's means weighted by their seeds, each stratum's deviation from its own mean rescaled by
    sqrt(k (n - 1) / ((k - 1) n)) (k: its seeds; Rao and Wu's rescaled bootstrap), so that stats.interval's
    sqrt(n / (n - 1)) at the row's n makes each stratum's variance its unbiased s^2 / k. A stratum of one seed has
    no spread of its own: its deviation is that of a seed drawn from the whole side (exchangeable seeds), likewise
    rescaled at the side's seeds; each such stratum draws its own (two sharing one draw would double the variance).
    With `only` a source of noise, the other strata stay at their means: that source's part of the variance."""
    parts: list  # (rows, draw, lend, source): a stratum's rows in the side's values, its (resamples, len(rows)) draw
    # of them, its (resamples, 1) draw of one of the side's rows, lent where the stratum holds one seed, and the
    # source of its noise (Draws.df)
    n: int  # the row's seeds: stats.interval rescales by sqrt(n / (n - 1))
    only: object = None  # a source: only its strata drawn

    def means(self, values):
        """(resamples, columns): the side's resampled column means of values (rows, columns), or of values that
        differ per resample (resamples, rows, columns); NaN where it has none."""
        v = values if values.ndim == 3 else values[None]
        rescale = lambda k: np.sqrt(k * (self.n - 1) / ((k - 1) * self.n))  # noqa: E731
        total = weight = 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            whole, seeds = finite_mean(v, 1), np.isfinite(v).sum(1)
            for rows, draw, lend, source in self.parts:
                own = v[:, rows]
                centre, k = finite_mean(own, 1), np.isfinite(own).sum(1)
                drawn = centre
                if self.only in (None, source):
                    lent = (finite_mean(pick(v, lend), 1) - whole) * rescale(seeds) if (k == 1).any() else 0.0
                    drawn = centre + np.where(k > 1, (finite_mean(pick(own, draw), 1) - centre) * rescale(k), lent)
                total = total + np.where(k > 0, k * drawn, 0.0)
                weight = weight + k
            return np.broadcast_to(total / weight, (len(self.parts[0][1]),) + np.shape(weight)[1:])


def pick(values, draw):
    """(resamples, drawn, columns): the rows `draw` (resamples, drawn) picks of values (1 or resamples, rows,
    columns)."""
    return np.take_along_axis(np.broadcast_to(values, (len(draw),) + values.shape[1:]), draw[:, :, None], 1)


def finite_mean(values, axis):
    """The mean over `axis` of the finite values; NaN where there are none."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, values, 0.0).sum(axis) / finite.sum(axis)


def has_repeated_seeds(full, m):
    """Whether a point of set m's or the baseline's curves behind the calibrated row holds two runs of one seed."""
    curves = [(m, CALIBRATED), (m, "standard"), ("baseline", "cyclic"), ("baseline", "standard")]
    return any(len(p.seeds) != len(set(p.seeds)) for key in curves for p in full.get(key, []))


def calibrated_draws(full, m, min_epochs=0.0, n_boot=stats.N_BOOT):
    """joint_draws of set m's calibrated curve against its standard one at the budgets and seeds compare_one pairs
    (`full`: a curve map with the calibrated curves); None without a pair."""
    pairs, _ = on_shared_seeds(match(full[(m, CALIBRATED)], full.get((m, "standard"), []), min_epochs))
    return joint_draws(full, pairs, min_epochs, n_boot) if pairs else None


def joint_draws(cmap, pairs, min_epochs=0.0, n_boot=stats.N_BOOT, seed=stats.BOOT_SEED):
    """Draws of a calibrated row from its (calibrated, standard) point pairs; the shift at each budget is the drawn
    baseline's standard - cyclic mean there, over the baseline's seeds at the budgets matched with the set's. Where
    the set's curves and the baseline's hold the same seeds, one draw of seeds (with replacement) resamples all four,
    paired by seed. Otherwise in strata (Strata): the seeds both hold drawn together for both sides, the set's others
    for the set and the baseline's others for the shift, so the shift's mean over the baseline's seeds is (k
    mean_shared + (n_b - k) mean_own) / n_b in each draw. (Drawn apart, the set's seeds 0-2 and the baseline's 0-4
    as independent, the interval missed their correlation; one draw from the union gave each side a sample of
    varying size: 0.4-1.5x the right width, test_review.) Paired, every interval reads t with n - 1 degrees of
    freedom, n the fewest seeds of the four curves; in strata the variance is a sum over them, each estimated from
    its own seeds (the baseline's 2 own of 5 under a set of 3: 1 degree of freedom, not 2), so a statistic's t reads
    Satterthwaite's degrees of freedom (Draws.df, from Draws.parts: the draws recomputed per source of noise)."""
    base = baseline_pairs(cmap, min_epochs)
    partner = {id(c): s for c, s in base}

    def base_at(point):  # the baseline's (cyclic, standard) points that shifted this calibrated point
        c = match([point], [c for c, _ in base])[0][1]
        return c, partner[id(c)]

    quads = [(cal, std, *base_at(cal)) for cal, std in pairs]
    held = lambda points: sorted({s for p in points for s in p.seeds}, key=repr)  # noqa: E731
    mine, theirs = held(p for quad in quads for p in quad[:2]), held(p for quad in quads for p in quad[2:])
    shared = [s for s in mine if s in theirs]
    seeds, base_seeds = shared + [s for s in mine if s not in theirs], shared + [s for s in theirs if s not in mine]
    paired = seeds == base_seeds
    cal, std = (seed_grid([quad[k] for quad in quads], seeds) for k in range(2))
    base_cyc, base_std = (seed_grid([quad[k] for quad in quads], base_seeds) for k in range(2, 4))
    n = int(min(np.isfinite(g).sum(0).min() for g in (cal, std, base_cyc, base_std)))
    rng = np.random.default_rng(seed)
    draw = lambda k, size=None: rng.integers(0, k, size=(n_boot, size or k))  # noqa: E731
    both, apart = draw(len(shared)), draw(len(seeds))  # paired: both draws every seed, as one draw did before
    shift = np.array([s.acc_mean - c.acc_mean for _, _, c, s in quads])  # the point estimate's, in cal already
    n_sets = len({m for m, s in cmap if s == "cyclic"})
    share = sum(s.time_mean for _, s in base) / n_sets  # in the calibrated costs already
    cost_grid = seed_grid([max(pairs, key=lambda p: p[0].epochs)[0]], seeds, "cost")
    times = seed_grid([s for _, s in pairs], seeds, "time")
    curve_grid = seed_grid([s for _, s in base], base_seeds, "time")

    def drawn(idx, mean, base_mean, apart_mean, strata=None):  # the Draws of these means (each: values -> resampled)
        moved = base_mean(base_std) - base_mean(base_cyc) - shift  # (resamples, budgets): a draw's shift - the point's
        runs = finite_mean(np.abs((cal - std)[None] + moved[:, None]), 2)
        cost = mean(cost_grid)[:, 0] - share
        curve = base_mean(curve_grid)  # a budget only other seeds hold: its mean
        cost += np.where(np.isfinite(curve), curve, [s.time_mean for _, s in base]).sum(1) / n_sets
        standard, standard_apart = mean(times).sum(1), apart_mean(times).sum(1)
        return Draws(seeds, base_seeds, paired, idx, n, mean(cal) - mean(std) + moved, runs, cost, standard,
                     standard_apart, strata)

    if paired:
        mean = lambda values: stats.resampled_means(values, both)  # noqa: E731
        return drawn(both, mean, mean, lambda values: stats.resampled_means(values, apart))
    return drawn_in_strata(drawn, draw, n, shared, seeds, base_seeds, both, apart)


def seed_grid(points, rows, value="acc"):
    """(seeds in rows, points): each point's per-seed `value`, NaN where a seed has no run (or is not in rows)."""
    out = np.full((len(rows), len(points)), np.nan)
    for j, p in enumerate(points):
        for s, v in p.samples(value):
            if s in rows:
                out[rows.index(s), j] = v
    return out


def drawn_in_strata(drawn, draw, n, shared, seeds, base_seeds, both, apart):
    """joint_draws where the set and the baseline hold other seeds: the Draws in strata (the shared seeds drawn
    together by `both`, each side's own apart), with Draws.parts: the draws recomputed per source of noise, each with
    its degrees of freedom. drawn and draw: joint_draws' (its RNG, drawn on in the same order)."""
    own, others = draw(len(seeds) - len(shared)), draw(len(base_seeds) - len(shared))
    sources = {}  # source of noise -> its degrees of freedom

    def side(rows, only, name):
        parts = []
        for r, d, source in ((np.arange(len(shared)), both, "both"), (np.arange(len(shared), len(rows)), only, name)):
            if len(r):  # a one-seed stratum's lent spread is its side's (all lends of a side: one estimate)
                source = source if len(r) > 1 else f"{name}'s lent"
                sources[source] = max((len(r) if len(r) > 1 else len(rows)) - 1, 1)
                parts.append((r, d, draw(len(rows), 1), source))
        return Strata(parts, n)

    strata, base_strata = side(seeds, own, "set"), side(base_seeds, others, "baseline")
    # the set's seeds drawn apart as one stratum: its spread rescaled at their number, not the row's (fewer) n
    apart_strata = Strata([(np.arange(len(seeds)), apart, draw(len(seeds), 1), "apart")], n)
    sources["apart"] = max(len(seeds) - 1, 1)
    idx = np.concatenate([both, len(shared) + own], 1)

    def only(source):
        s, b, a = (replace(x, only=source) for x in (strata, base_strata, apart_strata))
        return drawn(idx, s.means, b.means, a.means, s)

    out = only(None)
    out.parts = [(only(source), df) for source, df in sources.items()]
    return out


# ---- the cost ratio paired by seed ---------------------------------------------------------------------------

def paired_cost_ratio(cmap, m, estimator, min_epochs=0.0):
    """(ratio, lo, hi, seeds, why): standard time over the estimator's cost over the seeds that have the estimator's
    cost at its largest matched budget and a standard run at every matched budget, with its CI from a bootstrap that
    draws the same seeds on both sides (time_ratio's resamples the two apart); why: the reason it is empty."""
    pairs = match(cmap.get((m, estimator), []), cmap.get((m, "standard"), []), min_epochs)
    if not pairs:
        return None, None, None, None, "no matched budgets"
    pairs, _ = on_shared_seeds(pairs)
    cost = dict(max(pairs, key=lambda p: p[0].epochs)[0].samples("cost"))
    times = [dict(s.samples("time")) for _, s in pairs]
    total = {seed: sum(t[seed] for t in times) for seed in cost if all(seed in t for t in times)}
    if len(total) < 2:
        return None, None, None, len(total), f"{len(total)} seed with every run: no paired CI"
    seeds = list(total)
    a, b = (stats.side([[(s, v[s]) for s in seeds]]) for v in (cost, total))
    denominator = sum(cost[s] for s in seeds)
    if not denominator > 0:
        return None, None, None, len(seeds), "zero cost"
    boot = stats.bootstrap(a, b)  # the same seeds on both sides: paired
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = boot.b[:, 0] / boot.a[:, 0]
    ratio = sum(total.values()) / denominator
    lo, hi = stats.interval(resampled, len(seeds), ratio)
    return ratio, nonnegative(lo), hi, len(seeds), None


# ---- families: p-values, Holm, leave one seed out ------------------------------------------------------------

def own_test(row, cyclic):
    """Why a calibrated row's mean gap is a test of its own (in the family ("mean gap", CALIBRATED)), or None where it
    is in no family: in-sample, without joint draws (no interval), or where the cyclic row's gap - baseline's
    (`cyclic`) has an interval. Both estimate the set's cyclic miss beyond the baseline's: one test per set and
    question, the cyclic row's (paired by seed over the seeds all four curves share: the sharper one), even where the
    calibrated row also draws other seeds (the review: stochastic_depth's resolved there under Holm, not in a second
    family). Only where that has no interval (the set and the baseline share no seed, or one) is the calibrated mean
    gap the one test of it."""
    if row["_in_sample"] or row.get("_draws") is None or delta_seeds(cyclic, tested=True):
        return None
    shared = delta_seeds(cyclic)
    return (f"the cyclic row's gap - baseline's is over {shared} seed: no interval" if shared
            else "the set and the baseline share no seed: the cyclic row's gap - baseline's has none")


def delta_seeds(cyclic, tested=False):
    """The seeds behind a cyclic row's gap - baseline's (tested: only where it has an interval); 0 without one."""
    column = "delta_gap_vs_baseline_lo" if tested else "delta_gap_vs_baseline"
    return cyclic and cyclic[column] is not None and cyclic["delta_gap_seeds"] or 0


def untested(seeds):
    """A calibrated row's stats_note where its mean gap is in no family: the cyclic row's gap - baseline's over
    `seeds` seeds tests it."""
    return (f"{UNTESTED}: the cyclic row's gap - baseline's, over its {seeds} seeds, tests the same question (one test "
            "per set and question): no p, Holm or robust verdict")


def test_values(tables, swaps=None, calibrated=None):
    """{(family, key): (estimate, lo, hi, seeds, df)} of every test in one group's rows ({name: rows}); df: its t's
    degrees of freedom where not seeds - 1 (the calibrated estimator's in strata: Draws.df), else None. swaps: the swap
    tests to evaluate on these rows (another seed set's swaps), default the swaps the ranking rows list; calibrated:
    likewise the calibrated mean-gap tests (the whole group's, where a seed is left out), default own_test's."""
    out = {}
    cyclic = {r["methods"]: r for r in tables["estimators.csv"] if r["estimator"] == "cyclic"}
    for r in tables["estimators.csv"]:
        if r["estimator"] == CALIBRATED and not (  # its gap - baseline's is cyclic's (empty): its mean gap only
                own_test(r, cyclic.get(r["methods"])) if calibrated is None
                else ((("mean_gap", CALIBRATED), r["methods"]) in calibrated)):
            continue
        for family, prefix, value, seeds, label in GAP_TESTS:
            if r[value] is not None:
                out[((family, r["estimator"]), r["methods"])] = (r[value], r[f"{prefix}_lo"], r[f"{prefix}_hi"],
                                                                 r[seeds], (r.get("_df") or {}).get(label))
    for r in tables["improvement.csv"]:
        out[(("improvement", r["schedule"]), (r["methods"], r["budget"]))] = (
            r["improvement_pp"], r["lo"], r["hi"], min(r["n"], r["n_baseline"]), None)
    for r in tables["estimator_pairs.csv"]:
        if r["diff_pp"] is not None:
            out[(("pair", f"{r['estimator_a']} - {r['estimator_b']}"), r["methods"])] = (
                r["diff_pp"], r["diff_lo"], r["diff_hi"], r["n_seeds"], r.get("_df"))
    for r in tables["ranking.csv"]:
        family = ("swap", r["estimator"])
        if swaps is None:
            for a, b, d, lo, hi, n in r["_swap_tests"]:
                if d is not None:
                    out[(family, (r["budget"], a, b))] = (d, lo, hi, n, None)
            continue
        points = dict(zip(r["_names"], r["_std_points"]))
        for fam, (budget, a, b) in swaps:
            if fam == family and budget == r["budget"] and a in points and b in points:
                d, lo, hi, n, _ = standard_difference(points[a], points[b])
                if d is not None:
                    out[(family, (budget, a, b))] = (d, lo, hi, n, None)
    return out


def verdicts(values):
    """({test: p}, {test: resolved: the CI excludes 0}, {test: Holm's verdict within its family})."""
    ps = {k: stats.p_value(*v)[0] for k, v in values.items()}
    by_family = defaultdict(list)
    for k in values:
        by_family[k[0]].append(k)
    holm = {k: h for keys in by_family.values() for k, h in zip(keys, stats.holm([ps[k] for k in keys]))}
    return ps, {k: stats.resolved(v[1], v[2]) for k, v in values.items()}, holm


def without_seed(cmap, seed):
    """The curve map with `seed`'s runs left out (a point of that seed only: gone)."""
    out = {}
    for key, points in cmap.items():
        kept = [restrict(p, set(p.seeds) - {seed}) for p in points if set(p.seeds) - {seed}]
        if kept:
            out[key] = kept
    return out


def test_rows(cmap, min_epochs, x):
    """The rows test_values reads, for a curve map, as analyse_runs computes them (the calibrated estimator too)."""
    rows = group_tables(cmap, min_epochs, x)
    rows["estimators.csv"] += calibrated_rows({**cmap, **calibrated_curves(cmap, min_epochs)}, min_epochs, x)
    rows["estimator_pairs.csv"] = pair_rows(rows["estimators.csv"])
    return rows


def robustness(cmap, values, resolved, holm, min_epochs, x):
    """{test: (robust, robust_holm)} for the tests over LOO_SEEDS+ seeds: whether its verdict (the CI's; Holm's
    over its family) stays the same whichever seed of the group is left out."""
    wanted = [k for k, v in values.items() if v[3] >= LOO_SEEDS]
    if not wanted:
        return {}
    swaps = [k for k in values if k[0][0] == "swap"]
    calibrated = {k for k in values if k[0] == ("mean_gap", CALIBRATED)}  # the same family, whatever seed is left out
    robust = {k: [True, True] for k in wanted}
    for seed in sorted({s for points in cmap.values() for p in points for s in p.seeds}, key=repr):
        kept = test_values(test_rows(without_seed(cmap, seed), min_epochs, x), swaps, calibrated)
        _, resolved_s, holm_s = verdicts(kept)
        for k in wanted:
            robust[k][0] &= bool(resolved_s.get(k)) == bool(resolved[k])
            robust[k][1] &= bool(holm_s.get(k)) == bool(holm[k])
    return {k: tuple(v) for k, v in robust.items()}


FAMILIES = {"mean_gap": "mean gap", "delta": "gap - baseline's", "improvement": "improvement over the baseline",
            "swap": "standard difference of a swap", "pair": "per-run |gap| difference"}


def tests_rows(values, ps, resolved, holm, robust):
    """tests.csv's rows of one group, one per test: its estimate, interval, p, verdicts and notes."""
    sizes = Counter(key[0] for key, p in ps.items() if p is not None)
    tests = []
    for key, (estimate, lo, hi, n, df) in values.items():
        (family, curve), what = key
        if family == "improvement":
            methods, budget = what
        elif family == "swap":
            budget, methods = what[0], f"{what[1]} - {what[2]}"
        else:
            methods, budget = what, None
        why = stats.p_value(estimate, lo, hi, n, df)[1]
        tests.append(dict(family=FAMILIES[family], curve=curve, methods=methods, budget=budget, estimate_pp=estimate,
                          lo=lo, hi=hi, n_seeds=n, p=ps[key], resolved=resolved[key], resolved_holm=holm[key],
                          robust=robust.get(key, (None,))[0], robust_holm=robust.get(key, (None, None))[1],
                          family_tests=sizes[key[0]], note="; ".join(filter(None, [
                              df is not None and f"t with {df:.2f} degrees of freedom (Satterthwaite's over strata)",
                              why != "no CI" and why, key not in robust and ps[key] is not None
                              and f"robust: {n} seeds, needs {LOO_SEEDS}"])) or None))
    return tests


def families(own, cmap, min_epochs, x):
    """Fill the p, Holm and robust columns of one group's rows; returns its tests.csv rows, one per test."""
    values = test_values(own)
    ps, resolved, holm = verdicts(values)
    robust = robustness(cmap, values, resolved, holm, min_epochs, x)
    tests = tests_rows(values, ps, resolved, holm, robust)

    def fill(row, prefix, key, label, note="stats_note"):
        """The row's columns of test `key`; returns the test's seeds where they are too few to leave one out."""
        if key not in values:
            return None
        p, why = stats.p_value(*values[key])
        add_note(row, why and why != "no CI" and f"{label}p: {why}", note)
        name = lambda c: f"{prefix}_{c}" if prefix else c  # noqa: E731
        row[name("p")], row[name("resolved_holm")] = p, holm[key]
        row[name("robust")], row[name("robust_holm")] = robust.get(key, (None, None))
        return values[key][3] if key not in robust and p is not None else None

    cyclic = {r["methods"]: r for r in own["estimators.csv"] if r["estimator"] == "cyclic"}
    for r in own["estimators.csv"]:
        few = [fill(r, prefix, ((family, r["estimator"]), r["methods"]), label + " ")
               for family, prefix, _, _, label in GAP_TESTS]
        if r["estimator"] == CALIBRATED and r.get("_draws") and not r["_in_sample"]:
            why = own_test(r, cyclic.get(r["methods"]))
            tested = f"mean gap: a test of its own, in the family mean gap / {CALIBRATED} ({why}); {NO_POWER}"
            add_note(r, tested if why else untested(delta_seeds(cyclic.get(r["methods"]))))
        if (r["methods"] != "baseline" and r["estimator"] != CALIBRATED and r["mean_gap_pp"] is not None
                and r["delta_gap_vs_baseline"] is None):
            add_note(r, "gap - baseline's: no baseline run at this set's budgets and seeds")
        robust_note(r, few)
    for r in own["improvement.csv"]:
        robust_note(r, [fill(r, "improvement", (("improvement", r["schedule"]), (r["methods"], r["budget"])),
                             "improvement ")])
    for r in own["estimator_pairs.csv"]:
        robust_note(r, [fill(r, "", (("pair", f"{r['estimator_a']} - {r['estimator_b']}"), r["methods"]), "", "note")],
                    "note")
    for r in own["ranking.csv"]:
        keys = [(("swap", r["estimator"]), (r["budget"], a, b)) for a, b, *_ in r["_swap_tests"]]
        if not keys:
            continue
        r["swap_standard_p"] = "; ".join("-" if ps.get(k) is None else f"{ps[k]:.3g}" for k in keys)
        r["swap_standard_resolved_holm"] = "; ".join(yes_no(holm.get(k)) for k in keys)
        r["swaps_standard_separates_holm"] = sum(bool(holm.get(k)) for k in keys)
        if any(k in robust for k in keys):
            r["swap_standard_robust"] = "; ".join(yes_no(robust.get(k, (None,))[0]) for k in keys)
            r["swap_standard_robust_holm"] = "; ".join(yes_no(robust.get(k, (None, None))[1]) for k in keys)
        robust_note(r, [values[k][3] for k in keys if k in values and k not in robust])
    return tests


def yes_no(verdict):
    return "-" if verdict is None else ("yes" if verdict else "no")


def robust_note(row, seeds, key="stats_note"):
    """Say why a test's leave-one-seed-out check is empty: too few seeds."""
    few = [n for n in seeds if n is not None]
    if few:
        add_note(row, f"robust: {min(few)} seeds, needs {LOO_SEEDS}", key)


# ---- seeds to plan ----------------------------------------------------------------------------------------

def power_rows(tests, detect):
    """power.csv rows: per mean gap, gap - baseline's and improvement test (tests.csv rows), the per-seed spread its
    CI implies, the smallest difference its seeds resolve at 80 % power and the seeds `detect` pp needs. None for
    the calibrated estimator's mean gap (a test only in strata: NO_POWER)."""
    rows = []
    for t in tests:
        if t["family"] not in (FAMILIES["mean_gap"], FAMILIES["delta"], FAMILIES["improvement"]) or (
                t["curve"] == CALIBRATED):
            continue
        n = t["n_seeds"]
        row = dict(comparison=t["family"], methods=t["methods"], curve=t["curve"], budget=t["budget"],
                   estimate_pp=t["estimate_pp"], lo=t["lo"], hi=t["hi"], n_seeds=n, sd_per_seed_pp=None, mde_pp=None,
                   detect_pp=detect, seeds_needed=None, note=None)
        sd = stats.spread_from_ci(t["lo"], t["hi"], n) if t["lo"] is not None and n >= 2 else None
        if sd is None:
            row["note"] = f"{n} seed: no spread to plan from" if n < 2 else "no CI: no spread to plan from"
        elif not sd > 1e-9:
            row["note"] = "every seed alike: no spread to plan from"
        else:
            row.update(sd_per_seed_pp=sd, mde_pp=stats.min_detectable(sd, n),
                       seeds_needed=stats.seeds_needed(sd, detect))
            if row["seeds_needed"] is None:
                row["note"] = "over 1000 seeds"
        rows.append(row)
    return rows


# ---- estimator against estimator --------------------------------------------------------------------------

def pair_rows(estimator_rows):
    """estimator_pairs.csv rows: per pair of estimators and set, the mean over shared seeds of (a's per-run |gap| -
    b's) with its t interval (with the calibrated estimator, from its joint draws: the shift recomputed in each, t
    with the draws' n - 1 degrees of freedom where the baseline has fewer seeds, Satterthwaite's where they drew in
    strata), then the pair pooled over sets: per seed, the mean over the sets, over the seeds every set holds
    (families() adds p, Holm and robust). The pairs with the calibrated estimator come last; its in-sample baseline
    row is in none."""
    by_set = defaultdict(dict)  # methods -> estimator -> its row
    for r in estimator_rows:
        if r.get("_per_run") and not r.get("_in_sample"):
            by_set[r["methods"]][r["estimator"]] = r
    estimators = list(dict.fromkeys(e for m in by_set.values() for e in m))
    rows = []
    for a, b in sorted(itertools.combinations(estimators, 2), key=lambda pair: CALIBRATED in pair):
        mine, diffs_of, boots = [], [], []
        for m, runs in by_set.items():
            if a not in runs or b not in runs:
                continue
            ra, rb = runs[a]["_per_run"], runs[b]["_per_run"]
            shared = [s for s in ra if s in rb]
            diffs_of.append({s: ra[s] - rb[s] for s in shared})
            boots.append(resampled_differences(runs[a], runs[b], shared))
            draws = boots[-1] and boots[-1][1]
            gaps = (float(np.mean([r[s] for s in shared])) if shared else None for r in (ra, rb))
            statistic = draws and (lambda d, per_seed=boots[-1][0]: d.over_draws(per_seed(d)))
            mine.append(pair_row(a, b, m, list(diffs_of[-1].values()), draws and statistic(draws), draws and draws.n,
                                 *gaps, draws and draws.df(statistic)))
        if len(mine) > 1:
            common = [s for s in diffs_of[0] if all(s in d for d in diffs_of)]
            drawn = [b and b[1] for b in boots]
            boot, df = pooled_draws(boots)
            row = pair_row(a, b, f"all {len(mine)} sets", [float(np.mean([d[s] for d in diffs_of])) for s in common],
                           boot, min((d.n for d in drawn if d), default=None), df=df)
            held = set().union(*diffs_of)
            if not common:
                row["note"] = "no seed every set holds: no pooled difference"
            elif len(common) < len(held):
                add_note(row, f"over the {len(common)} seeds every set holds (of {len(held)})", "note")
            if common and any(drawn) and not drew_alike(drawn):
                add_note(row, unlike_draws([r["methods"] for r in mine], drawn), "note")
            mine.append(row)
        rows += mine
    return rows


def resampled_differences(row_a, row_b, shared):
    """Where one of two estimators is the calibrated one: (per_seed, its Draws), per_seed(d) the (resamples, seeds) of
    a's per-run |gap| - b's per seed in Draws d (its draws, or one of their parts), NaN for seeds not shared; else None
    (a plain t interval over the differences serves)."""
    draws = row_a.get("_draws") or row_b.get("_draws")
    if draws is None:
        return None

    def per_seed(d):
        out = np.full(d.runs.shape, np.nan)
        for s in shared:  # (seed, k) ids: the k-th run of a seed (one per seed in a curve)
            i = d.seeds.index(s[0])
            a, b = (d.runs[:, i] if r.get("_draws") else r["_per_run"][s] for r in (row_a, row_b))
            out[:, i] = a - b
        return out
    return per_seed, draws


def drew_alike(draws):
    """Whether every row's joint draws (Draws, or None for a row without) exist and drew the same seeds, the set's
    and the baseline's (then the same draws: one RNG seed): only then may their resamples be averaged, draw by draw
    (each holds the baseline's shift: draws of other seeds averaged would thin its noise)."""
    return all(d is not None and (d.seeds, d.base_seeds) == (draws[0].seeds, draws[0].base_seeds) for d in draws)


def unlike_draws(sets, draws):
    """Why a pooled calibrated row has no interval: its sets (names) drew other seeds (their Draws)."""
    how = defaultdict(list)
    for m, d in zip(sets, draws):
        how["no draws" if d is None else "seeds " + " ".join(map(str, d.seeds))
            + ("" if d.paired else " (baseline's " + " ".join(map(str, d.base_seeds)) + ")")].append(m)
    return ("no CI, p or Holm verdict: its sets' calibrated rows draw other seeds (" + "; ".join(
        f"{', '.join(ms)}: {k}" for k, ms in how.items()) + "), each with its own draw of the baseline's shift, "
        "which averaging over the sets would thin")


def pooled_draws(boots):
    """(resamples, degrees of freedom) of the pooled row's difference where its sets' are the calibrated estimator's
    (else (None, None): a t interval serves): per resample the mean over sets per drawn seed, when every set drew
    from the same seeds (the same draws, part by part: Draws.df_from); otherwise no draw is finite (no CI, rather
    than one that takes the shift as known)."""
    if all(b is None for b in boots):
        return None, None
    draws = [b and b[1] for b in boots]
    if not drew_alike(draws):
        return np.array([np.nan]), None

    def pooled(each):  # each set's Draws (or the same part of each): NaN where a set lacks the seed
        return each[0].over_draws(np.mean([per_seed(d) for (per_seed, _), d in zip(boots, each)], 0))
    return pooled(draws), pooled_df(draws, pooled)


def pooled_df(draws, pool):
    """The t's degrees of freedom (Draws.df) of pool(draws), (resamples,), a statistic pooled over calibrated rows'
    Draws that drew alike (the same sources of noise, part by part); None where one has none or they drew paired."""
    if not draws or not all(draws) or not drew_alike(draws) or not draws[0].parts:
        return None
    return draws[0].df_from([pool([d.parts[j][0] for d in draws]) for j in range(len(draws[0].parts))])


def pair_row(a, b, methods, diffs, boot=None, most=None, gap_a=None, gap_b=None, df=None):
    """One estimator_pairs.csv row from the per-seed differences; its interval: a t interval over them, or boot's
    (the calibrated estimator's resampled differences) centred on their mean, over the fewer of the differences'
    seeds and `most` (its draws' n: the baseline's seeds where fewer), as the calibrated row's own intervals, with t's
    `df` where its draws were in strata (Draws.df: row["_df"] and its note)."""
    n = len(diffs) if most is None else min(len(diffs), most)
    row = dict(estimator_a=a, estimator_b=b, methods=methods, n_seeds=n, per_run_abs_gap_a=gap_a,
               per_run_abs_gap_b=gap_b, diff_pp=float(np.mean(diffs)) if diffs else None, p=None, resolved_holm=None,
               robust=None, robust_holm=None, note=None if len(diffs) >= 2 else f"{len(diffs)} shared seed: no CI",
               _df=df)
    row["diff_lo"], row["diff_hi"] = (stats.mean_ci(diffs) if boot is None
                                      else stats.interval(boot, n, row["diff_pp"], df))
    row["resolved"] = stats.resolved(row["diff_lo"], row["diff_hi"])
    if df is not None and row["diff_lo"] is not None:
        add_note(row, f"t with {df:.2f} degrees of freedom (Satterthwaite's over the calibrated row's strata)", "note")
    return row


# ---- Kendall's tau's CI, fits' freedom ------------------------------------------------------------------------

def tau_ci(row, n_boot=stats.N_BOOT, seed=stats.BOOT_SEED):
    """Kendall's tau's 95 % CI over seeds for a ranking.csv row: one draw of seeds (with replacement) resamples
    every set's points on both curves, the scores are recomputed and tau with them."""
    curves = row["_std_points"] + row["_est_points"]
    points = [p for pts in curves for p in pts]
    row["kendall_tau_seeds"] = n = min(p.n for p in points)
    if row["kendall_tau"] is None:
        return add_note(row, "tau CI: no tau (every set tied)")
    if n < 2:
        return add_note(row, "tau CI: a set with one seed")
    if all(p.acc_std == 0 for p in points):
        return add_note(row, "tau CI: every seed alike")
    seeds = sorted({s for p in points for s in p.seeds}, key=repr)
    rng = np.random.default_rng(seed)
    idx, apart = (rng.integers(0, len(seeds), size=(n_boot, len(seeds))) for _ in range(2))

    def scores(sets):  # (n_boot, sets): each set's mean over its budgets of the resampled seed means
        out = []
        for pts in sets:
            values = np.full((len(seeds), len(pts)), np.nan)
            for j, p in enumerate(pts):
                for s, acc in p.samples("acc"):
                    values[seeds.index(s), j] = acc
            out.append(stats.resampled_means(values, idx).mean(1))
        return np.stack(out, 1)

    half = len(curves) // 2
    taus = stats.kendall_tau_rows(scores(curves[:half]), scores(curves[half:]))
    lo, hi = stats.interval(taus, n, row["kendall_tau"])
    row["kendall_tau_lo"], row["kendall_tau_hi"] = (None, None) if lo is None else (max(lo, -1.0), min(hi, 1.0))


def fit_freedom(rows):
    """fits.csv: each fit's degrees of freedom and its parameters' CIs (fit.param_ci); a curve through 3 points is
    exact, not a fit: no rmse, residuals or fitted gap (nor for an estimator against it)."""
    exact = {r["methods"] for r in rows if r.get("_fit") and r["schedule"] == "standard" and r["_fit"].dof < 1}
    for r in rows:
        f = r.get("_fit")
        if f is None:
            continue
        r["dof"] = f.dof
        for name, ci in zip("abc", fit.param_ci(f) or []):
            r[f"{name}_lo"], r[f"{name}_hi"] = ci
        against_exact = r["schedule"] != "standard" and r["methods"] in exact
        if f.dof < 1 or against_exact:
            r.update(area_vs_standard=None, mean_fitted_gap_pp=None, range_lo=None, range_hi=None)
            if f.dof < 1:
                r.update(rmse_pp=None, max_abs_residual_pp=None, residuals_pp=None)
            add_note(r, "exact, not a fit: 3 points for 3 parameters" if f.dof < 1
                     else "no fitted gap: the standard curve's is exact (3 points)", "note")
