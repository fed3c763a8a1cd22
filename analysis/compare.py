"""Diff the standard tradeoff curve against each one-run estimator's, every number with a 95 % CI over seeds.

    python -m analysis.compare RUN_DIR_OR_PARENT... [--out DIR] [--metric max|final] [--min-epochs E]
                               [--x time|epochs|calibrated|flops] [--calibration FILE] [--complete-seeds]

Prints the gap table and writes to DIR: curves.csv, gaps.csv (cyclic vs standard), estimators.csv (every one-run
schedule vs standard), points.csv (cyclic vs standard per budget), improvement.csv, ranking.csv and fits.csv.
Runs that differ in a result-defining option (analysis.runs.RESULT_KEYS) form separate groups, compared apart.
--x calibrated and --x flops (analysis.axes) add columns of their own (docs/run-format.md) and method_costs.csv;
on them the hardware's name does not split groups.
"""
import argparse
import csv
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from analysis import axes, fit, stats
from analysis.runs import (ESTIMATORS, MATCH_TOLERANCE, RunError, complete_seeds, group_curves, group_runs, load_runs,
                           match, order_methods, restrict)

CURVE_COLUMNS = ["methods", "schedule", "epochs", "n", "acc_mean", "acc_std", "time_mean", "acc_lo", "acc_hi",
                 "cost_mean", "group"]
GAP_COLUMNS = ["methods", "n_points", "mean_gap_pp", "max_abs_gap_pp", "improvement_corr", "standard_time_s",
               "cyclic_time_s", "time_ratio", "eq1_ratio", "budgets", "note", "n_seeds", "mean_gap_lo", "mean_gap_hi",
               "resolved", "pairing", "mean_abs_gap_pp", "mean_abs_gap_lo", "mean_abs_gap_hi", "time_ratio_lo",
               "time_ratio_hi", "group", "per_run_abs_gap_pp", "per_run_abs_gap_lo", "per_run_abs_gap_hi",
               "delta_gap_vs_baseline", "delta_gap_vs_baseline_lo", "delta_gap_vs_baseline_hi",
               "delta_gap_vs_baseline_resolved", "delta_gap_seeds"]
ESTIMATOR_COLUMNS = ["methods", "estimator"] + GAP_COLUMNS[1:]
POINT_COLUMNS = ["methods", "budget", "standard_mean", "standard_std", "standard_n", "cyclic_mean", "cyclic_std",
                 "cyclic_n", "gap_pp", "gap_lo", "gap_hi", "resolved", "pairing", "group"]
IMPROVEMENT_COLUMNS = ["methods", "schedule", "budget", "improvement_pp", "lo", "hi", "n", "n_baseline", "pairing",
                       "group"]
RANKING_COLUMNS = ["estimator", "budget", "n_methods", "standard_order", "estimator_order", "kendall_tau",
                   "discordant_pairs", "n_pairs", "swaps", "group", "swaps_standard_separates", "swaps_without_ci",
                   "swap_standard_diffs"]
FIT_COLUMNS = ["methods", "schedule", "x", "n_points", "a", "b", "c", "rmse_pp", "max_abs_residual_pp", "residuals_pp",
               "range_lo", "range_hi", "area_vs_standard", "mean_fitted_gap_pp", "note", "group"]


def axis_columns(x):
    """The extra columns of --x calibrated / flops: (curves.csv's, gaps.csv's and estimators.csv's)."""
    if x not in axes.NEW_AXES:
        return [], []
    time, cost, standard, cyclic, ratio = axes.COLUMNS[x]
    return [f"{time}_mean", f"{cost}_mean"], [standard, cyclic, ratio, f"{ratio}_lo", f"{ratio}_hi", f"{ratio}_seeds"]


METHOD_COST_COLUMNS = ["methods", "per_image", "relative", "relative_lo", "relative_hi", "coverage", "runs", "unit",
                       "group"]


@dataclass
class Analysis:
    """Everything compare and report need: the runs, their curves per group and every table by file name."""
    runs: list
    groups: dict  # {group: [Run]}: runs that differ only in seed (analysis.runs.group_runs)
    curves: dict  # {group: {(methods, schedule): [CurvePoint]}}
    tables: dict  # {"gaps.csv": (columns, rows), ...}
    dropped: list  # (group, methods, schedule, epochs, other schedule) of budgets without a partner
    left_out: list  # (group, methods, seed, missing runs) of seeds --complete-seeds set aside
    x: str = "time"
    calibration: object = None  # analysis.axes.Calibration on --x calibrated

    def rows(self, name):
        return self.tables[name][1]


def sides(pairs):
    """The two stats.Side of the accuracies of matched (a, b) point pairs, one column per pair."""
    return stats.side([a.samples("acc") for a, _ in pairs]), stats.side([b.samples("acc") for _, b in pairs])


def on_shared_seeds(pairs):
    """(pairs, note): matched point pairs (a, b) where the two curves do not hold the same seeds (an unfinished
    sweep; extra seeds run for one curve only), each pair restricted to the seeds both its points hold, so that
    seed s is compared with seed s at every budget (a seed missing from one budget costs that budget, not the
    pairing); unchanged (note None) where every pair already agrees or some budget shares fewer than 2 seeds (no
    CI could be paired there: the curves stay two means, resampled independently)."""
    shared = [set(a.seeds) & set(b.seeds) for a, b in pairs]
    if all(set(a.seeds) == set(b.seeds) for a, b in pairs) or min(map(len, shared)) < 2:
        return pairs, None
    held = set().union(*(set(p.seeds) for pair in pairs for p in pair))
    note = f"paired over the seeds both curves hold at each budget ({len(set().union(*shared))} of {len(held)} seeds)"
    return [(restrict(a, seeds), restrict(b, seeds)) for (a, b), seeds in zip(pairs, shared)], note


