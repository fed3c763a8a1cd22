"""The paper's figures and a report.md for a folder of runs.

    python -m analysis.report RUNS... --out DIR [--x time|epochs] [--metric max|final]

Writes DIR/curves.csv, DIR/gaps.csv, each figure as PNG and PDF, and DIR/report.md linking them.
"""
import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

import schedules  # noqa: E402
from analysis.compare import (CURVE_COLUMNS, GAP_COLUMNS, add_common_args, analyse, curve_rows, fmt,  # noqa: E402
                              write_csv)
from analysis.runs import match  # noqa: E402

STYLE = {"standard": dict(ls="-", marker="o"), "cyclic": dict(ls="--", marker="s"), "constant": dict(ls=":", marker="^")}


def colours(methods_sets):
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods_sets)}


def save(fig, out, name):
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(os.path.join(out, f"{name}.{ext}"), dpi=130)
    plt.close(fig)
    return f"{name}.png"


def xval(p, x):
    return p.time_mean if x == "time" else p.epochs


def xlabel(x):
    return "training time (s, log scale)" if x == "time" else "training epochs (log scale)"


def finish_axes(ax, x_label, y_label, title, legend_loc="lower right", log_x=True):
    """The axis dressing every curve figure shares."""
    if log_x:  # ticks at 1, 2, 5 x 10^k written as plain numbers: matplotlib's minor labels overlap
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    if y_label:
        ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc=legend_loc)
    ax.grid(alpha=0.3)


def plot_curve(ax, pts, x, colour, schedule, label):
    ax.errorbar([xval(p, x) for p in pts], [p.acc_mean for p in pts], yerr=[p.acc_std for p in pts], color=colour,
                label=label, capsize=3, **STYLE[schedule])


def fig_schedules(runs, out):
    """Fig. 1A: LR (top) and validation accuracy (bottom) against epoch, one standard and one cyclic run."""
    pick = {}
    for sched in ("standard", "cyclic"):
        cands = [r for r in runs if r.schedule == sched]
        base = [r for r in cands if r.methods == "baseline"] or cands
        if base:
            pick[sched] = max(base, key=lambda r: r.rows[-1]["epoch"])
    if not pick:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for sched, run in pick.items():
        c = run.config
        colour = "tab:blue" if sched == "standard" else "tab:orange"
        spe = c.get("steps_per_epoch")
        if spe:  # the LR at every step, from the run's own schedule
            plan = schedules.make_plan(sched, c["epochs"], c["warmup_epochs"], c["t0"], c["t_mult"], spe)
            top.plot([s / spe for s in range(plan.total_steps)],
                     [schedules.lr_at(plan, s, c["lr"], c.get("eta_min", 0.0)) for s in range(plan.total_steps)],
                     color=colour, label=f"{sched} ({run.methods})")
        else:
            top.plot([r["epoch"] for r in run.rows], [r["lr"] for r in run.rows], color=colour, label=sched)
        bottom.plot([r["epoch"] for r in run.rows], [r["val_acc1"] for r in run.rows], color=colour, marker=".",
                    **{k: v for k, v in STYLE[sched].items() if k == "ls"}, label=sched)
        ends = [r for r in run.rows if r["cycle_end"] == 1]
        bottom.scatter([r["epoch"] for r in ends], [r["val_acc1"] for r in ends], color=colour, s=50, zorder=3)
    top.set_ylabel("learning rate")
    top.legend(loc="upper right", fontsize=8)
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("validation top-1 (%)")
    bottom.legend(loc="lower right", fontsize=8)
    top.set_title("Schedules and accuracy during training (large dots: cycle ends)")
    return save(fig, out, "fig1_schedules")


