"""The paper's figures and a report.md for a folder of runs, every gap with its 95 % CI over seeds.

    python -m analysis.report RUNS... --out DIR [--x time|epochs|calibrated|flops] [--metric max|final]

Writes every table of analysis.compare, each figure as PNG and PDF, and DIR/report.md linking them. When the runs
form several groups (they differ in a result-defining option), each group gets its own figures, named with _gN.
"""
import argparse
import math
import os
import shlex
import sys
from dataclasses import replace
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

import schedules  # noqa: E402
from analysis import axes, review, stats  # noqa: E402
from analysis.compare import (add_common_args, analyse, axis_lines, ci_text, compile_lines, fmt,  # noqa: E402
                              group_line, hardware_lines, left_out_lines, speed_lines, write_tables)
from analysis.runs import MATCH_TOLERANCE, SCHEDULE_KEYS, RunError, order_methods, read_run  # noqa: E402
from analysis.tables import improvement_series, nonnegative  # noqa: E402

STYLE = {"standard": dict(ls="-", marker="o"), "cyclic": dict(ls="--", marker="s"),
         "constant": dict(ls=":", marker="^"), "cyclic-decay": dict(ls="-.", marker="D"),
         "wsd": dict(ls=(0, (5, 1, 1, 1)), marker="v"), "schedule-free": dict(ls=(0, (1, 2)), marker="P")}
CI_NOTE = "bars and bands: 95 % CI over seeds (none where a point has one seed)"


def style(schedule):
    """Line style and marker of a schedule's curves; unknown schedules get a fallback."""
    return STYLE.get(schedule.split(" (")[0], dict(ls=(0, (3, 1)), marker="x"))


def colours(methods_sets):
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods_sets)}


FIGURES = {"write": True}  # --no-figures: report.md and the tables only (the docs test regenerates committed reports)


def save(fig, out, name):
    """Write fig as DIR/name.png and .pdf (unless --no-figures); returns the PNG's file name."""
    if FIGURES["write"]:
        for ext in ("png", "pdf"):
            fig.savefig(os.path.join(out, f"{name}.{ext}"), dpi=130, bbox_inches="tight")
    plt.close(fig)
    return f"{name}.png"


def xlabel(x, calibration=None):
    return axes.label(x, calibration)


def cost_columns(x):
    """gaps.csv's (standard, estimator, ratio) columns of the cost on axis x: wall-clock time on time and epochs."""
    return axes.COLUMNS[x][2:] if x in axes.NEW_AXES else ("standard_time_s", "cyclic_time_s", "time_ratio")


def cost_unit(x, calibration=None):
    """How report.md and the figures name the cost on axis x."""
    return {"calibrated": f"calibrated s on {calibration.device_name if calibration else '?'}",
            "flops": "training FLOPs"}.get(x, "training time (s)")


def finish_axes(ax, x_label, y_label, title, legend_loc="lower right", log_x=True):
    """The axis dressing every curve figure shares; legend_loc None leaves the legend to the caller."""
    if log_x:  # ticks at 1, 2, 5 x 10^k written as plain numbers: matplotlib's minor labels overlap
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    if y_label:
        ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    if legend_loc and ax.get_legend_handles_labels()[0]:  # an empty panel gets no empty legend
        ax.legend(fontsize=7, loc=legend_loc)
    ax.grid(alpha=0.3)