def per_run_abs_gaps(a, b):
    """Per seed, the mean over budgets of |estimator - standard| of that seed's own runs (sides a, b): how far
    one run's curve lies from the standard curve (seed-averaged gaps of opposite signs cancel; these do not).
    None unless both sides hold the same seeds at every budget."""
    b = stats.aligned(a, b)
    if b is None:
        return None
    with np.errstate(invalid="ignore"):  # a seed missing a budget on both sides: mean over the budgets it has
        return np.nanmean(np.abs(a.values - b.values), axis=1)


def nonnegative(lo):
    """A CI's lower end for a statistic that is never negative (a mean |gap|, a time ratio): the t interval's tail
    cut at 0."""
    return None if lo is None else max(lo, 0.0)


def ci_at(boot, diffs, j, center=None):
    """CI of column j of the resampled differences, centred on `center` (default: their mean; improvement.csv's: its
    point estimate, which its p-value is centred on, so that p < 0.05 where the CI excludes 0); (None, None) where a
    side has one seed there."""
    return stats.interval(diffs[:, j], int(boot.counts[j]), center) if boot.defined_at[j] else (None, None)


def estimator_of(cmap):
    """The one-run schedules with curves in `cmap`: the known ones in ESTIMATORS order, then unknown ones."""
    present = {s for _, s in cmap if s != "standard"}
    return [s for s in ESTIMATORS if s in present] + sorted(present - set(ESTIMATORS))


def improvement_corr(cmap, m, estimator, pairs):
    """Pearson r over budgets of (m - baseline) on the standard curve against the same on the estimator's."""
    base_est, base_std = cmap.get(("baseline", estimator), []), cmap.get(("baseline", "standard"), [])
    xs, ys = [], []
    for c, s in pairs:  # at the budgets where the baseline has both curves too, over the seeds each pair shares
        bc, bs = match([c], base_est), match([s], base_std)
        if bc and bs:
            ((std_m, std_base),), _ = on_shared_seeds(bs)
            ((est_m, est_base),), _ = on_shared_seeds(bc)
            xs.append(std_m.acc_mean - std_base.acc_mean)
            ys.append(est_m.acc_mean - est_base.acc_mean)
    return stats.pearson(xs, ys)


def time_stats(pairs):
    """standard_time_s, cyclic_time_s (curve_cost_s at the largest budget), their ratio, its CI and the Boot."""
    last = max(pairs, key=lambda p: p[0].epochs)[0]
    boot = stats.bootstrap(stats.side([last.samples("cost")]), stats.side([s.samples("time") for _, s in pairs]))
    standard, cost = sum(s.time_mean for _, s in pairs), last.cost_mean
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero cost resamples to inf, which the CI drops
        resampled = boot.b.sum(1) / boot.a[:, 0]
    ratio = standard / cost if cost else None
    lo, hi = stats.interval(resampled, boot.n_seeds, ratio) if boot.defined and ratio else (None, None)
    return standard, cost, ratio, nonnegative(lo), hi, boot


def axis_stats(pairs, n_boot=stats.N_BOOT):
    """On --x calibrated or flops: (standard, estimator, ratio, lo, hi, seeds): the sum over matched budgets of the
    standard runs' mean axis value, the estimator run's axis cost (its whole run) at the largest budget, their ratio,
    and its 95 % CI paired by seed: a resample draws seeds, each with its own standard runs and estimator run, and
    on the calibrated axis one calibration round for every configuration (the rounds were interleaved, so a round's
    costs belong together). CI None with fewer than 2 seeds that have every run. Also returns the resampled means
    (estimator, standard), or None, for the report's pooled cost."""
    last = max(pairs, key=lambda p: p[0].epochs)[0]
    standard, cost = sum(s.axis_time_mean for _, s in pairs), last.axis_cost_mean
    ratio = standard / cost if cost else None
    per_seed = [dict(s.samples("axis_rounds")) for _, s in pairs]
    seeds = sorted(set(last.seeds).intersection(*per_seed), key=repr)
    if ratio is None or len(seeds) < 2:
        return standard, cost, ratio, None, None, len(seeds), None
    mine = dict(last.samples("axis_rounds"))  # {seed: (times, costs) per round}; FLOPs: one exact round
    if any(mine.get(seed) is None for seed in seeds):  # (the calibrated estimator's costs have no rounds)
        return standard, cost, ratio, None, None, len(seeds), None
    std = np.array([[sum(col) for col in zip(*(b[seed][0] for b in per_seed))] for seed in seeds])  # (seeds, rounds)
    est = np.array([mine[seed][1] for seed in seeds])
    rng = np.random.default_rng(stats.BOOT_SEED)
    idx = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    rnd = rng.integers(0, std.shape[1], size=(n_boot, 1))
    means = est[idx, rnd].mean(1), std[idx, rnd].mean(1)
    lo, hi = stats.interval(means[1] / means[0], len(seeds), ratio)
    return standard, cost, ratio, nonnegative(lo), hi, len(seeds), means