def fig_total_time(gaps, out):
    """Fig. 1B / 3D: time to build each curve, standard vs cyclic, with Eq. 1's prediction."""
    rows = [g for g in gaps if g["standard_time_s"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4))
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [g["standard_time_s"] for g in rows], 0.4, label="standard (sum of runs)")
    ax.bar([i + 0.2 for i in xs], [g["cyclic_time_s"] for g in rows], 0.4, label="cyclic (one run)")
    ax.scatter([i - 0.2 for i in xs], [g["cyclic_time_s"] * g["eq1_ratio"] for g in rows], marker="_", s=600,
               color="k", zorder=3, label="Eq. 1: cyclic time x epoch ratio")
    for i, g in enumerate(rows):
        ax.annotate(f"{g['time_ratio']:.2f}x", (i - 0.2, g["standard_time_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [g["methods"] for g in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("total training time (s)")
    ax.set_title("Time to build a tradeoff curve")
    ax.legend(fontsize=8)
    return save(fig, out, "fig2_total_time")


def fig_tradeoff(cmap, methods_sets, col, x, out):
    """Fig. 1C / 2: accuracy against time, standard solid, cyclic dashed; a panel per method set plus one with all."""
    panels = [("all", methods_sets)] + [(m, ["baseline", m]) for m in methods_sets if m != "baseline"]
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (title, sets) in zip(axes.flat, panels):
        for m in dict.fromkeys(sets):
            for sched in ("standard", "cyclic"):
                pts = cmap.get((m, sched))
                if pts:  # the all-sets panel names each set once: colour is the set, line style the schedule
                    label = f"{m} {sched}" if title != "all" else (m if sched == "standard" else "_nolegend_")
                    plot_curve(ax, pts, x, col[m], sched, label)
        for p in cmap.get(("baseline", "cyclic"), []) if title == "all" else []:
            ax.annotate(f"{p.epochs:g} ep", (xval(p, x), p.acc_mean), fontsize=7, xytext=(3, -10),
                        textcoords="offset points")
        finish_axes(ax, xlabel(x), "validation top-1 (%)",
                    "all (standard solid, cyclic dashed)" if title == "all" else f"{title} vs baseline")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save(fig, out, "fig3_tradeoff")


def improvement(cmap, m, sched):
    """(epochs, method - baseline) at the budgets both curves have."""
    pairs = match(cmap.get((m, sched), []), cmap.get(("baseline", sched), []))
    return [(a.epochs, a.acc_mean - b.acc_mean) for a, b in pairs]


def fig_improvement(cmap, methods_sets, col, out):
    """Fig. 3A-C: improvement over the baseline at each budget, standard solid, cyclic dashed."""
    others = [m for m in methods_sets if m != "baseline"]
    if not others or ("baseline", "standard") not in cmap and ("baseline", "cyclic") not in cmap:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in others:
        for sched in ("standard", "cyclic"):
            pts = improvement(cmap, m, sched)
            if pts:
                ax.plot([e for e, _ in pts], [d for _, d in pts], color=col[m], label=f"{m} {sched}", **STYLE[sched])
    ax.axhline(0, color="k", lw=0.8)
    finish_axes(ax, xlabel("epochs"), "accuracy - baseline (pp)",
                "Improvement over the baseline (standard solid, cyclic dashed)", legend_loc="best")
    return save(fig, out, "fig4_improvement")


def fig_constant(cmap, methods_sets, col, x, out):
    """Fig. S1: constant-period cyclic runs against the standard curve, when there are any."""
    sets = [m for m in methods_sets if (m, "constant") in cmap]
    if not sets:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sets:
        for sched in ("standard", "cyclic", "constant"):
            if (m, sched) in cmap:
                plot_curve(ax, cmap[(m, sched)], x, col[m], sched, f"{m} {sched}")
    finish_axes(ax, xlabel(x), "validation top-1 (%)", "Constant-period cycles against the standard curve")
    return save(fig, out, "fig5_constant")


def fig_ordering(cmap, methods_sets, col, x, out):
    """Fig. S2: the method sets' ordering, standard curves in one panel and cyclic in the other."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, sched in zip(axes, ("standard", "cyclic")):
        for m in methods_sets:
            if (m, sched) in cmap:
                plot_curve(ax, cmap[(m, sched)], x, col[m], sched, m)
        finish_axes(ax, xlabel(x), None, f"{sched} curves")
    axes[0].set_ylabel("validation top-1 (%)")
    return save(fig, out, "fig6_ordering")


def markdown_table(columns, rows, specs):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c], specs.get(c, ".2f")) for c in columns) + " |")
    return "\n".join(lines)


def pooled_time_line(gaps):
    """Per-set time ratios carry the run-to-run timing noise; pooled over all sets most of it averages out."""
    timed = [g for g in gaps if g["time_ratio"] is not None and g["eq1_ratio"] is not None]
    if len(timed) < 2:
        return []
    standard, cyclic = sum(g["standard_time_s"] for g in timed), sum(g["cyclic_time_s"] for g in timed)
    predicted = sum(g["cyclic_time_s"] * g["eq1_ratio"] for g in timed) / cyclic
    return [f"All {len(timed)} method sets pooled: standard {standard:.1f} s, cyclic {cyclic:.1f} s, ratio "
            f"{standard / cyclic:.3f} against Eq. 1's {predicted:.3f} ({100 * (standard / cyclic / predicted - 1):+.1f} %).",
            ""]


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the paper's figures and write report.md for a folder of runs.")
    add_common_args(p)
    p.add_argument("--out", required=True, help="folder for the figures, CSVs and report.md")
    p.add_argument("--x", choices=("time", "epochs"), default="time", help="x axis of the tradeoff curves")
    args = p.parse_args(argv)
    runs, cmap, gaps, dropped = analyse(args)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "curves.csv"), CURVE_COLUMNS, curve_rows(cmap))
    write_csv(os.path.join(args.out, "gaps.csv"), GAP_COLUMNS, gaps)
    methods_sets = sorted({m for m, _ in cmap}, key=lambda m: (m != "baseline", m.count("+"), m))
    col = colours(methods_sets)
    figures = [
        ("Schedules and accuracy during training (Fig. 1A)", fig_schedules(runs, args.out)),
        ("Time to build each curve (Fig. 1B / 3D)", fig_total_time(gaps, args.out)),
        ("Tradeoff curves (Fig. 1C, 2)", fig_tradeoff(cmap, methods_sets, col, args.x, args.out)),
        ("Improvement over the baseline (Fig. 3A-C)", fig_improvement(cmap, methods_sets, col, args.out)),
        ("Constant-period cycles (Fig. S1)", fig_constant(cmap, methods_sets, col, args.x, args.out)),
        ("Ordering of method sets (Fig. S2)", fig_ordering(cmap, methods_sets, col, args.x, args.out)),
    ]
    gap_cols = ["methods", "n_points", "mean_gap_pp", "max_abs_gap_pp", "improvement_corr", "budgets", "note"]
    time_cols = ["methods", "standard_time_s", "cyclic_time_s", "time_ratio", "eq1_ratio"]
    specs = {"mean_gap_pp": "+.2f", "standard_time_s": ".1f", "cyclic_time_s": ".1f"}
    md = ["# Tradeoff-curve report", "",
          f"{len(runs)} runs from {', '.join(args.runs)}; accuracy metric `{args.metric}`; gap = cyclic - standard, "
          f"percentage points, over budgets matched within 5 %.", "", "## Gaps", "", markdown_table(gap_cols, gaps, specs),
          "", "## Time to build each curve", "",
          "Standard: sum of the mean training time of the standard runs at the matched budgets. Cyclic: the cyclic run's "
          "training time at the largest matched budget. Eq. 1: the epoch ratio the paper predicts for those budgets.",
          "", markdown_table(time_cols, [g for g in gaps if g["standard_time_s"] is not None], specs), ""]
    md += pooled_time_line(gaps)
    if dropped:
        md += ["## Budgets left unmatched", ""] + [f"- {m} {s} at {e:g} epochs" for m, s, e in dropped] + [""]
    md += ["## Figures", ""]
    for title, name in figures:
        md += [f"### {title}", "", f"![{title}]({name})" if name else "(no runs of the kind this figure needs)", ""]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.join(args.out, 'report.md')} with {sum(1 for _, n in figures if n)} figures")


if __name__ == "__main__":
    main()