def outside_legend(ax):
    """The legend right of the axes, where it hides no data however many curves there are."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))


def yerr(means, los, his):
    """Asymmetric error bars from CIs; zero length where a CI is missing."""
    return np.array([[m - lo if lo is not None else 0.0 for m, lo in zip(means, los)],
                     [hi - m if hi is not None else 0.0 for m, hi in zip(means, his)]])


def plot_curve(ax, pts, x, colour, schedule, label):
    """A tradeoff curve with 95 % CI bars over seeds."""
    means = [p.acc_mean for p in pts]
    ax.errorbar([p.x(x) for p in pts], means, yerr=yerr(means, [p.acc_lo for p in pts], [p.acc_hi for p in pts]),
                color=colour, label=label, capsize=3, **style(schedule))


def schedule_of(run):
    """The run's schedule rebuilt from its config, or None where the config cannot (keys missing, or values that
    make no schedule, such as t_mult 2.5): the figure then draws the LR logged in metrics.csv."""
    c = run.config
    if not all(k in c for k in SCHEDULE_KEYS):
        return None
    # a standard run records its own cosine (t0 = epochs - warmup), but its steps come from the cyclic shape whose
    # budget it ends on (family_t0, family_t_mult), as train.py planned it
    t0, t_mult = c.get("family_t0", c["t0"]), c.get("family_t_mult", c["t_mult"])
    if run.schedule == "wsd" and c.get("cooldown_version") != schedules.COOLDOWN_VERSION:
        return None  # an older cooldown formula
    try:
        plan = schedules.make_plan(run.schedule, c["epochs"], c["warmup_epochs"], t0, t_mult, c["steps_per_epoch"],
                                   c.get("cycle_decay", 1.0), c.get("cooldown_frac", 0.2),
                                   c.get("cooldown_shape", "1-sqrt"))
    except (ValueError, TypeError, ZeroDivisionError):
        return None
    if run.schedule == "schedule-free" and c.get("sf_warmup_epochs") is not None:  # its own warmup, as train.py
        plan = replace(plan, warmup_steps=round(c["sf_warmup_epochs"] * c["steps_per_epoch"]))
    # the schedule the run took: its recorded length (an unfinished run's), else where its last row is
    return plan if plan.total_steps == c.get("total_steps", run.rows[-1]["step"]) else None


def peak_lr(run):
    """The LR the schedule's closed form scales: schedule-free's own (sf_lr) or --lr."""
    if run.schedule == "schedule-free" and run.config.get("sf_lr"):
        return run.config["sf_lr"]
    return run.config["lr"]


def fig_run(run, out, name):
    """One run as a user first looks at it: the LR at every optimizer step, and validation accuracy and the
    losses at every row, against steps and against training time (large dots: the curve points)."""
    c, rows = run.config, run.rows
    fig, ((lr_ax, acc_ax), (loss_ax, time_ax)) = plt.subplots(2, 2, figsize=(11, 7), layout="constrained")
    plan = schedule_of(run)
    if plan is not None:  # every step from the closed form; a wsd branch drawn from where it leaves the trunk
        lr = lambda run_step: schedules.lr_at(plan, run_step, peak_lr(run), c.get("eta_min", 0.0))
        trunk = []  # x: optimizer step 1, 2, ... as metrics.csv's step counts them
        for seg in plan.segments():
            pts = [(s + 1, lr(seg.run_start + s - seg.start)) for s in range(seg.start, seg.end)]
            if seg.kind == "trunk":
                trunk += pts
            else:
                lr_ax.plot(*zip(*(trunk[-1:] + pts)), color="tab:orange", lw=1)
        lr_ax.plot(*zip(*trunk), color="tab:blue", lw=1)
    else:
        lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:blue", marker=".")
    finish_axes(lr_ax, "optimizer step", "learning rate", f"{run.schedule}: learning rate", log_x=False)
    ends = [r for r in rows if r["cycle_end"] == 1]
    path = [r for r in rows if r["cycle_end"] != 1] if run.schedule == "wsd" else rows  # wsd: the trunk's rows
    for ax, x in ((acc_ax, "step"), (time_ax, "train_time_s")):
        ax.plot([r[x] for r in path], [r["val_acc1"] for r in path], color="tab:blue", marker=".", lw=1)
        ax.scatter([r[x] for r in ends], [r["val_acc1"] for r in ends], color="tab:red", s=40, zorder=3,
                   label="curve points")
        finish_axes(ax, "optimizer step" if x == "step" else "training time (s)", "validation top-1 (%)",
                    f"accuracy against {'steps' if x == 'step' else 'training time'}", log_x=False)
    for col, colour in (("train_loss", "tab:green"), ("train_loss_epoch", "tab:olive"), ("val_loss", "tab:purple")):
        pts = [(r["step"], float(r[col])) for r in path if r.get(col) not in (None, "")]
        loss_ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, marker=".", lw=1, label=col)
    finish_axes(loss_ax, "optimizer step", "loss", "losses (train_loss: since the last row; _epoch: the last epoch)",
                log_x=False)
    fig.suptitle(f"{run.path}: {run.methods}, seed {c.get('seed')}", fontsize=10)
    return save(fig, out, name)


def fig_schedules(runs, out, name):
    """Fig. 1A: LR (top) and validation accuracy (bottom) against epoch, one standard and one cyclic run."""
    pick = {}
    for sched in ("standard", "cyclic"):
        cands = [r for r in runs if r.schedule == sched]
        base = [r for r in cands if r.methods == "baseline"] or cands
        if base:
            pick[sched] = max(base, key=lambda r: r.rows[-1]["epoch"])
    if not pick:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, layout="constrained")
    for sched, run in pick.items():
        c = run.config
        colour = "tab:blue" if sched == "standard" else "tab:orange"
        plan = schedule_of(run)
        spe = c.get("steps_per_epoch")
        if plan is not None:  # the LR at every step, from the run's own schedule
            top.plot([s / spe for s in range(plan.total_steps)],
                     [schedules.lr_at(plan, s, c["lr"], c.get("eta_min", 0.0)) for s in range(plan.total_steps)],
                     color=colour, label=f"{sched} ({run.methods})")
        else:
            top.plot([r["epoch"] for r in run.rows], [r["lr"] for r in run.rows], color=colour, label=sched)
        bottom.plot([r["epoch"] for r in run.rows], [r["val_acc1"] for r in run.rows], color=colour, marker=".",
                    ls=style(sched)["ls"], label=sched)
        ends = [r for r in run.rows if r["cycle_end"] == 1]
        bottom.scatter([r["epoch"] for r in ends], [r["val_acc1"] for r in ends], color=colour, s=50, zorder=3)
    top.set_ylabel("learning rate")
    top.legend(loc="upper right", fontsize=8)
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("validation top-1 (%)")
    bottom.legend(loc="lower right", fontsize=8)
    top.set_title("Schedules and accuracy during training (large dots: cycle ends)")
    return save(fig, out, name)


def fig_total_time(gaps, out, name, x="time", calibration=None):
    """Fig. 1B / 3D: time (the cost on axis x) to build each curve, standard vs cyclic, with Eq. 1's prediction and
    the ratio's CI."""
    standard, cyclic, ratio = cost_columns(x)
    rows = [g for g in gaps if g[standard] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4), layout="constrained")
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [g[standard] for g in rows], 0.4, label="standard (sum of runs)")
    ax.bar([i + 0.2 for i in xs], [g[cyclic] for g in rows], 0.4, label="cyclic (one run)")
    ax.scatter([i - 0.2 for i in xs], [g[cyclic] * g["eq1_ratio"] for g in rows], marker="_", s=600,
               color="k", zorder=3, label="Eq. 1: cyclic time x epoch ratio")
    for i, g in enumerate(rows):
        ci = "" if g[f"{ratio}_lo"] is None else f"\n[{g[f'{ratio}_lo']:.2f}, {g[f'{ratio}_hi']:.2f}]"
        ax.annotate(f"{g[ratio]:.2f}x{ci}", (i - 0.2, g[standard]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [g["methods"] for g in rows], rotation=30, ha="right", fontsize=8)
    if x in axes.NEW_AXES:
        ax.set_ylabel(f"total {cost_unit(x, calibration)}")
        ax.set_title(f"Cost to build a tradeoff curve, {cost_unit(x, calibration)} (ratio with its 95 % CI, paired "
                     f"by seed)", fontsize=9)
    else:
        ax.set_ylabel("total training time (s)")
        ax.set_title("Time to build a tradeoff curve (ratio with its 95 % CI over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, out, name)


def fig_tradeoff(cmap, methods_sets, col, x, out, name, calibration=None):
    """Fig. 1C / 2: accuracy against time, standard solid, cyclic dashed; a panel per method set plus one with all."""
    panels = [("all", methods_sets)] + [(m, ["baseline", m]) for m in methods_sets if m != "baseline"]
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow), squeeze=False, layout="constrained")
    for ax, (title, sets) in zip(axes.flat, panels):
        for m in dict.fromkeys(sets):
            for sched in ("standard", "cyclic"):
                pts = cmap.get((m, sched))
                if pts:  # the all-sets panel names each set once: colour is the set, line style the schedule
                    label = f"{m} {sched}" if title != "all" else (m if sched == "standard" else "_nolegend_")
                    plot_curve(ax, pts, x, col[m], sched, label)
        for p in cmap.get(("baseline", "cyclic"), []) if title == "all" else []:
            ax.annotate(f"{p.epochs:g} ep", (p.x(x), p.acc_mean), fontsize=7, xytext=(3, -10),
                        textcoords="offset points")
        finish_axes(ax, xlabel(x, calibration), "validation top-1 (%)",
                    "all (standard solid, cyclic dashed)" if title == "all" else f"{title} vs baseline",
                    legend_loc=None if title == "all" else "lower right")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:  # below the figure, where it covers no curve however many sets there are
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8,
                   title=f"method sets (all panel); {CI_NOTE}", title_fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save(fig, out, name)


def improvement_plot_data(cmap, methods_sets, min_epochs=0.0):
    """{(methods, schedule): (budgets, method - baseline in pp, CI los, CI his)}: exactly what fig4 draws."""
    data = {}
    for m in methods_sets:
        for sched in ("standard", "cyclic"):
            rows = improvement_series(cmap, m, sched, min_epochs) if m != "baseline" else []
            if rows:
                data[(m, sched)] = tuple([r[k] for r in rows] for k in ("budget", "improvement_pp", "lo", "hi"))
    return data


def fig_improvement(cmap, methods_sets, col, out, name, min_epochs=0.0):
    """Fig. 3A-C: improvement over the baseline at each budget, standard solid, cyclic dashed, with CIs."""
    data = improvement_plot_data(cmap, methods_sets, min_epochs)
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for (m, sched), (budgets, diffs, los, his) in data.items():
        ax.errorbar(budgets, diffs, yerr=yerr(diffs, los, his), color=col[m], label=f"{m} {sched}", capsize=3,
                    **style(sched))
    ax.axhline(0, color="k", lw=0.8)
    finish_axes(ax, xlabel("epochs"), "accuracy - baseline (pp)",
                f"Improvement over the baseline (standard solid, cyclic dashed)\n{CI_NOTE}", legend_loc=None)
    outside_legend(ax)
    return save(fig, out, name)


def fig_constant(cmap, methods_sets, col, x, out, name, calibration=None):
    """Fig. S1: constant-period cyclic runs against the standard curve, when there are any."""
    sets = [m for m in methods_sets if (m, "constant") in cmap]
    if not sets:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for m in sets:
        for sched in ("standard", "cyclic", "constant"):
            if (m, sched) in cmap:
                plot_curve(ax, cmap[(m, sched)], x, col[m], sched, f"{m} {sched}")
    finish_axes(ax, xlabel(x, calibration), "validation top-1 (%)", "Constant-period cycles against the standard curve")
    return save(fig, out, name)


def average_ranks(scores):
    """Rank of each score, 0 for the best; exact ties share the mean of their ranks."""
    return [sum(t > s for t in scores) + (sum(t == s for t in scores) - 1) / 2 for s in scores]


