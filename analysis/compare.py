"""Diff the standard tradeoff curve against each one-run estimator's, every number with a 95 % CI over seeds.

    python -m analysis.compare RUN_DIR_OR_PARENT... [--out DIR] [--metric max|final] [--min-epochs E]
                               [--x time|epochs|calibrated|flops] [--calibration FILE] [--complete-seeds]

Prints the gap table and writes to DIR: curves.csv, gaps.csv (cyclic vs standard), estimators.csv (every one-run
schedule vs standard), points.csv (cyclic vs standard per budget), improvement.csv, ranking.csv and fits.csv.
Runs that differ in a result-defining option (analysis.runs.RESULT_KEYS) form separate groups, compared apart.
--x calibrated and --x flops (analysis.axes) add columns of their own (docs/run-format.md) and method_costs.csv;
on them the hardware's name does not split groups. The tables' rows are analysis/tables.py's, with analysis/review.py's
statistics added.
"""
import argparse
import csv
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from analysis import axes, review, stats
from analysis.runs import MATCH_TOLERANCE, RunError, complete_seeds, group_curves, group_runs, load_runs
from analysis.tables import dropped_budgets, group_tables, table_columns, tag


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


def analyse_runs(runs, metric="max", min_epochs=0.0, x="time", only_complete_seeds=False, calibration=None,
                 study="RUNS_DIR", detect=None):
    """Curves per group and every table of `runs` (from analysis.runs.load_runs) as an Analysis; with
    only_complete_seeds, each method set's seeds that miss a run some other seed has are set aside
    (analysis.runs.complete_seeds) and listed in Analysis.left_out. x calibrated or flops: the runs' rows are
    given the axis's values first (analysis.axes.annotate; AxisError where a run cannot have them). detect: the
    difference (pp) power.csv plans seeds for (default analysis.review.DETECT)."""
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