def delta_gap_vs_baseline(cmap, m, estimator, min_epochs=0.0):
    """How much more the estimator's curve misses set m's standard curve than the baseline's, paired by seed: per
    seed s, the mean over the budgets where the most seeds have all four curves of (estimator_m - standard_m) -
    (estimator_base - standard_base), then the mean over the seeds that have all four at every such budget (their
    number: delta_gap_seeds), with its t interval
    (the paper's caveat: negative for regularisers whose gains come late, which a cyclic run misses).
    (delta, lo, hi, resolved, seeds); all None for the baseline or without shared budgets and seeds."""
    none = (None,) * 5
    if m == "baseline":
        return none
    base = match(cmap.get(("baseline", estimator), []), cmap.get(("baseline", "standard"), []), min_epochs)
    quads = [(e, s, be, bs) for e, s in match(cmap.get((m, estimator), []), cmap.get((m, "standard"), []), min_epochs)
             for be, bs in base if abs(be.epochs - e.epochs) <= MATCH_TOLERANCE * max(be.epochs, e.epochs)]
    per_budget = []  # {seed: that seed's (estimator - standard) of m minus the same of the baseline}
    for quad in quads:
        accs = [dict(p.samples("acc")) for p in quad]
        per_budget.append({seed: (accs[0][seed] - accs[1][seed]) - (accs[2][seed] - accs[3][seed])
                           for seed in set(accs[0]).intersection(*accs[1:])})
    per_budget = [b for b in per_budget if b]
    # the budgets the most seeds have all four curves at (an extra seed at an extra budget, or a crashed run,
    # costs that budget or that seed, not the statistic), then the seeds complete over them
    most = max((len(b) for b in per_budget), default=0)
    kept = [b for b in per_budget if len(b) == most] if most else []
    seeds = set.intersection(*(set(b) for b in kept)) if kept else set()
    deltas = [d for d in (sum(b[s] for b in kept) / len(kept) for s in seeds) if math.isfinite(d)]
    if not deltas:
        return none
    lo, hi = stats.mean_ci(deltas)
    return sum(deltas) / len(deltas), lo, hi, stats.resolved(lo, hi), len(deltas)


def compare_one(cmap, m, estimator, min_epochs=0.0, x="time"):
    """The gaps.csv row of method set m, estimator against standard; '_points' holds its per-budget rows."""
    row = {c: None for c in ESTIMATOR_COLUMNS + axis_columns(x)[1]}
    row.update(methods=m, estimator=estimator, n_points=0, _points=[])
    std, est = cmap.get((m, "standard"), []), cmap.get((m, estimator), [])
    if not std or not est:
        row["note"] = f"no {'standard' if not std else estimator} runs"
        return row
    pairs = match(est, std, min_epochs)  # (estimator, standard)
    row["n_points"] = len(pairs)
    if not pairs:
        row["note"] = f"no budgets match within {MATCH_TOLERANCE:.0%}"
        return row
    pairs, shared_note = on_shared_seeds(pairs)
    side_a, side_b = sides(pairs)
    boot = stats.bootstrap(side_a, side_b)
    gaps, resampled = [c.acc_mean - s.acc_mean for c, s in pairs], boot.a - boot.b
    row.update(mean_gap_pp=sum(gaps) / len(gaps), max_abs_gap_pp=max(abs(g) for g in gaps),
               mean_abs_gap_pp=sum(abs(g) for g in gaps) / len(gaps), n_seeds=boot.n_seeds, pairing=boot.pairing,
               eq1_ratio=sum(s.epochs for _, s in pairs) / max(s.epochs for _, s in pairs),
               budgets=" ".join(f"{c.epochs:g}" for c, _ in pairs))
    notes = [shared_note] if shared_note else []  # restricted pairs hold the same seeds at each budget: paired
    if boot.defined:
        n = boot.n_seeds
        row["mean_gap_lo"], row["mean_gap_hi"] = stats.interval(resampled.mean(1), n, row["mean_gap_pp"])
        lo, row["mean_abs_gap_hi"] = stats.interval(np.abs(resampled).mean(1), n, row["mean_abs_gap_pp"])
        row["mean_abs_gap_lo"] = nonnegative(lo)
        row["resolved"] = stats.resolved(row["mean_gap_lo"], row["mean_gap_hi"])
        row["_abs_boot"] = np.abs(resampled).mean(1)
    else:
        notes.append(f"{boot.n_seeds} seed at some budget: no CI")
    per_run = per_run_abs_gaps(side_a, side_b)
    if per_run is not None:
        row["per_run_abs_gap_pp"] = float(np.nanmean(per_run))
        lo, row["per_run_abs_gap_hi"] = stats.mean_ci(per_run)
        row["per_run_abs_gap_lo"] = nonnegative(lo)
        row["_per_run"] = dict(zip(side_a.ids, per_run.tolist()))  # {(seed, k): that run's mean |gap|}
    (row["standard_time_s"], row["cyclic_time_s"], row["time_ratio"], row["time_ratio_lo"], row["time_ratio_hi"],
     time_boot) = time_stats(pairs)
    row["_cost_boot"] = (time_boot.a[:, 0], time_boot.b.sum(1)) if time_boot.defined else None
    if x in axes.NEW_AXES:
        *values, row["_axis_boot"] = axis_stats(pairs)
        row.update(zip(axis_columns(x)[1], values))
    if m != "baseline":
        row["improvement_corr"] = improvement_corr(cmap, m, estimator, pairs)
        if row["improvement_corr"] is None:
            notes.append("correlation needs 2+ budgets with baseline curves and non-constant improvements")
    (row["delta_gap_vs_baseline"], row["delta_gap_vs_baseline_lo"], row["delta_gap_vs_baseline_hi"],
     row["delta_gap_vs_baseline_resolved"], row["delta_gap_seeds"]) = delta_gap_vs_baseline(cmap, m, estimator,
                                                                                          min_epochs)
    row["note"] = "; ".join(notes) or None
    for j, (c, s) in enumerate(pairs):
        lo, hi = ci_at(boot, resampled, j)
        row["_points"].append(dict(methods=m, budget=s.epochs, standard_mean=s.acc_mean, standard_std=s.acc_std,
                                   standard_n=s.n, cyclic_mean=c.acc_mean, cyclic_std=c.acc_std, cyclic_n=c.n,
                                   gap_pp=c.acc_mean - s.acc_mean, gap_lo=lo, gap_hi=hi,
                                   resolved=stats.resolved(lo, hi), pairing=boot.pairing))
    return row