def draw_swaps(ax, row, col, label_right):
    """Slope chart of one ranking row: rank on the standard curve (left) to rank on the cyclic one (right)."""
    swapped = {n for pair in row["swaps"].split("; ") if pair for n in pair.split(" <> ")}
    right_names = {}
    for m, left, right in zip(row["_names"], average_ranks(row["_std"]), average_ranks(row["_est"])):
        ax.plot([0, 1], [left, right], color=col[m], marker="o", lw=2.5 if m in swapped else 1,
                ls="-" if m in swapped else ":")
        right_names.setdefault(right, []).append(m)
    for right, names in right_names.items() if label_right else ():  # tied sets share a rank and one label
        ax.annotate(" = ".join(names), (1, right), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7)
    budget = row["budget"] if row["budget"] == "overall" else f"{row['budget']:g} ep"
    tau = "tau n/a" if row["kendall_tau"] is None else f"tau {row['kendall_tau']:.2f}"
    ax.set_title(f"{budget}: {tau}, {row['discordant_pairs']} swap(s)", fontsize=8)
    ax.set_xticks([0, 1], ["standard", row["estimator"]], fontsize=7)
    ax.set_xlim(-0.2, 1.2)
    ax.set_yticks([])
    ax.invert_yaxis()


def fig_ordering(cmap, methods_sets, ranking, col, x, out, name, calibration=None):
    """Fig. S2: curves of the method sets per schedule, and below the rank of each set on both (thick: swaps)."""
    rows = [r for r in ranking if r["estimator"] == "cyclic"]
    fig = plt.figure(figsize=(max(11, 2.4 * len(rows)), 8 if rows else 4.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.3, 1]) if rows else (fig, None)
    axes = top.subplots(1, 2, sharey=True)
    for ax, sched in zip(axes, ("standard", "cyclic")):
        for m in methods_sets:
            if (m, sched) in cmap:
                plot_curve(ax, cmap[(m, sched)], x, col[m], sched, m)
        finish_axes(ax, xlabel(x, calibration), None, f"{sched} curves")
    axes[0].set_ylabel("validation top-1 (%)")
    if rows:
        for i, (ax, row) in enumerate(zip(bottom.subplots(1, len(rows), squeeze=False)[0], rows)):
            draw_swaps(ax, row, col, label_right=i == len(rows) - 1)
        bottom.suptitle("Rank of each method set (top = best); thick lines: pairs whose order swaps", fontsize=9)
    return save(fig, out, name)


def gap_plot_data(rows):
    """{(methods, estimator): (budgets, gap pp, CI los, CI his)} from estimators.csv rows: what fig7 draws."""
    return {(r["methods"], r["estimator"]): tuple([p[k] for p in r["_points"]] for k in ("budget", "gap_pp", "gap_lo",
                                                                                         "gap_hi"))
            for r in rows if r["_points"]}


def with_other_estimators(rows):
    """The estimators.csv rows of the method sets run with an estimator besides the cyclic one."""
    sets = {r["methods"] for r in rows if r["estimator"] != "cyclic" and r["_points"]}
    return [r for r in rows if r["methods"] in sets]


def fig_gap(rows, col, out, name):
    """Gap (estimator - standard) at each budget per method set, with its 95 % CI as a band."""
    data = gap_plot_data(rows)
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for (m, est), (budgets, gaps, los, his) in data.items():
        ax.plot(budgets, gaps, color=col[m], label=f"{m} {est}" if est != "cyclic" else m, **style(est))
        band = [(b, g, lo, hi) for b, g, lo, hi in zip(budgets, gaps, los, his) if lo is not None]
        if len(band) > 1:
            ax.fill_between([b for b, *_ in band], [lo for *_, lo, _ in band], [hi for *_, hi in band], color=col[m],
                            alpha=0.15, lw=0)
        elif band:  # a band needs two budgets
            b, g, lo, hi = band[0]
            ax.errorbar([b], [g], yerr=yerr([g], [lo], [hi]), color=col[m], capsize=3)
    ax.axhline(0, color="k", lw=0.8)
    finish_axes(ax, xlabel("epochs"), "estimator - standard (pp)", f"Gap per budget\n{CI_NOTE}", legend_loc=None)
    outside_legend(ax)
    return save(fig, out, name)


class Fidelity(NamedTuple):
    cost: float  # relative to the standard curve's
    gap: float  # mean |gap| of the seed-averaged curves (pp)
    cost_ci: tuple
    gap_ci: tuple
    run_gap: float = None  # per-run |gap|: each seed's runs against its own standard runs (pp)
    run_ci: tuple = (None, None)


def pooled_rows(rows):
    """(rows, shared): the estimator rows with a |gap|, restricted to the method sets every estimator has where
    there are such sets (shared True), so that the estimators' fidelities are pooled over the same sets."""
    rows = [r for r in rows if r["mean_abs_gap_pp"] is not None]
    sets_of = {est: {r["methods"] for r in rows if r["estimator"] == est} for est in {r["estimator"] for r in rows}}
    shared = set.intersection(*sets_of.values()) if sets_of else set()
    return ([r for r in rows if r["methods"] in shared], True) if shared else (rows, False)


def fidelity_points(rows, x="time"):
    """{estimator: Fidelity} pooled over pooled_rows' method sets: cost = the estimator's curve_cost_s, summed over
    sets, over the standard runs'; gap = mean |gap| of the seed-averaged curves; run_gap = per-run |gap| (each
    seed's own runs), averaged over sets; the gaps leave out an in-sample row (the calibrated estimator's baseline:
    its cost counts). CIs are (None, None) unless every set has one (run_gap's: unless every set holds the same
    seeds, the unit the interval is over; the calibrated estimator's from its joint draws, the same for every row
    pooled: resamples_pool, over the gaps' rows for the gaps, over every row, the in-sample one too, for the cost)."""
    out = {}
    rows, _ = pooled_rows(rows)
    for est in dict.fromkeys(r["estimator"] for r in rows):
        mine = [r for r in rows if r["estimator"] == est]
        gapped = [r for r in mine if not r.get("_in_sample")]
        std_col, est_col, _ = cost_columns(x)
        boot = "_axis_boot" if x in axes.NEW_AXES else "_cost_boot"  # (estimator, standard) resampled
        standard = sum(r[std_col] or 0 for r in mine)
        if not standard or not gapped:
            continue
        cost = sum(r[est_col] for r in mine) / standard
        gap = sum(r["mean_abs_gap_pp"] for r in gapped) / len(gapped)
        n = min(r["n_seeds"] for r in mine)
        cost_ci, gap_ci, run_gap, run_ci = (None, None), (None, None), None, (None, None)
        # the calibrated rows' resamples pool only where every row pooled drew the same seeds; otherwise no interval
        pools_cost, pools = resamples_pool(mine), resamples_pool(gapped)
        draws, gapped_draws = [r.get("_draws") for r in mine], [r.get("_draws") for r in gapped]
        if pools_cost and all(r.get(boot) is not None for r in mine):
            df = boot == "_cost_boot" and review.pooled_df(draws, lambda ds: sum(d.cost for d in ds) / sum(
                d.standard_apart for d in ds)) or None  # (the calibrated rows' _cost_boot, drawn in strata)
            lo, hi = stats.interval(sum(r[boot][0] for r in mine) / sum(r[boot][1] for r in mine), n, cost, df)
            cost_ci = (nonnegative(lo), hi)
        if pools and all(r.get("_abs_boot") is not None for r in gapped):
            df = review.pooled_df(gapped_draws, lambda ds: sum(map(review.ABS_GAP, ds)) / len(ds))
            gap_ci = stats.interval(sum(r["_abs_boot"] for r in gapped) / len(gapped), n, gap, df)
        if all(r.get("_per_run") for r in gapped):
            run_gap = sum(r["per_run_abs_gap_pp"] for r in gapped) / len(gapped)
            seeds = gapped[0]["_per_run"].keys()
            if not pools:
                run_ci = (None, None)
            elif all(r.get("_run_boot") is not None for r in gapped):  # the shift resampled: the same draws per set
                df = review.pooled_df(gapped_draws, lambda ds: sum(map(review.RUN_GAP, ds)) / len(ds))
                run_ci = stats.interval(sum(r["_run_boot"] for r in gapped) / len(gapped), n, run_gap, df)
            elif all(r["_per_run"].keys() == seeds for r in gapped):  # per seed, its runs' |gap| averaged over sets
                run_ci = stats.mean_ci([sum(r["_per_run"][s] for r in gapped) / len(gapped) for s in seeds])
            run_ci = (nonnegative(run_ci[0]), run_ci[1])
        out[est] = Fidelity(cost, gap, cost_ci, gap_ci, run_gap, run_ci)
    return out


