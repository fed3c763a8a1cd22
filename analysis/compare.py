"""Diff standard against cyclic tradeoff curves.

    python -m analysis.compare RUN_DIR_OR_PARENT... [--out DIR] [--metric max|final] [--min-epochs E]

Prints the gap table and writes DIR/curves.csv and DIR/gaps.csv (columns fixed by the run format).
"""
import argparse
import csv
import os
import sys

from analysis.runs import RunError, curves, load_runs, match, pearson

CURVE_COLUMNS = ["methods", "schedule", "epochs", "n", "acc_mean", "acc_std", "time_mean"]
GAP_COLUMNS = ["methods", "n_points", "mean_gap_pp", "max_abs_gap_pp", "improvement_corr", "standard_time_s",
               "cyclic_time_s", "time_ratio", "eq1_ratio", "budgets", "note"]


def gap_table(curve_map, min_epochs=0.0):
    """One row per method set: cyclic minus standard over matched budgets, and the time to build each curve."""
    methods_sets = sorted({m for m, _ in curve_map}, key=lambda m: (m != "baseline", m.count("+"), m))
    base_std, base_cyc = curve_map.get(("baseline", "standard"), []), curve_map.get(("baseline", "cyclic"), [])
    rows = []
    for m in methods_sets:
        std, cyc = curve_map.get((m, "standard"), []), curve_map.get((m, "cyclic"), [])
        row = {c: None for c in GAP_COLUMNS}
        row["methods"] = m
        if not std or not cyc:
            row["n_points"] = 0
            row["note"] = f"no {'standard' if not std else 'cyclic'} runs"
            rows.append(row)
            continue
        pairs = match(cyc, std, min_epochs)  # (cyclic, standard)
        row["n_points"] = len(pairs)
        if not pairs:
            row["note"] = "no budgets match within 5 %"
            rows.append(row)
            continue
        gaps = [c.acc_mean - s.acc_mean for c, s in pairs]
        row["mean_gap_pp"] = sum(gaps) / len(gaps)
        row["max_abs_gap_pp"] = max(abs(g) for g in gaps)
        row["standard_time_s"] = sum(s.time_mean for _, s in pairs)
        row["cyclic_time_s"] = max(pairs, key=lambda p: p[0].epochs)[0].time_mean
        row["time_ratio"] = row["standard_time_s"] / row["cyclic_time_s"] if row["cyclic_time_s"] else None
        row["eq1_ratio"] = sum(s.epochs for _, s in pairs) / max(s.epochs for _, s in pairs)
        row["budgets"] = " ".join(f"{c.epochs:g}" for c, _ in pairs)
        if m != "baseline":
            xs, ys = [], []
            for c, s in pairs:  # (method - baseline) at the budgets where the baseline has both curves too
                bc = match([c], base_cyc)
                bs = match([s], base_std)
                if bc and bs:
                    xs.append(s.acc_mean - bs[0][1].acc_mean)
                    ys.append(c.acc_mean - bc[0][1].acc_mean)
            row["improvement_corr"] = pearson(xs, ys)
            if row["improvement_corr"] is None:
                row["note"] = "correlation needs 2+ budgets with baseline curves and non-constant improvements"
        rows.append(row)
    return rows


def dropped_budgets(curve_map, min_epochs=0.0):
    """Budgets of one curve that found no partner in the other: (methods, schedule, epochs)."""
    out = []
    for (m, sched), pts in curve_map.items():
        other = curve_map.get((m, "standard" if sched == "cyclic" else "cyclic"))
        if sched not in ("standard", "cyclic") or other is None:
            continue
        matched = {id(a) for a, _ in match(pts, other, min_epochs)}
        out += [(m, sched, p.epochs) for p in pts if id(p) not in matched and p.epochs >= min_epochs]
    return sorted(out)


def fmt(v, spec=".2f"):
    return "" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([fmt(r[c], ".10g") for c in columns])


def curve_rows(curve_map):
    return [dict(methods=p.methods, schedule=p.schedule, epochs=p.epochs, n=p.n, acc_mean=p.acc_mean,
                 acc_std=p.acc_std, time_mean=p.time_mean)
            for key in sorted(curve_map) for p in curve_map[key]]


def format_gap_table(rows):
    w = max([len("methods")] + [len(r["methods"]) for r in rows])
    head = f"{'methods':<{w}} {'n':>3} {'gap pp':>8} {'max|gap|':>9} {'corr':>6} {'std s':>9} {'cyc s':>9} {'ratio':>6} {'Eq.1':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['methods']:<{w}} {r['n_points']:>3} {fmt(r['mean_gap_pp'], '+.2f'):>8} "
                     f"{fmt(r['max_abs_gap_pp']):>9} {fmt(r['improvement_corr']):>6} {fmt(r['standard_time_s'], '.1f'):>9} "
                     f"{fmt(r['cyclic_time_s'], '.1f'):>9} {fmt(r['time_ratio']):>6} {fmt(r['eq1_ratio']):>6}"
                     + (f"  ({r['note']})" if r["note"] else ""))
    return "\n".join(lines)


def add_common_args(p):
    p.add_argument("runs", nargs="+", help="run directories or folders holding them")
    p.add_argument("--metric", choices=("max", "final"), default="max",
                   help="max: best val_acc1 in the run (standard) or cycle (cyclic); final: the point's own row")
    p.add_argument("--min-epochs", type=float, default=0.0, help="ignore budgets below this many epochs")
    p.add_argument("--include-partial", action="store_true", help="use runs without 'done' too")


def analyse(args):
    """Load runs and build curves, gaps and dropped budgets; exits with a message when there is nothing."""
    try:
        runs = load_runs(args.runs, args.include_partial)
    except RunError as e:
        sys.exit(f"analysis: error: {e}")
    if not runs:
        sys.exit(f"analysis: error: no readable finished runs below {' '.join(args.runs)}")
    cmap = curves(runs, args.metric)
    return runs, cmap, gap_table(cmap, args.min_epochs), dropped_budgets(cmap, args.min_epochs)


def main(argv=None):
    p = argparse.ArgumentParser(description="Diff standard against cyclic tradeoff curves.")
    add_common_args(p)
    p.add_argument("--out", default="out/compare", help="folder for curves.csv and gaps.csv")
    args = p.parse_args(argv)
    runs, cmap, gaps, dropped = analyse(args)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "curves.csv"), CURVE_COLUMNS, curve_rows(cmap))
    write_csv(os.path.join(args.out, "gaps.csv"), GAP_COLUMNS, gaps)
    print(f"{len(runs)} runs, metric {args.metric}; gap = cyclic - standard (percentage points)")
    print(format_gap_table(gaps))
    for m, sched, e in dropped:
        print(f"unmatched budget: {m} {sched} at {e:g} epochs")
    print(f"wrote {os.path.join(args.out, 'curves.csv')} and {os.path.join(args.out, 'gaps.csv')}")


if __name__ == "__main__":
    main()