def improvement_series(cmap, m, schedule, min_epochs=0.0):
    """improvement.csv rows of m on one curve: (m - baseline) accuracy at each budget both have, with its CI."""
    pairs = match(cmap.get((m, schedule), []), cmap.get(("baseline", schedule), []), min_epochs)
    if not pairs:
        return []
    pairs, _ = on_shared_seeds(pairs)
    boot = stats.bootstrap(*sides(pairs))
    out = []
    for j, (a, b) in enumerate(pairs):
        lo, hi = ci_at(boot, boot.a - boot.b, j, a.acc_mean - b.acc_mean)
        out.append(dict(methods=m, schedule=schedule, budget=a.epochs, improvement_pp=a.acc_mean - b.acc_mean, lo=lo,
                        hi=hi, n=a.n, n_baseline=b.n, pairing=boot.pairing))
    return out


def budget_keys(epochs_lists):
    """A representative budget for each epochs value: values within 5 % of an earlier one share its key."""
    keys = {}
    for e in sorted({e for es in epochs_lists for e in es}):
        near = [k for k in set(keys.values()) if abs(k - e) <= MATCH_TOLERANCE * max(k, e)]
        keys[e] = near[0] if near else e
    return keys


def order_text(names, scores):
    """'a > b = c': names by descending score, '=' between exact ties."""
    ranked = sorted(zip(scores, names), key=lambda t: (-t[0], t[1]))
    text = ranked[0][1]
    for (prev, _), (score, name) in zip(ranked, ranked[1:]):
        text += f" {'=' if score == prev else '>'} {name}"
    return text


def seed_means(points):
    """A one-column Side: per seed (of those with a point at every one of `points`' budgets) its mean accuracy over
    them, so that a seed missing one budget costs that seed, not the pairing of every other."""
    s = stats.side([p.samples("acc") for p in points])
    means = s.values.mean(1, keepdims=True)  # NaN for a seed missing a budget
    return rows_of(stats.Side(s.ids, means), np.isfinite(means[:, 0]))


def rows_of(side, keep):
    """The Side of `side`'s rows where the boolean mask `keep` holds."""
    return stats.Side([i for i, k in zip(side.ids, keep) if k], side.values[keep])


def standard_difference(a_points, b_points):
    """Set a minus set b on the standard curve, the mean over the budgets of a_points / b_points (the same budgets
    in the same order) of the seeds that have them all, with its 95 % CI over seeds: paired by seed over the seeds
    both sets have (seed effects cancel), or, where fewer than 2 are shared, each set's seeds resampled on their
    own: (diff, lo, hi, seeds, pairing)."""
    a, b = seed_means(a_points), seed_means(b_points)
    shared = set(a.ids) & set(b.ids)
    if len(shared) >= 2:
        a, b = (rows_of(x, np.array([i in shared for i in x.ids])) for x in (a, b))
    if not a.ids or not b.ids:
        return None, None, None, 0, None
    boot = stats.bootstrap(a, b)
    diff = float(a.values.mean() - b.values.mean())
    lo, hi = stats.interval(boot.a[:, 0] - boot.b[:, 0], boot.n_seeds, diff) if boot.defined else (None, None)
    return diff, lo, hi, boot.n_seeds, boot.pairing


def ranking_row(estimator, budget, names, std_points, est_points):
    """One ranking.csv row: the two orderings (scores: mean accuracy over the points given per set), Kendall's
    tau-b, the pairs that swap and, per swap, the two sets' difference on the standard curve with its CI: a swap
    the standard curve separates (CI excludes 0) is a miss of the estimator; one it does not separate with these
    seeds is not shown to be one; one without a CI (a set with one seed) is counted apart."""
    mean = lambda pts: sum(p.acc_mean for p in pts) / len(pts)  # noqa: E731
    std_scores, est_scores = [mean(p) for p in std_points], [mean(p) for p in est_points]
    tau, discordant = stats.kendall_tau(std_scores, est_scores)
    n = len(names)
    diffs, separated, no_ci, tests = [], 0, 0, []
    for i, j in discordant:
        d, lo, hi, seeds, pairing = standard_difference(std_points[i], std_points[j])
        tests.append((names[i], names[j], d, lo, hi, seeds))
        separated += bool(stats.resolved(lo, hi))
        no_ci += lo is None
        ci = f"[{lo:+.2f}, {hi:+.2f}]" if lo is not None else "no CI"
        diffs.append(f"{names[i]} - {names[j]} " + (f"{d:+.2f} {ci} ({seeds} seeds, {pairing})" if d is not None
                                                     else "no seed with every budget"))
    return dict(estimator=estimator, budget=budget, n_methods=n, standard_order=order_text(names, std_scores),
                estimator_order=order_text(names, est_scores), kendall_tau=tau, discordant_pairs=len(discordant),
                n_pairs=n * (n - 1) // 2, swaps="; ".join(f"{names[i]} <> {names[j]}" for i, j in discordant),
                swaps_standard_separates=separated, swaps_without_ci=no_ci, swap_standard_diffs="; ".join(diffs),
                _names=names, _std=std_scores, _est=est_scores, _std_points=std_points, _est_points=est_points,
                _swap_tests=tests)