def resamples_pool(rows):
    """Whether these rows' resamples may be averaged, draw by draw: none has joint draws, or all drew alike."""
    draws = [r.get("_draws") for r in rows]
    return all(d is None for d in draws) or review.drew_alike(draws)


def fig_fidelity(rows, out, name, x="time", calibration=None):
    """Fidelity against cost (on axis x): per one-run estimator, its per-run |gap| to the standard curve (filled,
    where every method set has one) and the |gap| of its seed-averaged curve (hollow), over its cost."""
    data = fidelity_points(rows, x)
    if not data:
        return None
    pooled, shared = pooled_rows(rows)
    n_sets = len({r["methods"] for r in pooled})
    over = (f"pooled over the {n_sets} method sets every estimator has" if shared
            else f"over {n_sets} method sets (none has every estimator)")
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    tops = []
    for i, (est, f) in enumerate(data.items()):
        colour, marker = plt.get_cmap("tab10")(i), style(est)["marker"]
        est += " (gaps: not the baseline)" if est == "baseline-calibrated" else ""  # its baseline row is in-sample
        xerr = yerr([f.cost], [f.cost_ci[0]], [f.cost_ci[1]])
        if f.run_gap is not None:
            ax.errorbar([f.cost], [f.run_gap], xerr=xerr, yerr=yerr([f.run_gap], [f.run_ci[0]], [f.run_ci[1]]),
                        marker=marker, ms=8, capsize=3, color=colour, ls="none", label=f"{est}, per run")
            tops.append(f.run_gap if f.run_ci[1] is None else f.run_ci[1])
        ax.errorbar([f.cost], [f.gap], xerr=None if f.run_gap is not None else xerr,
                    yerr=yerr([f.gap], [f.gap_ci[0]], [f.gap_ci[1]]), marker=marker, ms=7, mfc="none", capsize=2,
                    color=colour, ls="none", alpha=0.6,
                    label=f"{est}, mean curve" + ("" if f.run_gap is not None else " (per run n/a: a set unpaired)"))
        tops.append(f.gap if f.gap_ci[1] is None else f.gap_ci[1])
    ax.axvline(1, color="k", lw=0.8, ls=":")
    highest_cost = max(f.cost if f.cost_ci[1] is None else f.cost_ci[1] for f in data.values())
    ax.set_xlim(0, max(1.05, 1.1 * highest_cost))  # both axes from 0: the origin is a free, exact estimator
    ax.set_ylim(0, 1.15 * max(tops) or 1)
    finish_axes(ax, "cost relative to the standard curve (curve_cost_s / sum of standard runs)"
                if x not in axes.NEW_AXES else f"cost relative to the standard curve ({cost_unit(x, calibration)})",
                "|estimator - standard| (pp), mean over budgets",
                f"Fidelity vs cost, {over}\nfilled: each seed's run vs its own standard "
                f"runs; hollow: seed-averaged curves\n{CI_NOTE}", legend_loc="best", log_x=False)
    return save(fig, out, name)


def md_table(header, rows):
    """A markdown table from a header and rows of already formatted cells; a | in a cell (tests.csv's family
    "per-run |gap| difference") escaped, or it would split the cell and shift the row's columns."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows])


def gap_cell(value, lo, hi, spec="+.2f"):
    return "" if value is None else f"{value:{spec}} {ci_text(lo, hi, spec)}"


def resolved_cell(r):
    return "" if r is None else ("yes" if r else "no")


def verdict_lines(gaps):
    """Which mean gaps are resolved (CI excludes 0), which not, and which have no CI."""
    have = [g for g in gaps if g["mean_gap_pp"] is not None]
    names = lambda f: ", ".join(f"{g['methods']} ({g['mean_gap_pp']:+.2f})" for g in have if f(g)) or "none"  # noqa
    return [f"- Resolved (95 % CI excludes 0): {names(lambda g: g['resolved'] is True)}.",
            f"- Not resolved (CI includes 0): {names(lambda g: g['resolved'] is False)}.",
            f"- No CI (a budget with one seed on a curve): {names(lambda g: g['resolved'] is None)}.", ""]


def gap_section(gaps, points):
    """report.md's tables of mean gaps and per-budget gaps, each with its CI."""
    md = ["## Gaps (cyclic - standard)", "", md_table(
        ["methods", "budgets", "seeds", "mean gap [95 % CI]", "resolved", "mean abs gap [95 % CI]", "max abs gap",
         "improvement corr", "gap - baseline's [95 % CI] (seeds)", "resolved (vs baseline)", "pairing", "note"],
        [[g["methods"], g["budgets"] or "", fmt(g["n_seeds"]),
          gap_cell(g["mean_gap_pp"], g["mean_gap_lo"], g["mean_gap_hi"]), resolved_cell(g["resolved"]),
          gap_cell(g["mean_abs_gap_pp"], g["mean_abs_gap_lo"], g["mean_abs_gap_hi"], ".2f"), fmt(g["max_abs_gap_pp"]),
          fmt(g["improvement_corr"]),
          gap_cell(g["delta_gap_vs_baseline"], g["delta_gap_vs_baseline_lo"], g["delta_gap_vs_baseline_hi"])
          + (f" ({g['delta_gap_seeds']})" if g["delta_gap_seeds"] else ""),
          resolved_cell(g["delta_gap_vs_baseline_resolved"]), fmt(g["pairing"]), fmt(g["note"])] for g in gaps]), ""]
    md += verdict_lines(gaps)
    md += ["### Per budget", "", md_table(
        ["methods", "budget", "standard mean ± std (n)", "cyclic mean ± std (n)", "gap [95 % CI]", "resolved"],
        [[p["methods"], f"{p['budget']:g}", f"{p['standard_mean']:.2f} ± {p['standard_std']:.2f} ({p['standard_n']})",
          f"{p['cyclic_mean']:.2f} ± {p['cyclic_std']:.2f} ({p['cyclic_n']})",
          gap_cell(p["gap_pp"], p["gap_lo"], p["gap_hi"]), resolved_cell(p["resolved"])] for p in points]), ""]
    return md


def improvement_section(rows):
    """report.md's improvement of each method set over the baseline on each curve, per budget, with its CI: with
    cyclic runs only (the cheap benchmark: launch.sh sweep --no-standard) the whole answer."""
    if not rows:
        return []
    return ["## Improvement over the baseline, per budget", "",
            "Accuracy of the method set minus the baseline's at the same budget on the same curve (pp), 95 % CI "
            "over seeds; resolved: the CI excludes 0.", "", md_table(
                ["methods", "curve", "budget", "improvement [95 % CI]", "resolved", "seeds (baseline's)", "pairing"],
                [[r["methods"], r["schedule"], f"{r['budget']:g}", gap_cell(r["improvement_pp"], r["lo"], r["hi"]),
                  resolved_cell(None if r["lo"] is None else not r["lo"] <= 0 <= r["hi"]),
                  f"{r['n']} ({r['n_baseline']})", r["pairing"]] for r in rows]), ""]