def ranking_rows(cmap, estimator, min_epochs=0.0):
    """Does the estimator's curve order the method sets like the standard one? Per budget, then 'overall'.

    Overall scores are mean accuracies over the budgets every method set has on both curves."""
    paired = {m: match(cmap[(m, estimator)], cmap[(m, "standard")], min_epochs)
              for m in order_methods(m for m, s in cmap if s == estimator) if (m, "standard") in cmap}
    keys = budget_keys([[s.epochs for _, s in pairs] for pairs in paired.values()])
    at = {m: {keys[s.epochs]: (s, c) for c, s in pairs} for m, pairs in paired.items()}
    rows = []
    for budget in sorted(set(keys.values())):
        names = [m for m in at if budget in at[m]]
        if len(names) >= 2:
            rows.append(ranking_row(estimator, budget, names, [[at[m][budget][0]] for m in names],
                                    [[at[m][budget][1]] for m in names]))
    common = sorted(set.intersection(*(set(v) for v in at.values()))) if at else []
    names = [m for m in at if at[m]]
    if common and len(names) >= 2:
        rows.append(ranking_row(estimator, "overall", names, [[at[m][b][0] for b in common] for m in names],
                                [[at[m][b][1] for b in common] for m in names]))
    return rows


def fit_rows(cmap, x):
    """fits.csv rows: acc = a - b x^-c per curve; estimator rows add the area to the standard fit over the shared x."""
    fits, rows = {}, []
    curves_in_order = [(m, s) for m in order_methods(m for m, _ in cmap) for s in ["standard"] + estimator_of(cmap)
                       if (m, s) in cmap]
    for m, sched in curves_in_order:
        pts = cmap[(m, sched)]
        row = {c: None for c in FIT_COLUMNS}
        row.update(methods=m, schedule=sched, x=x, n_points=len(pts))
        try:
            f = fits[(m, sched)] = fit.fit_curve(pts, x)
        except fit.FitError as e:
            row["note"] = f"not fitted: {e}"
            rows.append(row)
            continue
        row["_fit"] = f
        row.update(a=f.a, b=f.b, c=f.c, rmse_pp=f.rmse, max_abs_residual_pp=float(np.abs(f.residuals).max()),
                   residuals_pp=" ".join(f"{r:.3g}" for r in f.residuals))
        standard = fits.get((m, "standard"))
        span = fit.common_range(f, standard) if standard and sched != "standard" else None
        if span:
            row["range_lo"], row["range_hi"] = span
            row["area_vs_standard"] = fit.area_between(f, standard, *span)
            row["mean_fitted_gap_pp"] = row["area_vs_standard"] / np.log(span[1] / span[0])
        elif standard and sched != "standard":
            row["note"] = "no x range shared with the standard curve"
        rows.append(row)
    return rows


def dropped_budgets(cmap, min_epochs=0.0):
    """Budgets of a curve without a partner on the other: (methods, schedule, epochs, other schedule)."""
    out = []
    for estimator in estimator_of(cmap):
        for m in order_methods(m for m, s in cmap if s == estimator):
            std, est = cmap.get((m, "standard")), cmap[(m, estimator)]
            if std is None:
                continue
            for pts, other, sched, pick in ((est, std, estimator, 0), (std, est, "standard", 1)):
                matched = {id(p[pick]) for p in match(est, std, min_epochs)}
                out += [(m, sched, p.epochs, other[0].schedule) for p in pts
                        if id(p) not in matched and p.epochs >= min_epochs]
    return out


def tag(group, rows):
    """Rows with their group label set."""
    for r in rows:
        r["group"] = group
    return rows


def group_tables(cmap, min_epochs, x, runs=()):
    """Every table's rows for one group's curves (runs: the group's, for method_costs.csv)."""
    methods, estimators = order_methods(m for m, _ in cmap), estimator_of(cmap)
    comparisons = [compare_one(cmap, m, e, min_epochs, x) for m in methods
                   for e in ["cyclic"] + [e for e in estimators if e != "cyclic"]]
    gaps = [r for r in comparisons if r["estimator"] == "cyclic"]
    curve_axis = axis_columns(x)[0]
    tables = {
        "curves.csv": [dict(methods=p.methods, schedule=p.schedule, epochs=p.epochs, n=p.n, acc_mean=p.acc_mean,
                            acc_std=p.acc_std, time_mean=p.time_mean, acc_lo=p.acc_lo, acc_hi=p.acc_hi,
                            cost_mean=p.cost_mean, **dict(zip(curve_axis, (p.axis_time_mean, p.axis_cost_mean))))
                       for key in sorted(cmap) for p in cmap[key]],
        "gaps.csv": gaps,
        "estimators.csv": [r for r in comparisons if (r["methods"], r["estimator"]) in cmap],
        "points.csv": [p for r in gaps for p in r["_points"]],
        "improvement.csv": [r for m in methods if m != "baseline" for s in ["standard"] + estimators
                            for r in improvement_series(cmap, m, s, min_epochs)],
        "ranking.csv": [r for e in estimators for r in ranking_rows(cmap, e, min_epochs)],
        "fits.csv": fit_rows(cmap, x),
    }
    if x in axes.NEW_AXES:
        tables["method_costs.csv"] = method_cost_rows(runs, x)
    return tables


def method_cost_rows(runs, x):
    """method_costs.csv: per method set, the axis's cost of one training image (calibrated seconds or FLOPs) over
    its standard runs (its cyclic runs where it has none): their whole runs' axis cost over the images they
    trained; relative to the baseline's, with the interval of that ratio over the calibration's rounds (paired:
    each round's costs are one interleaved measurement); exact on the FLOPs axis."""
    rows, per_round = [], {}
    for m in order_methods(r.methods for r in runs):
        mine = ([r for r in runs if r.methods == m and r.curve == "standard"]
                or [r for r in runs if r.methods == m and r.curve == "cyclic"])
        if not mine:
            continue
        last = [r.rows[-1] for r in mine]
        images = sum(row["axis_run_steps"] * r.config["batch_size"] for r, row in zip(mine, last))
        per_round[m] = [sum(c) / images for c in zip(*(row["axis_rounds"][1] for row in last))]
        rows.append(dict(methods=m, per_image=sum(row["axis_cost"] for row in last) / images, runs=len(mine),
                         unit=axes.unit(x)))
    base = next((r for r in rows if r["methods"] == "baseline"), None)
    for row in rows if base else ():  # the point is the median of the rounds' ratios: the centre of its interval
        median, lo, hi, coverage = stats.median_ci([a / b for a, b in zip(per_round[row["methods"]],
                                                                          per_round["baseline"])])
        row.update(relative=median, relative_lo=lo, relative_hi=hi, coverage=coverage)
    return [{c: r.get(c) for c in METHOD_COST_COLUMNS} for r in rows]