def ranking_section(ranking):
    """report.md's comparison of the method orderings on the standard and each estimator's curve."""
    if not ranking:
        return ["## Ordering of method sets", "", "(needs 2+ method sets with both curves)", ""]
    return ["## Ordering of method sets", "",
            "Method sets ordered by accuracy on each curve (`=`: exact tie; overall: the mean over the budgets every "
            "set has); Kendall's tau-b between the orderings. Each swapped pair is listed with its difference on the "
            "standard curve (pp, 95 % CI over the seeds that have every budget of the row); separated: the swaps "
            "whose CI excludes 0, which the standard curve itself tells apart, so the estimator missed a real "
            "difference; a swap not separated is not shown to be one with these seeds; no CI: a set with one seed. "
            "Each swap is its own 95 % test: among many pairs, expect an occasional one separated by chance.",
            "",
            md_table(["estimator", "budget", "standard order", "estimator order", "tau", "discordant / pairs",
                      "separated", "swaps: standard difference [95 % CI]"],
                     [[r["estimator"], fmt(r["budget"], "g"), r["standard_order"], r["estimator_order"],
                       fmt(r["kendall_tau"]), f"{r['discordant_pairs']} / {r['n_pairs']}",
                       f"{r['swaps_standard_separates']} / {r['discordant_pairs']}"
                       + (f" ({r['swaps_without_ci']} no CI)" if r["swaps_without_ci"] else ""),
                       r["swap_standard_diffs"] or "none"]
                      for r in ranking]), ""]


def estimator_section(rows, x="time", calibration=None):
    """report.md's table of every one-run estimator against the standard curve (on --x calibrated / flops, with
    the cost on that axis too)."""
    if not any(r["estimator"] != "cyclic" for r in rows):
        return []
    standard, cyclic, ratio = cost_columns(x)
    spec = ".3g" if x == "flops" else ".1f"
    extra = x in axes.NEW_AXES
    return ["## One-run estimators against the standard curve", "",
            "Cost: the estimator run's `curve_cost_s` at its largest matched budget (all the compute it spent, "
            "branches included); standard: the sum of the standard runs' training time at the matched budgets. "
            "Mean abs gap: |gap| of the seed-averaged curves; per-run abs gap: the mean over seeds of each seed's own "
            "|estimator - standard| (what one run delivers; needs the same seeds on both curves)."
            + (f" Then the same cost in {cost_unit(x, calibration)}, its ratio's CI paired by seed." if extra else ""),
            "", md_table(["estimator", "methods", "budgets", "seeds", "mean gap [95 % CI]", "resolved",
                      "mean abs gap [95 % CI]", "per-run abs gap [95 % CI]", "estimator cost s", "standard s",
                      "ratio [95 % CI]"] + [f"estimator ({axes.unit(x)})", f"standard ({axes.unit(x)})",
                                            "ratio [95 % CI, paired]"] * extra + ["note"],
                     [[r["estimator"], r["methods"], r["budgets"] or "", fmt(r["n_seeds"]),
                       gap_cell(r["mean_gap_pp"], r["mean_gap_lo"], r["mean_gap_hi"]), resolved_cell(r["resolved"]),
                       gap_cell(r["mean_abs_gap_pp"], r["mean_abs_gap_lo"], r["mean_abs_gap_hi"], ".2f"),
                       gap_cell(r["per_run_abs_gap_pp"], r["per_run_abs_gap_lo"], r["per_run_abs_gap_hi"], ".2f"),
                       fmt(r["cyclic_time_s"], ".1f"), fmt(r["standard_time_s"], ".1f"),
                       "" if r["time_ratio"] is None else f"{r['time_ratio']:.2f} "
                       f"{ci_text(r['time_ratio_lo'], r['time_ratio_hi'], '.2f')}"]
                      + [fmt(r[cyclic], spec), fmt(r[standard], spec), "" if r[ratio] is None else
                         f"{r[ratio]:.3f} {ci_text(r[f'{ratio}_lo'], r[f'{ratio}_hi'], '.3f')}"] * extra
                      + [fmt(r["note"])] for r in rows]), ""]


def fit_section(fits, x):
    """report.md's table of power-law fits and the mean gap between fitted curves."""
    unit = "s" if x == "time" else "epochs" if x == "epochs" else axes.unit(x)
    return ["## Power-law fits", "",
            f"acc(x) = a - b x^(-c) by least squares on each curve's mean points, x = training {unit}. Fitted gap: "
            "the area between the fitted estimator and standard curves over their shared x range, integrated over "
            "ln x, divided by that range's length in ln x (a mean gap in pp, log-x weighted).", "",
            md_table(["methods", "schedule", "points", "a", "b", "c", "rmse pp", "residuals pp", "x range",
                      "area (pp ln x)", "fitted gap pp", "note"],
                     [[f["methods"], f["schedule"], f["n_points"], fmt(f["a"]), fmt(f["b"]), fmt(f["c"], ".3f"),
                       fmt(f["rmse_pp"]), fmt(f["residuals_pp"]),
                       "" if f["range_lo"] is None else f"{f['range_lo']:.3g}-{f['range_hi']:.3g}",
                       fmt(f["area_vs_standard"], "+.3f"), fmt(f["mean_fitted_gap_pp"], "+.2f"), fmt(f["note"])]
                      for f in fits]), ""]


def pooled_time_line(gaps):
    """Per-set time ratios carry the run-to-run timing noise; pooled over all sets most of it averages out."""
    timed = [g for g in gaps if g["time_ratio"] is not None and g["eq1_ratio"] is not None]
    if len(timed) < 2:
        return []
    standard, cyclic = sum(g["standard_time_s"] for g in timed), sum(g["cyclic_time_s"] for g in timed)
    predicted = sum(g["cyclic_time_s"] * g["eq1_ratio"] for g in timed) / cyclic
    ratio = standard / cyclic
    return [f"All {len(timed)} method sets pooled: standard {standard:.1f} s, cyclic {cyclic:.1f} s, ratio "
            f"{ratio:.3f} against Eq. 1's {predicted:.3f} ({100 * (ratio / predicted - 1):+.1f} %).", ""]


def axis_time_section(gaps, x, calibration):
    """--x calibrated / flops: the cost to build each curve on the axis, its ratio's CI paired by seed, beside the
    measured time's ratio and CI (wall clock: the two sides resampled independently)."""
    standard, cyclic, ratio = cost_columns(x)
    timed = [g for g in gaps if g[standard] is not None]
    spec = ".3g" if x == "flops" else ".1f"
    return [f"## Cost to build each curve ({cost_unit(x, calibration)})", "",
            f"Standard: sum of the standard runs' mean {cost_unit(x, calibration)} at the matched budgets. Cyclic: the "
            "cyclic run's at the largest matched budget. Ratio: standard / cyclic, its 95 % CI paired by seed (each "
            "seed's standard runs with its own cyclic run" + (", and one calibration round for all: the rounds were "
            "interleaved" if x == "calibrated" else "") + "); the measured time's ratio and CI beside it (the two "
            "sides resampled independently). Eq. 1: the epoch ratio the paper predicts for those budgets. "
            "'exact': the two curves share one configuration, so the ratio is that of their optimizer steps (or "
            "FLOPs) in every round and seed, and its interval has no width by construction.", "",
            md_table(["methods", f"standard ({axes.unit(x)})", f"cyclic ({axes.unit(x)})", "ratio [95 % CI, paired]",
                      "seeds", "measured ratio [95 % CI]", "Eq. 1"],
                     [[g["methods"], f"{g[standard]:{spec}}", f"{g[cyclic]:{spec}}",
                       axis_ratio_cell(g[ratio], g[f"{ratio}_lo"], g[f"{ratio}_hi"]), fmt(g[f"{ratio}_seeds"]),
                       "" if g["time_ratio"] is None else
                       f"{g['time_ratio']:.2f} {ci_text(g['time_ratio_lo'], g['time_ratio_hi'], '.2f')}",
                       f"{g['eq1_ratio']:.2f}"] for g in timed]), ""]


def axis_ratio_cell(ratio, lo, hi):
    """A cost ratio on the calibrated or FLOPs axis: 'exact' where its interval has no width (one configuration on
    both sides: every resample prices the same steps at the same step cost)."""
    if lo is not None and hi is not None and math.isclose(lo, hi, rel_tol=1e-9):
        return f"{ratio:.3f} (exact)"
    return f"{ratio:.3f} {ci_text(lo, hi, '.3f')}"


def method_cost_section(rows, x, calibration):
    """--x calibrated / flops: what one training image of each method set costs, relative to the baseline."""
    if not rows:
        return []
    return ["## Cost of a training image, per method set", "",
            f"Its {cost_unit(x, calibration)} per training image over the set's standard runs (cyclic where it has "
            "none), relative to the baseline's" + (": the interval is over the calibration's interleaved rounds "
                                                   "(median_ci; its coverage given)" if x == "calibrated" else
                                                   ": counted, exact") + ".", "",
            md_table(["methods", f"per image ({axes.unit(x)})", "relative to baseline", "interval (coverage)", "runs"],
                     [[r["methods"], fmt(r["per_image"], ".4g"), fmt(r["relative"], ".3f"),
                       "" if r["relative_lo"] is None else
                       f"[{r['relative_lo']:.3f}, {r['relative_hi']:.3f}] ({100 * r['coverage']:.0f} %)",
                       r["runs"]] for r in rows]), ""]


def time_section(gaps):
    timed = [g for g in gaps if g["standard_time_s"] is not None]
    return ["## Time to build each curve", "",
            "Standard: sum of the mean training time of the standard runs at the matched budgets. Cyclic: the cyclic "
            "run's training time at the largest matched budget. Eq. 1: the epoch ratio the paper predicts for those "
            "budgets.", "",
            md_table(["methods", "standard s", "cyclic s", "ratio [95 % CI]", "Eq. 1"],
                     [[g["methods"], f"{g['standard_time_s']:.1f}", f"{g['cyclic_time_s']:.1f}",
                       f"{g['time_ratio']:.2f} {ci_text(g['time_ratio_lo'], g['time_ratio_hi'], '.2f')}",
                       f"{g['eq1_ratio']:.2f}"] for g in timed]), ""] + pooled_time_line(gaps)


def test_name(t):
    """A test's name in report.md: its method set (or pair of sets) and budget where it has one."""
    return t["methods"] + ("" if t["budget"] is None else f" at {fmt(t['budget'], 'g')}")


def moved_verdicts(t):
    """'alone', 'Holm' or both: the verdicts of a test that some left-out seed changes."""
    return ", ".join(name for name, kept in (("alone", t["robust"]), ("Holm", t["robust_holm"])) if not kept)


def family_section(tests, calibrated=0):
    """report.md's families of tests (tests.csv): per family its size, what the 95 % CIs resolve alone, what Holm's
    familywise procedure keeps, and the verdicts that leaving one seed out changes. calibrated: the group's sets
    with a calibrated row (not in-sample), whose gaps are tested once (say where)."""
    if not tests:
        return []
    rows = []
    for family, curve in dict.fromkeys((t["family"], t["curve"]) for t in tests):
        mine = [t for t in tests if (t["family"], t["curve"]) == (family, curve)]
        tested = [t for t in mine if t["p"] is not None]
        dropped = [test_name(t) for t in tested if t["resolved"] and not t["resolved_holm"]]
        checked = [t for t in mine if t["robust"] is not None]
        moved = [f"{test_name(t)} ({moved_verdicts(t)})" for t in checked if not (t["robust"] and t["robust_holm"])]
        rows.append([family, curve, len(tested), sum(bool(t["resolved"]) for t in tested),
                     sum(bool(t["resolved_holm"]) for t in tested), "; ".join(dropped) or "none", len(checked),
                     "; ".join(moved) or ("none" if checked else "")])
    return ["## Families of tests: Holm's correction, leaving one seed out", "",
            "Each table makes many tests at once. A family (a row here) is one table's tests of one estimator or "
            "curve; its size is the number of tests with a p-value (p from the same t and standard error as the "
            "test's 95 % CI, so p < 0.05 where the CI excludes 0). Resolved alone: the CI excludes 0 (the tables' "
            "`resolved`); under Holm: Holm's step-down procedure at a familywise 5 % "
            "(`*_resolved_holm`). Left out: with 4+ seeds behind a test, the whole group is recomputed without "
            "each seed in turn; a verdict that changes for some seed is listed (`*_robust`, `*_robust_holm`). "
            "Every test: tests.csv." + (calibrated_families(tests, calibrated) if calibrated else ""), "",
            md_table(["family", "estimator / curve", "tests", "resolved alone", "under Holm",
                      "resolved alone, not under Holm", "checked (4+ seeds)", "verdicts one left-out seed changes"],
                     rows), ""]


def calibrated_families(tests, sets):
    """family_section's sentence on the calibrated estimator's gaps (review.own_test): one question, one test."""
    own = sum((t["family"], t["curve"]) == ("mean gap", review.CALIBRATED) for t in tests)
    return (" The baseline-calibrated estimator's gap - baseline's is cyclic's again (the shift cancels): not tested. "
            "Its mean gap asks the same question as the cyclic row's gap - baseline's (the set's cyclic miss beyond "
            "the baseline's): one test per set and question, so wherever the cyclic row's has an interval (2+ seeds "
            "all four curves share, paired) it is tested there and the calibrated mean gap is in no family, even "
            "where it also draws other seeds: its estimators.csv columns mean_gap_p, _resolved_holm, _robust and "
            "_robust_holm are empty and its stats_note names the seeds; only where the set and the baseline share no "
            f"seed (or one) is it a test of its own, in the family mean gap / baseline-calibrated: {own} of its {sets} "
            "sets here (its per-run |gap| is tested in the estimator pairs).")


def power_section(rows):
    """report.md's seeds to plan (power.csv): the whole-curve comparisons and the standard curve's improvements."""
    shown = [r for r in rows if r["comparison"] != "improvement over the baseline" or r["curve"] == "standard"]
    if not shown:
        return []
    detect = shown[0]["detect_pp"]
    return ["## Seeds to plan", "",
            "From each comparison's spread over seeds (its CI's standard error x sqrt(seeds)): the smallest true "
            "difference its seeds resolve with a 95 % CI 80 % of the time (exact: the noncentral t with n-1 degrees "
            "of freedom; the textbook (t(0.975) + t(0.8)) x sd / sqrt(n) gives 73-79 % at 2-6 seeds), and the seeds "
            f"a true difference of {detect:g} pp needs (`--detect`; per side where the "
            "comparison is unpaired). The estimators' improvements: power.csv. To plan a study, run 2 seeds first "
            "(`./launch.sh sweep ... --seeds \"0 1\"`; it has no `--pilot-seeds` mode) and read this table.", "",
            md_table(["comparison", "methods", "curve", "budget", "estimate [95 % CI]", "seeds", "sd per seed",
                      "resolved at 80 % power", f"seeds for {detect:g} pp", "note"],
                     [[r["comparison"], r["methods"], r["curve"], fmt(r["budget"], "g"),
                       gap_cell(r["estimate_pp"], r["lo"], r["hi"]), r["n_seeds"], fmt(r["sd_per_seed_pp"]),
                       fmt(r["mde_pp"]), fmt(r["seeds_needed"]), fmt(r["note"])] for r in shown]), ""]