TABLE_COLUMNS = {"curves.csv": CURVE_COLUMNS, "gaps.csv": GAP_COLUMNS, "estimators.csv": ESTIMATOR_COLUMNS,
                 "points.csv": POINT_COLUMNS, "improvement.csv": IMPROVEMENT_COLUMNS, "ranking.csv": RANKING_COLUMNS,
                 "fits.csv": FIT_COLUMNS}
# analysis.review's statistics (issue 45), after every column above: a p-value, Holm's verdict over the test's family
# and leave-one-seed-out robustness per test; the cost ratio paired by seed; Kendall's tau's CI; the fits' degrees of
# freedom and parameter CIs; stats_note: why one of them is empty. And two tables of their own.
GAP_REVIEW_COLUMNS = ["mean_gap_p", "mean_gap_resolved_holm", "mean_gap_robust", "mean_gap_robust_holm",
                      "delta_gap_vs_baseline_p", "delta_gap_vs_baseline_resolved_holm", "delta_gap_vs_baseline_robust",
                      "delta_gap_vs_baseline_robust_holm", "time_ratio_paired", "time_ratio_paired_lo",
                      "time_ratio_paired_hi", "time_ratio_paired_seeds", "stats_note"]
REVIEW_COLUMNS = {"gaps.csv": GAP_REVIEW_COLUMNS, "estimators.csv": GAP_REVIEW_COLUMNS,
                  "improvement.csv": ["improvement_p", "improvement_resolved_holm", "improvement_robust",
                                      "improvement_robust_holm", "stats_note"],
                  "ranking.csv": ["kendall_tau_lo", "kendall_tau_hi", "kendall_tau_seeds", "swap_standard_p",
                                  "swap_standard_resolved_holm", "swaps_standard_separates_holm",
                                  "swap_standard_robust", "swap_standard_robust_holm", "stats_note"],
                  "fits.csv": ["dof", "a_lo", "a_hi", "b_lo", "b_hi", "c_lo", "c_hi"]}
for _name, _extra in REVIEW_COLUMNS.items():
    TABLE_COLUMNS[_name].extend(_extra)
POWER_COLUMNS = ["comparison", "methods", "curve", "budget", "estimate_pp", "lo", "hi", "n_seeds", "sd_per_seed_pp",
                 "mde_pp", "detect_pp", "seeds_needed", "note", "group"]
PAIR_COLUMNS = ["estimator_a", "estimator_b", "methods", "n_seeds", "per_run_abs_gap_a", "per_run_abs_gap_b", "diff_pp",
                "diff_lo", "diff_hi", "resolved", "p", "resolved_holm", "robust", "robust_holm", "note", "group"]
TEST_COLUMNS = ["family", "curve", "methods", "budget", "estimate_pp", "lo", "hi", "n_seeds", "p", "resolved",
                "resolved_holm", "robust", "robust_holm", "family_tests", "note", "group"]
TABLE_COLUMNS.update({"tests.csv": TEST_COLUMNS, "power.csv": POWER_COLUMNS, "estimator_pairs.csv": PAIR_COLUMNS})


def table_columns(x):
    """TABLE_COLUMNS with the extra columns of --x calibrated or flops, and method_costs.csv on those axes."""
    curve_axis, gap_axis = axis_columns(x)
    out = dict(TABLE_COLUMNS, **{"curves.csv": CURVE_COLUMNS + curve_axis, "gaps.csv": GAP_COLUMNS + gap_axis,
                                 "estimators.csv": ESTIMATOR_COLUMNS + gap_axis})
    if x in axes.NEW_AXES:
        out["method_costs.csv"] = METHOD_COST_COLUMNS
    return out


def analyse_runs(runs, metric="max", min_epochs=0.0, x="time", only_complete_seeds=False, calibration=None,
                 study="RUNS_DIR", detect=None):
    """Curves per group and every table of `runs` (from analysis.runs.load_runs) as an Analysis; with
    only_complete_seeds, each method set's seeds that miss a run some other seed has are set aside
    (analysis.runs.complete_seeds) and listed in Analysis.left_out. x calibrated or flops: the runs' rows are
    given the axis's values first (analysis.axes.annotate; AxisError where a run cannot have them). detect: the
    difference (pp) power.csv plans seeds for (default analysis.review.DETECT)."""
    from analysis import review  # it builds on this module's functions
    if x in axes.NEW_AXES:
        axes.annotate(runs, x, calibration, study)
    groups, left_out = group_runs(runs), []
    if only_complete_seeds:
        for group, members in groups.items():
            groups[group], out = complete_seeds(members)
            left_out += [(group,) + o for o in out]
        kept = {id(r) for members in groups.values() for r in members}
        runs = [r for r in runs if id(r) in kept]
    curve_sets = {group: group_curves(members, metric) for group, members in groups.items()}
    tables = {name: (cols, []) for name, cols in table_columns(x).items()}
    dropped = []
    for group, cmap in curve_sets.items():
        for name, rows in group_tables(cmap, min_epochs, x, groups[group]).items():
            tables[name][1].extend(tag(group, rows))
        dropped += [(group,) + d for d in dropped_budgets(cmap, min_epochs)]
    for group, cmap in curve_sets.items():
        review.extend(tables, group, cmap, min_epochs, x, detect or review.DETECT)
    return Analysis(runs, groups, curve_sets, tables, dropped, left_out, x, calibration)