def pair_section(rows):
    """report.md's estimator against estimator (estimator_pairs.csv)."""
    if not rows:
        return []
    return ["## Estimator against estimator: per-run |gap|, paired by seed", "",
            "Per method set, estimator a's per-run |gap| minus estimator b's (pp), the mean over the seeds both hold "
            "with its 95 % t interval; negative: a is closer to the standard curve. `all N sets`: per seed the mean "
            "over the sets, where every set holds the same seeds. Holm: over each pair's rows.", "",
            md_table(["a - b", "methods", "seeds", "a's per-run abs gap", "b's", "a - b [95 % CI]", "resolved",
                      "under Holm", "robust (alone / Holm)", "note"],
                     [[f"{r['estimator_a']} - {r['estimator_b']}", r["methods"], r["n_seeds"],
                       fmt(r["per_run_abs_gap_a"]), fmt(r["per_run_abs_gap_b"]),
                       gap_cell(r["diff_pp"], r["diff_lo"], r["diff_hi"]), resolved_cell(r["resolved"]),
                       resolved_cell(r["resolved_holm"]), "" if r["robust"] is None
                       else f"{resolved_cell(r['robust'])} / {resolved_cell(r['robust_holm'])}", fmt(r["note"])]
                      for r in rows]), ""]


def calibrated_section(estimators):
    """report.md's baseline-calibrated estimator against the cyclic one, like for like: their gaps pooled over the
    sets other than the baseline (the calibrated one's baseline row is in-sample), their costs over every set."""
    both = [dict(r, _in_sample=True) if r["methods"] == "baseline" else r  # cyclic's baseline row: costs only too
            for r in estimators if r["estimator"] in ("cyclic", "baseline-calibrated")]
    data = fidelity_points(both)
    if "baseline-calibrated" not in data:
        why = ("none: it needs the baseline's standard and cyclic curves" if not any(
            r["estimator"] == "baseline-calibrated" for r in both) else "the baseline's row only, which is in-sample")
        return ["## The baseline-calibrated estimator", "", f"({why})", ""]
    pooled, _ = pooled_rows(both)
    n_sets = len({r["methods"] for r in pooled})
    n_gapped = len({r["methods"] for r in pooled if not r.get("_in_sample")})
    return ["## The baseline-calibrated estimator", "",
            "Each set's cyclic curve shifted, at each budget, by the baseline's standard - cyclic difference "
            "(seed-averaged), so that the baseline's own cyclic bias cancels; exact where a set's cyclic bias equals "
            "the baseline's, and no help where a set interacts with the schedule (its mean gap is then the gap - "
            "baseline's). Cost: every set's cyclic run plus the baseline's standard curve (estimators.csv: each set "
            "its run plus an equal share). Its intervals and pair tests resample the baseline's seeds too, the shift "
            "recomputed in each draw, so the shift's own seed noise is in them: where the set and the baseline hold "
            "the same seeds, one draw of seeds serves the four curves (paired); where they hold other seeds, in "
            "strata: the seeds both hold drawn for both (seed s's runs are correlated across sets), each side's own "
            "drawn for it alone, each stratum's spread at its own seeds, and t at Satterthwaite's degrees of freedom "
            "over the strata (each stratum's seeds - 1; the row's note gives them, its pair tests' theirs; paired, "
            "n_seeds - 1). Its gap - baseline's is the cyclic estimator's (the shift "
            "cancels): not tested again. Its mean gap asks what the cyclic row's gap - baseline's asks: tested once, "
            "on the cyclic row, wherever that has an interval (its mean_gap_p and Holm columns empty); only where the "
            "set and the baseline share at most one seed a test of its own, in the family mean gap / "
            "baseline-calibrated. The "
            "baseline's own calibrated row is in-sample (its shifted curve is its standard curve on average): it "
            "stays in estimators.csv with point estimates, marked in its note, and is left out of every Holm "
            "family, estimator pair and pooled gap.", "",
            f"Against the cyclic estimator, gaps pooled over the {n_gapped} sets other than the baseline, costs "
            f"over all {n_sets} (all their estimator runs against all their standard runs); fig8 pools every "
            "estimator over the sets every estimator has (the calibrated one's gaps without the baseline):", "",
            md_table(["estimator", "per-run abs gap [95 % CI]", "mean-curve abs gap [95 % CI]",
                      "cost / standard curves [95 % CI]"],
                     [[est, "" if f.run_gap is None else gap_cell(f.run_gap, *f.run_ci, ".2f"),
                       gap_cell(f.gap, *f.gap_ci, ".2f"), gap_cell(f.cost, *f.cost_ci, ".2f")]
                      for est, f in data.items()]), ""] + unpooled_note(pooled)


def unpooled_note(rows):
    """Why the calibrated estimator's pooled intervals are empty (fidelity_points), where its rows drew other seeds:
    its sets' for its gaps; those or its in-sample baseline row's for its cost."""
    mine = [r for r in rows if r["estimator"] == review.CALIBRATED]
    if resamples_pool(mine):
        return []
    which = "cost interval is" if resamples_pool([r for r in mine if not r.get("_in_sample")]) else "intervals are"
    return [f"(The calibrated estimator's pooled {which} empty: its rows draw other seeds (its sets', or its sets' "
            "and its in-sample baseline row's, whose cost counts), each with its own draw of the baseline's shift, "
            "which averaging over the rows would thin.)", ""]


def paired_ratio_section(estimators):
    """report.md's cost ratios with the CI that resamples the two sides apart, and paired by seed."""
    rows = [r for r in estimators if r["time_ratio"] is not None]
    if not rows:
        return []
    return ["## Cost ratios paired by seed", "",
            "Standard time over the estimator's cost: `time_ratio` resamples the two sides apart; paired: over the "
            "seeds with every run, the same seeds drawn on both sides (seed by seed, the runs share a machine's "
            "speed).", "",
            md_table(["estimator", "methods", "ratio [95 % CI]", "paired ratio [95 % CI] (seeds)"],
                     [[r["estimator"], r["methods"], gap_cell(r["time_ratio"], r["time_ratio_lo"], r["time_ratio_hi"],
                                                              ".2f"),
                       "" if r["time_ratio_paired"] is None else
                       gap_cell(r["time_ratio_paired"], r["time_ratio_paired_lo"], r["time_ratio_paired_hi"], ".2f")
                       + f" ({r['time_ratio_paired_seeds']})"] for r in rows]), ""]


def tau_section(ranking):
    """report.md's Kendall's tau with its CI over seeds, and the swaps the standard curve separates under Holm."""
    if not ranking:
        return []
    return ["## Kendall's tau with its CI", "",
            "Each resample draws seeds with replacement for every set and both curves, and recomputes the orderings; "
            "separated: the swaps whose standard difference's CI excludes 0, alone and under Holm (over every swap of "
            "the estimator).", "",
            md_table(["estimator", "budget", "tau [95 % CI]", "seeds", "swaps separated alone / Holm", "note"],
                     [[r["estimator"], fmt(r["budget"], "g"), gap_cell(r["kendall_tau"], r["kendall_tau_lo"],
                                                                       r["kendall_tau_hi"]), r["kendall_tau_seeds"],
                       f"{r['swaps_standard_separates']} / {r['swaps_standard_separates_holm'] or 0} of "
                       f"{r['discordant_pairs']}", "; ".join(n for n in (r["stats_note"] or "").split("; ")
                                                            if n.startswith("tau CI"))] for r in ranking]), ""]