def analyse(args):
    """analyse_runs on the command line's runs; exits with one line when there is nothing to analyse."""
    pool = ("device_name",) if args.pool_hardware or args.x in axes.NEW_AXES else ()  # the point of the new axes
    try:
        runs = load_runs(args.runs, args.include_partial, pool=pool)
    except RunError as e:
        sys.exit(f"analysis: error: {e}")
    if not runs:
        sys.exit(f"analysis: error: no readable finished runs below {' '.join(args.runs)}")
    try:
        calibration = None  # the FLOPs axis reads one where it finds one: it counts older runs' FLOPs
        if args.x in axes.NEW_AXES:
            path = args.calibration or axes.find_calibration(args.runs, required=args.x == "calibrated")
            calibration = axes.read_calibration(path) if path else None
        return analyse_runs(runs, args.metric, args.min_epochs, args.x, args.complete_seeds, calibration,
                            args.runs[0], detect=args.detect)
    except axes.AxisError as e:  # before anything is written
        print(f"analysis: error: {e}", file=sys.stderr)
        sys.exit(2)


def fmt(v, spec=".2f"):
    """A table cell: '' for None, booleans as true/false, floats by `spec`."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    return format(v, spec) if isinstance(v, float) else str(v)


def write_tables(out, analysis):
    """Every table of `analysis` as DIR/<name>.csv; returns the paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, (columns, rows) in analysis.tables.items():
        paths.append(os.path.join(out, name))
        with open(paths[-1], "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(columns)
            for r in rows:
                w.writerow([fmt(r[c], ".10g") for c in columns])
    return paths


def ci_text(lo, hi, spec="+.2f"):
    """'[lo, hi]', or 'no CI' when undefined."""
    return "no CI" if lo is None else f"[{lo:{spec}}, {hi:{spec}}]"


def format_gap_table(rows, label="methods", x="time"):
    """The printed gap table: a line per row, the 95 % CI next to each gap, '*' where it excludes 0; the cost columns
    on the axis x (calibrated, flops: their own columns, the ratio's CI paired by seed)."""
    w = max([len(label)] + [len(r[label]) for r in rows])
    standard, cyclic, ratio = ("standard_time_s", "cyclic_time_s", "time_ratio") if x not in axes.NEW_AXES else \
        axes.COLUMNS[x][2:]
    names = ("std s", "cyc s") if x not in axes.NEW_AXES else {"calibrated": ("std cal s", "cyc cal s"),
                                                               "flops": ("std FLOPs", "cyc FLOPs")}[x]
    spec = ".3g" if x == "flops" else ".1f"
    head = (f"{label:<{w}} {'n':>3} {'seeds':>5} {'gap pp':>8} {'95 % CI':>16} {'max|gap|':>9} {'corr':>6} "
            f"{names[0]:>9} {names[1]:>9} {'ratio':>6} {'Eq.1':>6}" + (" ratio 95 % CI" if x in axes.NEW_AXES else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        ci = "" if r["mean_gap_pp"] is None else ci_text(r["mean_gap_lo"], r["mean_gap_hi"]) + (
            "*" if r["resolved"] else " ")
        lines.append(f"{r[label]:<{w}} {r['n_points']:>3} {fmt(r['n_seeds']):>5} {fmt(r['mean_gap_pp'], '+.2f'):>8} "
                     f"{ci:>16} {fmt(r['max_abs_gap_pp']):>9} {fmt(r['improvement_corr']):>6} "
                     f"{fmt(r[standard], spec):>9} {fmt(r[cyclic], spec):>9} "
                     f"{fmt(r[ratio]):>6} {fmt(r['eq1_ratio']):>6}"
                     + (f" {ci_text(r[ratio + '_lo'], r[ratio + '_hi'], '.3f')}" if x in axes.NEW_AXES else "")
                     + (f"  ({r['note']})" if r["note"] else ""))
    return "\n".join(lines)


def add_common_args(p):
    p.add_argument("runs", nargs="+", help="run directories or folders holding them")
    p.add_argument("--metric", choices=("max", "final"), default="max",
                   help="max: best val_acc1 in the run (standard) or cycle (cyclic); final: the point's own row")
    p.add_argument("--min-epochs", type=float, default=0.0, help="ignore budgets below this many epochs")
    p.add_argument("--include-partial", action="store_true", help="use runs without 'done' too")
    p.add_argument("--x", choices=axes.AXES, default="time",
                   help="x of the curves and their fits: time (train_time_s as measured), epochs, calibrated (steps x "
                        "a device's step cost: calibration.json) or flops (docs/time-axes.md)")
    p.add_argument("--calibration", metavar="FILE", help="--x calibrated: the calibration.json to use (default: the "
                                                         "one at or above the folders analysed)")
    p.add_argument("--pool-hardware", action="store_true",
                   help="average seeds that ran on different GPU or CPU models (e.g. a study over several sessions): "
                        "accuracies pool, times mix speeds (the output says so); default: each model its own group")
    p.add_argument("--complete-seeds", action="store_true",
                   help="per method set, use only the seeds that have every standard budget and every estimator "
                        "run of 2+ seeds (an unfinished sweep then compares seed-paired curves over the same seeds)")
    p.add_argument("--detect", type=positive_pp, metavar="PP",
                   help="power.csv: the seeds each comparison needs to resolve a true difference of PP percentage "
                        "points (95 %% CI, 80 %% power; default 0.3, the paper's)")


def positive_pp(text):
    """--detect's value: a positive, finite number of percentage points."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of percentage points (e.g. 0.3)")
    return value


def left_out_lines(analysis):
    """One line per seed that --complete-seeds set aside, naming the runs it lacks."""
    return [f"left out (--complete-seeds): {(group + ' ') if group else ''}{m} seed {seed}, which lacks "
            + ", ".join(f"{curve} {epochs:g}" for curve, epochs in missing)
            for group, m, seed, missing in analysis.left_out]


def group_line(analysis):
    """One line naming the groups when runs differ in result-defining options, else None."""
    if len(analysis.curves) < 2:
        return None
    return (f"{len(analysis.curves)} groups of runs differ in result-defining options and are compared apart: "
            + "; ".join(analysis.curves))


def axis_lines(analysis):
    """What the cost columns are on analysis.x, where it is a new axis (None otherwise)."""
    if analysis.x == "calibrated":
        return axes.calibration_lines(analysis.calibration, analysis.runs)
    if analysis.x == "flops":
        return ["FLOPs: each run's training FLOPs (train_flops, counted by train.py: forward and backward per training "
                "image x images, SAM's second pass included), independent of the hardware"]
    return []


def hardware_lines(analysis):
    """A line per group whose runs ran on more than one GPU or CPU model (config.json's device_name; with
    --pool-hardware, else they are groups of their own): their accuracies are pooled, but their times mix speeds."""
    lines = []
    for label, members in analysis.groups.items():
        names = sorted({n for r in members for n in r.config.get("device_names") or [r.config.get("device_name")]}
                       - {None})
        if len(names) > 1 and analysis.x in axes.NEW_AXES:
            lines.append(f"{label or 'the runs'} ran on {len(names)} kinds of hardware ({'; '.join(names)}): pooled, "
                         f"since the {analysis.x} axis does not depend on it; the wall-clock columns (time_mean, "
                         f"standard_time_s, time_ratio) mix their speeds")
        elif len(names) > 1:
            lines.append(f"{label or 'the runs'} ran on {len(names)} kinds of hardware ({'; '.join(names)}): "
                         f"accuracies are pooled over them, but times (train_time_s, time ratios, the time axis) mix "
                         f"their speeds")
    return lines


def compile_lines(analysis):
    """A line per method set and curve whose runs differ in compile and in no other result-defining option (seeds
    each given --compile auto, which chose differently: a standalone run measures for itself): its compiled and its
    eager seeds are groups apart, not averaged together (their results agree to float tolerance only)."""
    split = defaultdict(lambda: defaultdict(list))
    for r in analysis.runs:
        family = tuple(kv for kv in r.family if kv[0] != "compile")
        split[(family, r.shape, r.methods, r.curve)][bool(r.option("compile"))].append(r.path)
    return [f"{m} {curve}: runs differ only in compile (compiled: {', '.join(ways[True])}; eager: "
            f"{', '.join(ways[False])}), so their seeds are groups apart, not averaged; give every seed --compile on "
            f"or off, or run them with launch.sh sweep (one choice per method set)"
            for (_, _, m, curve), ways in split.items() if len(ways) > 1]


SHARED_SPEED = 0.8  # of a run's own median images/s: well below a quiet machine's drift (0.91-1.05 on our VM)


def speed_lines(analysis):
    """A line per run one of whose evaluation segments trained below SHARED_SPEED of the run's median images/s
    (metrics.csv's images_per_s, per segment): something else likely shared the machine then, so its times are
    inflated, while its accuracies are not."""
    lines = []
    for run in analysis.runs:
        speeds = []
        for row in run.rows:
            try:
                speeds.append((float(row.get("images_per_s") or "nan"), row["epoch"]))
            except ValueError:
                pass
        speeds = [(v, e) for v, e in speeds if v == v and v > 0]
        if len(speeds) < 2:
            continue
        median = float(np.median([v for v, _ in speeds]))
        slow = [(v, e) for v, e in speeds if v < SHARED_SPEED * median]
        if slow:
            lines.append(f"{run.path}: its segment(s) ending at epoch {', '.join(f'{e:g}' for _, e in slow)} trained "
                         f"at {min(v for v, _ in slow) / median:.2f} of the run's median images/s (another job on the "
                         f"machine, or a first segment's compilation): its times are inflated, its accuracies not; "
                         f"rerun it for time comparisons")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="Diff the standard tradeoff curve against one-run estimators' curves.")
    add_common_args(p)
    p.add_argument("--out", default="out/compare", help="folder for the CSV tables")
    args = p.parse_args(argv)
    analysis = analyse(args)
    paths = write_tables(args.out, analysis)
    for line in left_out_lines(analysis):
        print(line)
    print(f"{len(analysis.runs)} runs, metric {args.metric}; gap = cyclic - standard (percentage points), "
          f"95 % CI: {stats.CI_METHOD}; * = CI excludes 0")
    for line in axis_lines(analysis):
        print(line)
    if group_line(analysis):
        print(group_line(analysis))
    for line in hardware_lines(analysis) + compile_lines(analysis) + speed_lines(analysis):
        print(f"warning: {line}")
    for group in analysis.curves:
        print(f"\n[{group}]" if group else "")
        print(format_gap_table([r for r in analysis.rows("gaps.csv") if r["group"] == group], x=args.x))
        others = [r for r in analysis.rows("estimators.csv") if r["group"] == group and r["estimator"] != "cyclic"]
        for r in others:
            r["estimator / methods"] = f"{r['estimator']} / {r['methods']}"
        if others:
            print("\nother one-run estimators against standard (" + (
                "cyclic s = the estimator's curve_cost_s)" if args.x not in axes.NEW_AXES else
                f"cyc = the estimator's whole run on the {args.x} axis)"))
            print(format_gap_table(others, "estimator / methods", args.x))
    for group, m, sched, e, other in analysis.dropped:
        print(f"unmatched budget: {(group + ' ') if group else ''}{m} {sched} at {e:g} epochs (no {other} point "
              f"within {MATCH_TOLERANCE:.0%})")
    print(f"wrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