def review_sections(pick):
    """The report's sections of analysis.review's statistics, from one group's rows."""
    estimators = pick("estimators.csv")
    calibrated = sum(r["estimator"] == review.CALIBRATED and not r["_in_sample"] for r in estimators)
    return (family_section(pick("tests.csv"), calibrated) + power_section(pick("power.csv"))
            + pair_section(pick("estimator_pairs.csv")) + calibrated_section(estimators)
            + paired_ratio_section(estimators) + tau_section(pick("ranking.csv")))


def group_report(analysis, group, cmap, args, suffix):
    """report.md lines and figures of one group of runs."""
    pick = lambda name: [r for r in analysis.rows(name) if r["group"] == group]  # noqa: E731
    gaps, estimators, ranking = pick("gaps.csv"), pick("estimators.csv"), pick("ranking.csv")
    methods_sets = order_methods(m for m, _ in cmap)
    col = colours(methods_sets)
    out, x, cal = args.out, args.x, analysis.calibration
    figures = [
        ("Schedules and accuracy during training (Fig. 1A)",
         fig_schedules(analysis.groups[group], out, f"fig1_schedules{suffix}")),
        ("Time to build each curve (Fig. 1B / 3D)" if x not in axes.NEW_AXES else
         f"Cost to build each curve, {cost_unit(x, cal)} (Fig. 1B / 3D)",
         fig_total_time(gaps, out, f"fig2_total_time{suffix}", x, cal)),
        ("Tradeoff curves (Fig. 1C, 2)" + (f", x: {cost_unit(x, cal)}" if x in axes.NEW_AXES else ""),
         fig_tradeoff(cmap, methods_sets, col, x, out, f"fig3_tradeoff{suffix}", cal)),
        ("Improvement over the baseline (Fig. 3A-C)",
         fig_improvement(cmap, methods_sets, col, out, f"fig4_improvement{suffix}", args.min_epochs)),
        ("Constant-period cycles (Fig. S1)",
         fig_constant(cmap, methods_sets, col, x, out, f"fig5_constant{suffix}", cal)),
        ("Ordering of method sets and their swaps (Fig. S2)",
         fig_ordering(cmap, methods_sets, ranking, col, x, out, f"fig6_ordering{suffix}", cal)),
        ("Gap per budget, cyclic - standard, every method set",
         fig_gap([r for r in estimators if r["estimator"] == "cyclic"], col, out, f"fig7_gap_per_budget{suffix}")),
        ("Gap per budget of every one-run estimator, on the method sets that have more than the cyclic one",
         fig_gap(with_other_estimators(estimators), col, out, f"fig9_estimator_gaps{suffix}")),
        ("Fidelity vs cost of the one-run estimators" + (f", cost in {cost_unit(x, cal)}" if x in axes.NEW_AXES
                                                          else ""),
         fig_fidelity(estimators, out, f"fig8_fidelity_cost{suffix}", x, cal)),
    ]
    md = gap_section(gaps, [p for g in gaps for p in g["_points"]]) if any(g["n_points"] for g in gaps) else []
    md += improvement_section(pick("improvement.csv")) + ranking_section(ranking)
    md += estimator_section(estimators, x, cal) + fit_section(pick("fits.csv"), args.x) + time_section(gaps)
    if x in axes.NEW_AXES:
        md += axis_time_section(gaps, x, cal) + method_cost_section(pick("method_costs.csv"), x, cal)
    md += review_sections(pick)
    dropped = [d for d in analysis.dropped if d[0] == group]
    if dropped:
        md += ["## Budgets left unmatched", ""] + [f"- {m} {s} at {e:g} epochs (no {o} point within "
                                                   f"{MATCH_TOLERANCE:.0%})" for _, m, s, e, o in dropped] + [""]
    md += ["## Figures", ""]
    for title, name in figures:
        md += [f"### {title}", "", f"![{title}]({name})" if name else "(no runs of the kind this figure needs)", ""]
    return md, sum(1 for _, n in figures if n)


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the paper's figures and write report.md for a folder of runs.")
    add_common_args(p)
    p.add_argument("--out", help="folder for the figures, CSVs and report.md (one run: default RUN_DIR/report)")
    p.add_argument("--no-figures", action="store_true",
                   help="write report.md and the tables but not the figures' files (report.md's text is the same)")
    args = p.parse_args(argv)
    FIGURES["write"] = not args.no_figures
    if len(args.runs) == 1 and os.path.exists(os.path.join(args.runs[0], "config.json")):
        return single_run_report(args.runs[0], args.out or os.path.join(args.runs[0], "report"))
    if not args.out:
        p.error("--out is required for a folder of runs (one run directory: its report goes to RUN_DIR/report)")
    analysis = analyse(args)
    write_tables(args.out, analysis)
    md = ["# Tradeoff-curve report", "", f"Made by `{made_by(argv)}`.", "",
          f"{len(analysis.runs)} runs from {', '.join(args.runs)}; accuracy metric `{args.metric}`; gap = cyclic - "
          f"standard, percentage points, over budgets matched within {MATCH_TOLERANCE:.0%}.", "",
          f"Uncertainty: 95 % CI by {stats.CI_METHOD}. A resample draws seeds with replacement and keeps each seed's "
          "runs together across budgets; the two curves are `paired` (cyclic seed s against standard seed s), at each "
          "budget over the seeds both hold there where one curve has more (its note says so), and resampled "
          "`independent`ly only where a budget shares fewer than 2. With one seed there is no CI.", ""]
    if args.x in axes.NEW_AXES:
        md += [f"x axis: {xlabel(args.x, analysis.calibration).replace(', log scale', '')}; the wall-clock columns "
               "(time_mean, standard_time_s, time_ratio) keep their measured meaning."] + [""]
        md += [f"- {line}." for line in axis_lines(analysis)] + [""]
    if group_line(analysis):
        md += [group_line(analysis) + ".", ""]
    for line in hardware_lines(analysis) + compile_lines(analysis) + speed_lines(analysis):
        print(f"warning: {line}")
        md += [f"- Note: {line}.", ""]
    if analysis.left_out:
        md += [f"- {line}" for line in left_out_lines(analysis)] + [""]
    n_figures = 0
    for i, (group, cmap) in enumerate(analysis.curves.items(), start=1):
        if len(analysis.curves) > 1:
            md += [f"# Group {i}: {group}", ""]
        lines, n = group_report(analysis, group, cmap, args, f"_g{i}" if len(analysis.curves) > 1 else "")
        md += lines
        n_figures += n
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.join(args.out, 'report.md')} with {n_figures} figures"
          + (" (their files not written: --no-figures)" if args.no_figures else ""))


def made_by(argv):
    """The command that wrote this report (report.md's header), --no-figures left out: it changes no text. The docs
    test runs it again and compares."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--no-figures"]
    return shlex.join(["python", "-m", "analysis.report", *args])


def single_run_report(path, out):
    """python -m analysis.report RUN_DIR: the run's own figure (fig_run), also for an unfinished run."""
    try:
        run = read_run(path)
    except RunError as e:
        sys.exit(f"analysis.report: error: {e}")
    if not run.rows:
        sys.exit(f"analysis.report: error: {path}/metrics.csv has no rows yet")
    os.makedirs(out, exist_ok=True)
    figure = fig_run(run, out, "run")
    print(f"wrote {figure}")


if __name__ == "__main__":
    main()
