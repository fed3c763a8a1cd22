"""analysis.compare and analysis.report on run directories written by hand."""
import csv
import itertools
import json
import math
import re

import numpy as np
import pytest

from analysis import compare, report, runs
from analysis.tables import compare_one

COLS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "train_time_s", "cycle", "cycle_end"]


def write_run(root, name, schedule, methods, rows, seed=0, done=True, **config):
    """rows: (epoch, acc, time, cycle, cycle_end[, curve_cost_s]); `config` adds or overrides config.json keys."""
    d = root / name
    d.mkdir(parents=True)
    epochs = rows[-1][0]
    cfg = dict(schedule=schedule, methods=methods, seed=seed, epochs=epochs, warmup_epochs=1, t0=1,
               t_mult=2 if schedule == "cyclic" else 1, lr=0.1, steps_per_epoch=4)
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    cost = any(len(r) > 5 for r in rows)
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLS + ["curve_cost_s"] * cost)
        for e, acc, t, cyc, end, *c in rows:
            w.writerow([e, int(e * 4), 0.01, 1.0, 1.0, acc, 99.0, t, cyc, end] + c)
    if done:
        (d / "done").touch()
    return d


def cyclic_rows(accs, times, mid=None):
    """Cycle ends at 2, 4, 8 epochs (warmup 1, t0 1, t_mult 2); `mid` adds a higher mid-cycle row to cycle 2."""
    rows = [(1, 10.0, 1.0, -1, 0), (2, accs[0], times[0], 0, 1), (4, accs[1], times[1], 1, 1)]
    if mid is not None:
        rows.append((6, mid, (times[1] + times[2]) / 2, 2, 0))
    return rows + [(8, accs[2], times[2], 2, 1)]


def standard(root, methods, budgets_accs, seed=0, time_per_epoch=1.0, **config):
    for e, acc in budgets_accs:
        write_run(root, f"std_{'+'.join(methods) or 'base'}_{e}_s{seed}", "standard", methods,
                  [(e / 2, acc - 5, e / 2 * time_per_epoch, 0, 0), (e, acc, e * time_per_epoch, 0, 1)], seed,
                  **config)


@pytest.fixture
def sweep(tmp_path):
    # baseline: standard 80/85/90, cyclic 79/86/89 -> gaps -1, +1, -1
    standard(tmp_path, [], [(2, 80), (4, 85), (8, 90)])
    write_run(tmp_path, "cyc_base", "cyclic", [], cyclic_rows([79, 86, 89], [2.2, 4.4, 8.8], mid=91))
    # mixup: standard 81/87/93 (improvements 1, 2, 3), cyclic 80/88/91 (improvements 1, 2, 2), two seeds for standard
    standard(tmp_path, ["mixup"], [(2, 80), (4, 86), (8, 92)], seed=0)
    standard(tmp_path, ["mixup"], [(2, 82), (4, 88), (8, 94)], seed=1)
    write_run(tmp_path, "cyc_mx", "cyclic", ["mixup"], cyclic_rows([80, 88, 91], [2, 4, 8]))
    return tmp_path


def read_csv(path):
    with open(path) as f:
        return {r["methods"]: r for r in csv.DictReader(f)}


def test_gaps_correlation_and_times_equal_hand_computation(sweep, tmp_path):
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out), "--metric", "final"])
    gaps = read_csv(out / "gaps.csv")
    b, m = gaps["baseline"], gaps["mixup"]
    assert int(b["n_points"]) == 3
    assert float(b["mean_gap_pp"]) == pytest.approx((-1 + 1 - 1) / 3)
    assert float(b["max_abs_gap_pp"]) == pytest.approx(1)
    assert b["improvement_corr"] == ""
    assert float(b["standard_time_s"]) == pytest.approx(2 + 4 + 8)
    assert float(b["cyclic_time_s"]) == pytest.approx(8.8)
    assert float(b["time_ratio"]) == pytest.approx(14 / 8.8)
    assert float(m["mean_gap_pp"]) == pytest.approx(((80 - 81) + (88 - 87) + (91 - 93)) / 3)
    assert m["per_run_abs_gap_pp"] == ""  # standard seeds 0, 1 against cyclic seed 0: no run-by-run pairs
    xs, ys = [1, 2, 3], [1, 2, 2]  # method - baseline on the standard and on the cyclic curves
    mx, my = 2, 5 / 3
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(
        sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert float(m["improvement_corr"]) == pytest.approx(r)
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    mx8 = [c for c in curves if c["methods"] == "mixup" and c["schedule"] == "standard" and float(c["epochs"]) == 8][0]
    assert int(mx8["n"]) == 2 and float(mx8["acc_mean"]) == 93 and float(mx8["acc_std"]) == pytest.approx(math.sqrt(2))


def test_metric_max_takes_the_maximum_within_a_cycle_not_the_run(sweep, tmp_path):
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out), "--metric", "max"])
    with open(out / "curves.csv") as f:
        cyc = {float(c["epochs"]): float(c["acc_mean"]) for c in csv.DictReader(f)
               if c["methods"] == "baseline" and c["schedule"] == "cyclic"}
    assert cyc == {2: 79, 4: 86, 8: 91}  # the mid-cycle 91 counts for cycle 2 only


def test_min_epochs_and_unmatched_budgets(sweep, tmp_path, capsys):
    write_run(sweep, "std_base_6", "standard", [], [(6, 88, 6, 0, 1)])  # no cyclic point within 5 % of 6
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out), "--min-epochs", "3"])
    assert int(read_csv(out / "gaps.csv")["baseline"]["n_points"]) == 2
    assert "unmatched budget: baseline standard at 6 epochs" in capsys.readouterr().out


def test_partial_malformed_and_one_sided_runs(sweep, tmp_path, capsys):
    write_run(sweep, "unfinished", "cyclic", ["blurpool"], cyclic_rows([1, 2, 3], [1, 2, 3]), done=False)
    bad = write_run(sweep, "bad", "standard", [], [(8, 50, 8, 0, 1)])
    (bad / "metrics.csv").write_text("epoch,step\n1,2\n")
    bad2 = write_run(sweep, "bad2", "standard", [], [(8, 50.5, 8, 0, 1)])
    (bad2 / "metrics.csv").write_text((bad2 / "metrics.csv").read_text().replace(",50.5,", ",abc,"))
    empty = write_run(sweep, "empty", "standard", [], [(8, 50, 8, 0, 1)])
    empty.joinpath("metrics.csv").write_text(",".join(COLS) + "\n")
    standard(sweep, ["label_smoothing"], [(4, 70)])
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out)])
    err = capsys.readouterr().err
    assert "unfinished" in err and "--include-partial" in err
    assert "bad/metrics.csv: missing column" in err and "bad2/metrics.csv:2: column val_acc1" in err
    assert "empty/metrics.csv: no rows" in err
    gaps = read_csv(out / "gaps.csv")
    assert "blurpool" not in gaps and gaps["label_smoothing"]["note"] == "no cyclic runs"
    assert float(gaps["baseline"]["mean_gap_pp"]) == pytest.approx(1 / 3)  # metric max; the bad runs did not count
    compare.main([str(sweep), "--out", str(out), "--include-partial"])
    assert read_csv(out / "gaps.csv")["blurpool"]["note"] == "no standard runs"


def test_report_writes_every_figure_and_links_them(sweep, tmp_path, monkeypatch):
    import matplotlib.image
    write_run(sweep, "const_base", "constant", [], [(2, 78, 2, 0, 1), (3, 80, 3, 1, 1), (4, 81, 4, 2, 1)])
    drawn, real_save = {}, report.save

    def keep(fig, out, name):
        drawn[name] = [[(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines] for ax in fig.axes]
        return real_save(fig, out, name)
    monkeypatch.setattr(report, "save", keep)
    out = tmp_path / "rep"
    report.main([str(sweep), "--out", str(out)])
    md = (out / "report.md").read_text()
    for fig in ("fig1_schedules", "fig2_total_time", "fig3_tradeoff", "fig4_improvement", "fig5_constant",
                "fig6_ordering", "fig7_gap_per_budget", "fig8_fidelity_cost", "fig9_estimator_gaps"):
        assert (out / f"{fig}.pdf").stat().st_size > 1000, fig
        pixels = matplotlib.image.imread(out / f"{fig}.png")[..., :3]
        assert (pixels < 0.9).any(axis=-1).mean() > 0.01, fig  # ink on the canvas, not a blank figure
        assert f"]({fig}.png)" in md
    assert "| mixup |" in md and (out / "gaps.csv").exists()
    # the tradeoff figure's first panel draws every curve of curves.csv: its points, time against mean accuracy
    panel = set(drawn["fig3_tradeoff"][0])
    for (m, sched), pts in itertools.groupby(sorted((r["methods"], r["schedule"], float(r["time_mean"]),
                                                     float(r["acc_mean"])) for r in read_rows(out / "curves.csv")
                                                    if r["schedule"] in ("standard", "cyclic")),
                                             key=lambda r: r[:2]):
        xs, ys = zip(*sorted((t, a) for _, _, t, a in pts))
        assert any(len(line[0]) == len(xs) and sorted(zip(*line)) == pytest.approx(sorted(zip(xs, ys)), rel=1e-9)
                   for line in panel), (m, sched)


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no readable finished runs"):
        compare.main([str(tmp_path), "--out", str(tmp_path / "o")])


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def seeded(root, methods, std_accs, cyc_accs, seed, **config):
    """A standard run per budget 2, 4, 8 and a cyclic run, all of one seed (metric final reads these accuracies)."""
    standard(root, methods, zip((2, 4, 8), std_accs), seed=seed, **config)
    write_run(root, f"cyc_{'+'.join(methods) or 'base'}_s{seed}", "cyclic", methods,
              cyclic_rows(cyc_accs, [2, 4, 8]), seed, **config)


def test_one_seed_gives_no_ci_and_equal_seeds_a_zero_width_one(tmp_path, capsys):
    for seed in (0, 1):  # baseline: two seeds with equal accuracies
        seeded(tmp_path, [], [80, 85, 90], [79, 86, 89], seed)
    seeded(tmp_path, ["mixup"], [81, 87, 93], [80, 88, 91], 0)  # one seed
    out = tmp_path / "rep"
    report.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    gaps = read_csv(out / "gaps.csv")
    b, m = gaps["baseline"], gaps["mixup"]
    assert float(b["mean_gap_lo"]) == float(b["mean_gap_hi"]) == pytest.approx(-1 / 3)
    assert (b["n_seeds"], b["pairing"], b["resolved"]) == ("2", "paired", "true")
    assert m["mean_gap_lo"] == m["mean_gap_hi"] == m["resolved"] == "" and m["n_seeds"] == "1"
    assert "1 seed at some budget: no CI" in m["note"]
    points = {(p["methods"], float(p["budget"])): p for p in read_rows(out / "points.csv")}
    assert float(points[("mixup", 8)]["gap_pp"]) == -2 and points[("mixup", 8)]["gap_lo"] == ""
    assert points[("baseline", 4)]["gap_lo"] == points[("baseline", 4)]["gap_hi"] == "1"
    md = (out / "report.md").read_text()
    assert "- No CI (a budget with one seed on a curve): mixup (-0.67)." in md
    assert "| baseline | 2 4 8 | 2 | -0.33 [-0.33, -0.33] | yes |" in md


def test_a_true_gap_is_resolved_and_noise_around_zero_is_not(tmp_path):
    offsets = [0.0, 2.0, -1.5]  # seed effects larger than the gaps: only pairing by seed resolves them
    for seed, off, eps, noise in zip((0, 1, 2), offsets, (0.05, -0.05, 0.0), (1.0, -1.0, 0.5)):
        std = [80 + off, 85 + off, 90 + off]
        seeded(tmp_path, [], std, [a + 1 + eps for a in std], seed)
        seeded(tmp_path, ["mixup"], std, [a + noise for a in std], seed)
    out = tmp_path / "rep"
    report.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    gaps = read_csv(out / "gaps.csv")
    b, m = gaps["baseline"], gaps["mixup"]
    assert float(b["mean_gap_pp"]) == pytest.approx(1) and b["resolved"] == "true"
    half = 4.303 * 0.05 / 3 ** 0.5  # per-seed gaps 1.05, 0.95, 1.00: t(2) x sd / sqrt(3), by hand
    assert float(b["mean_gap_lo"]) == pytest.approx(1 - half, abs=0.01)
    assert float(b["mean_gap_hi"]) == pytest.approx(1 + half, abs=0.01)
    assert float(m["mean_gap_pp"]) == pytest.approx(0.5 / 3) and m["resolved"] == "false"
    sd = (sum((g - 0.5 / 3) ** 2 for g in (1.0, -1.0, 0.5)) / 2) ** 0.5  # per-seed gaps 1, -1, 0.5
    assert (float(m["mean_gap_lo"]), float(m["mean_gap_hi"])) == pytest.approx(
        (0.5 / 3 - 4.303 * sd / 3 ** 0.5, 0.5 / 3 + 4.303 * sd / 3 ** 0.5), abs=0.02)
    # mixup's mean |gap| (|mean gap| 1/6 at every budget) has a t interval reaching below 0: cut at 0
    assert float(m["mean_abs_gap_pp"]) == pytest.approx(0.5 / 3)
    assert float(m["mean_abs_gap_lo"]) == 0.0 < float(m["mean_abs_gap_pp"]) < float(m["mean_abs_gap_hi"])
    # one run at a time the seeds do not cancel: per-run |gap| 1, 1, 0.5 (mixup), 1.05, 0.95, 1.00 (baseline)
    assert float(m["per_run_abs_gap_pp"]) == pytest.approx(2.5 / 3)
    sd = (sum((g - 2.5 / 3) ** 2 for g in (1.0, 1.0, 0.5)) / 2) ** 0.5
    assert float(m["per_run_abs_gap_hi"]) == pytest.approx(2.5 / 3 + 4.303 * sd / 3 ** 0.5, abs=0.01)
    assert float(b["per_run_abs_gap_pp"]) == pytest.approx(1.0)
    # fig8 pools the two sets: per seed the mean of its two runs' |gap|, then a t interval over the 3 seeds
    f = report.fidelity_points(compare.analyse_runs(runs.load_runs([str(tmp_path)]), "final").rows("estimators.csv"))
    assert (f["cyclic"].gap, f["cyclic"].run_gap) == pytest.approx(((1 + 0.5 / 3) / 2, (1 + 2.5 / 3) / 2))
    per_seed = [(1.05 + 1) / 2, (0.95 + 1) / 2, (1 + 0.5) / 2]
    sd = (sum((g - (1 + 2.5 / 3) / 2) ** 2 for g in per_seed) / 2) ** 0.5
    assert f["cyclic"].run_ci == pytest.approx(((1 + 2.5 / 3) / 2 - 4.303 * sd / 3 ** 0.5,
                                                (1 + 2.5 / 3) / 2 + 4.303 * sd / 3 ** 0.5), abs=0.01)
    md = (out / "report.md").read_text()
    assert "- Resolved (95 % CI excludes 0): baseline (+1.00)." in md
    assert "- Not resolved (CI includes 0): mixup (+0.17)." in md


def test_runs_that_differ_in_a_result_option_are_never_averaged(tmp_path, capsys):
    for seed in (0, 1):
        seeded(tmp_path, [], [80 + seed, 85, 90], [79, 86, 89], seed)
    standard(tmp_path / "lr", [], [(8, 50)], lr=0.2)
    odd = write_run(tmp_path, "no_lr_key", "standard", [], [(8, 40, 8, 0, 1)])
    cfg = json.loads((odd / "config.json").read_text())
    del cfg["lr"]  # an old hand-written config: the missing key is a value of its own
    (odd / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    assert "3 groups of runs differ in result-defining options" in capsys.readouterr().out
    std8 = {c["group"]: c for c in read_rows(out / "curves.csv") if c["schedule"] == "standard" and c["epochs"] == "8"}
    assert {g: (float(c["acc_mean"]), int(c["n"])) for g, c in std8.items()} == {
        "lr=0.1": (90, 2), "lr=0.2": (50, 1), "lr=None": (40, 1)}
    gaps = {r["group"]: r for r in read_rows(out / "gaps.csv")}
    assert float(gaps["lr=0.1"]["mean_gap_pp"]) == pytest.approx((-1.5 + 1 - 1) / 3)
    assert gaps["lr=0.2"]["note"] == "no cyclic runs"


def test_method_strengths_are_separate_method_sets(tmp_path):
    seeded(tmp_path, [], [80, 85, 90], [79, 86, 89], 0, mixup=0.0)
    seeded(tmp_path, ["mixup"], [81, 87, 93], [80, 88, 91], 0, mixup=0.2)
    seeded(tmp_path / "strong", ["mixup"], [70, 75, 80], [70, 75, 80], 0, mixup=0.4)
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    gaps = read_csv(out / "gaps.csv")
    # runs from before the method API: a non-default strength is in the name, as the API writes it
    assert list(gaps) == ["baseline", "mixup", "mixup:alpha=0.4"]
    assert float(gaps["mixup:alpha=0.4"]["mean_gap_pp"]) == 0 and gaps["baseline"]["group"] == ""


@pytest.mark.parametrize("file,content,message", [
    ("config.json", b"\x89PNG\r\n\x1a\n\xff\xfe", "config.json:1: not UTF-8 text (byte 0x89)"),
    ("config.json", b"null", "config.json: holds NoneType, not an object of options"),
    ("config.json", b'{"schedule": "standard", "methods": 5, "epochs": 8}', "'methods' must be a list of names, not 5"),
    ("config.json", b'{"schedule": "standard", "methods": [], "epochs": "8"}',
     "'epochs' must be a finite number, not '8'"),
    ("metrics.csv", ",".join(COLS).encode() + b"\n8,32,0.01,1,1,9\xff,99,8,0,1\n", "metrics.csv:2: not UTF-8 text"),
])
def test_a_damaged_run_is_skipped_with_its_file_named(sweep, tmp_path, capsys, file, content, message):
    bad = write_run(sweep, "damaged", "standard", [], [(8, 10, 8, 0, 1)])
    (bad / file).write_bytes(content)
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out)])
    err = capsys.readouterr().err
    assert f"skipped: {bad / file}" in err and message in err
    assert float(read_csv(out / "gaps.csv")["baseline"]["mean_gap_pp"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("damage,message", [
    (dict(t0=None), None),  # a hand-written config without t0: the figure draws the logged LR instead
    (dict(lr="0.1"), "'lr' must be a finite number, not '0.1'"),
    (dict(lr={"peak": 0.1}), "'lr' must be a finite number, not {'peak': 0.1}"),
    (dict(steps_per_epoch=[4]), "'steps_per_epoch' must be a finite number, not [4]"),
])
def test_report_skips_a_run_whose_config_the_figures_cannot_use(sweep, tmp_path, capsys, damage, message):
    # the schedule figure draws the longest baseline run's LR from its config: make that run the damaged one
    bad = write_run(sweep, "damaged", "standard", [], [(8, 10, 8, 0, 0), (16, 10, 16, 0, 1)])
    config = json.loads((bad / "config.json").read_text())
    config.update(damage)
    (bad / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    out = tmp_path / "out"
    report.main([str(sweep), "--out", str(out)])
    err = capsys.readouterr().err
    assert (f"skipped: {bad / 'config.json'}: {message}" in err) if message else "skipped" not in err
    assert f"{11 if message else 12} runs from" in (out / "report.md").read_text()  # the sweep's 11, + the odd one
    assert (out / "fig1_schedules.png").exists()


def test_cut_rows_and_nan_accuracies_cost_only_their_points(sweep, tmp_path, capsys):
    header = ",".join(COLS) + "\n"
    done = write_run(sweep, "cut_done", "standard", ["blurpool"], [(8, 50, 8, 0, 1)])
    (done / "metrics.csv").write_text(header + "4,16,0.01,1,1,40,99,4,0,0\n8,32,0.0")
    live = write_run(sweep, "cut_live", "cyclic", ["label_smoothing"], cyclic_rows([70, 75, 80], [2, 4, 8]), done=False)
    (live / "metrics.csv").write_text((live / "metrics.csv").read_text().rsplit("\n", 2)[0] + "\n8,32,0.0")
    nan = write_run(sweep, "diverged", "cyclic", ["mixup"], cyclic_rows([80, float("nan"), 91], [2, 4, 8]), seed=1)
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out), "--include-partial", "--metric", "final"])
    err = capsys.readouterr().err
    assert f"skipped: {done / 'metrics.csv'}:3: last row cut short, yet the run is marked done" in err
    assert f"{live / 'metrics.csv'}:5: last row cut short (run still being written?), ignored" in err
    assert f"{nan / 'metrics.csv'}: val_acc1 is not a finite number at epoch(s) 4; those points left out" in err
    cyc = {(c["methods"], float(c["epochs"])): c for c in read_rows(out / "curves.csv") if c["schedule"] == "cyclic"}
    assert float(cyc[("label_smoothing", 4)]["acc_mean"]) == 75 and ("label_smoothing", 8) not in cyc
    assert (int(cyc[("mixup", 4)]["n"]), int(cyc[("mixup", 8)]["n"])) == (1, 2)
    assert "blurpool" not in read_csv(out / "gaps.csv")


def test_a_cell_outside_its_range_costs_its_row_with_one_line(sweep, tmp_path, capsys):
    """val_acc1 1e9 was averaged into curves.csv (acc_mean 500000005.6) without a word: a cell outside its column's
    range (accuracy in [0, 100], losses and times >= 0) now leaves its row out, as a non-finite accuracy does, with
    one line naming the file, the row's line and the column. Empty cells and a diverged run's NaN losses stay legal."""
    huge = write_run(sweep, "huge", "cyclic", ["mixup"], cyclic_rows([80, 1e9, 91], [2, 4, 8]), seed=1)
    peak = write_run(sweep, "peak", "cyclic", ["mixup"], cyclic_rows([82, 90, 93], [2, 4, 8], mid=1e9), seed=2)
    late = write_run(sweep, "late", "standard", ["mixup"], [(4, 40, 2, 0, 0), (8, 95, -8, 0, 1)], seed=2)
    loss = write_run(sweep, "loss", "standard", [], [(2, 30, 1, 0, 0), (4, 99, 4, 0, 1)], seed=1)
    text = (loss / "metrics.csv").read_text().splitlines()
    (loss / "metrics.csv").write_text("\n".join(text[:-1] + [text[-1].replace(",1.0,1.0,", ",1.0,-1,")]) + "\n")
    legal = write_run(sweep, "legal", "cyclic", [], cyclic_rows([81, 84, 90], [2, 4, 8]), seed=1)
    text = (legal / "metrics.csv").read_text().splitlines()  # no train loss, no top-5; a method's negative training
    text[2], text[3], text[-1] = text[2].replace(",1.0,1.0,", ",,1.0,").replace(",99.0,", ",,"), \
        text[3].replace(",1.0,1.0,", ",-0.12,1.0,"), text[-1].replace(",1.0,1.0,", ",nan,nan,")  # loss; diverged
    (legal / "metrics.csv").write_text("\n".join(text) + "\n")
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out), "--metric", "max"])
    err = capsys.readouterr().err
    for run, line, column, cell in ((huge, 4, "val_acc1", "1000000000.0"), (peak, 5, "val_acc1", "1000000000.0"),
                                    (late, 3, "train_time_s", "-8"), (loss, 3, "val_loss", "-1")):
        told = [x for x in err.splitlines() if str(run / "metrics.csv") in x]
        assert told == [f"warning: {run / 'metrics.csv'}:{line}: column {column} is '{cell}', outside "
                        f"[0, {100 if column == 'val_acc1' else 'inf'}]; that row is left out (no curve point)"], err
    assert str(legal) not in err
    curves = {(c["methods"], c["schedule"], float(c["epochs"])): (int(c["n"]), float(c["acc_mean"]))
              for c in read_rows(out / "curves.csv")}
    assert curves[("mixup", "cyclic", 4)] == (2, 89)  # cyc_mx's 88 and peak's 90; huge's point left out
    assert curves[("mixup", "cyclic", 8)] == (3, pytest.approx(275 / 3))  # peak's 93, not its 1e9 mid-cycle
    assert curves[("mixup", "standard", 8)] == (2, 93)  # late's point left out
    assert curves[("baseline", "standard", 4)] == (1, 85)  # loss's point left out
    assert curves[("baseline", "cyclic", 8)] == (2, pytest.approx(90.5))  # legal's cells all read (91 is a peak)


def test_improvement_figure_data_has_the_sign_of_method_minus_baseline(sweep):
    cmap = runs.curves(runs.load_runs([str(sweep)]), "final")[""]
    data = report.improvement_plot_data(cmap, ["baseline", "mixup"])
    assert set(data) == {("mixup", "standard"), ("mixup", "cyclic")}
    budgets, diffs, lo, hi = data[("mixup", "standard")]
    assert budgets == [2, 4, 8] and diffs == pytest.approx([1, 2, 3])  # mixup 81/87/93 (2 seeds) vs 80/85/90
    assert lo == [None] * 3  # the baseline has one seed
    assert data[("mixup", "cyclic")][1] == pytest.approx([1, 2, 2])
    gap = report.gap_plot_data([compare_one(cmap, "mixup", "cyclic")])
    assert gap[("mixup", "cyclic")][1] == pytest.approx([80 - 81, 88 - 87, 91 - 93])


def test_ranking_names_the_pairs_that_swap(tmp_path):
    seeded(tmp_path, [], [80, 85, 90], [80, 85, 90], 0)
    seeded(tmp_path, ["mixup"], [81, 87, 93], [81, 86, 92], 0)
    seeded(tmp_path, ["blurpool"], [79, 86, 91], [79, 87, 91], 0)
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    rank = {r["budget"]: r for r in read_rows(out / "ranking.csv")}
    assert list(rank) == ["2", "4", "8", "overall"]
    r4 = rank["4"]
    assert r4["standard_order"] == "mixup > blurpool > baseline"
    assert r4["estimator_order"] == "blurpool > mixup > baseline"
    assert (float(r4["kendall_tau"]), r4["discordant_pairs"], r4["swaps"]) == (pytest.approx(1 / 3), "1",
                                                                               "blurpool <> mixup")
    assert (float(rank["overall"]["kendall_tau"]), rank["overall"]["swaps"]) == (1, "")


def test_a_swap_is_separated_only_where_the_standard_curve_tells_the_sets_apart(tmp_path):
    """5 seeds (written in another order per set); standard: mixup +1.0 over the baseline (tiny noise), blurpool
    -0.1 (+-0.5 noise), ema +4 with one seed; the cyclic curve reverses every pair. mixup's swaps are separated
    (its CI excludes 0), blurpool <> baseline is not, ema's have no CI. mixup's seed 4 misses budget 4: that costs
    seed 4 at budget 4 and in the overall row, not the pairing by seed (which cancels the seeds' offsets of 1 pp)."""
    noise = {0: 0.5, 1: -0.5, 2: 0.4, 3: -0.4, 4: 0.0}
    base = {seed: [80 + seed, 85 + seed, 90 + seed] for seed in range(5)}
    for seed in range(5):
        seeded(tmp_path, [], base[seed], base[seed], seed)
    for seed in (4, 2, 0, 3, 1):
        seeded(tmp_path, ["mixup"], [a + 1 + 0.01 * (seed - 2) for a in base[seed]],
               [a - 0.5 for a in base[seed]], seed)
        seeded(tmp_path, ["blurpool"], [a - 0.1 + noise[seed] for a in base[seed]], [a + 0.5 for a in base[seed]],
               seed)
    seeded(tmp_path, ["ema"], [a + 4 for a in base[0]], [a - 1 for a in base[0]], 0)
    for f in tmp_path.glob("std_mixup_4_s4/*"):
        f.unlink()
    (tmp_path / "std_mixup_4_s4").rmdir()
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    rank = {r["budget"]: r for r in read_rows(out / "ranking.csv")}
    for budget in ("2", "4", "8", "overall"):
        r = rank[budget]
        assert (r["standard_order"], r["estimator_order"]) == ("ema > mixup > baseline > blurpool",
                                                               "blurpool > baseline > mixup > ema")
        assert (r["discordant_pairs"], r["swaps_standard_separates"], r["swaps_without_ci"]) == ("6", "2", "3")
        diffs = {}
        for entry in r["swap_standard_diffs"].split("; "):
            a, rest = entry.split(" - ")
            b, rest = rest.split(" ", 1)
            sign = 1 if (a, b) in (("mixup", "baseline"), ("mixup", "blurpool"), ("baseline", "blurpool")) else -1
            if "ema" in (a, b):
                assert rest.endswith("no CI (1 seeds, independent)")
                continue
            d, lo, hi, seeds = re.fullmatch(r"(\S+) \[(\S+), (\S+)\] \((\d) seeds, paired\)", rest).groups()
            d, lo, hi = float(d), float(lo), float(hi)
            diffs[frozenset((a, b))] = (sign * d, lo <= d <= hi, lo > 0 or hi < 0, int(seeds))
        n_mixup = 4 if budget in ("4", "overall") else 5
        assert diffs == {frozenset(("mixup", "baseline")): (pytest.approx(1.0, abs=0.02), True, True, n_mixup),
                         frozenset(("mixup", "blurpool")): (pytest.approx(1.1, abs=0.15), True, True, n_mixup),
                         frozenset(("baseline", "blurpool")): (pytest.approx(0.1, abs=0.01), True, False, 5)}


def test_estimators_read_their_own_rows_and_cost_from_curve_cost(sweep, tmp_path, capsys):
    # wsd: branch ends at 2, 4, 8 interleaved with trunk rows; the trunk's 95 must not count for any point
    write_run(sweep, "wsd_base", "wsd", [], [(1, 60, 1, 0, 0, 1), (2, 78, 2.5, 0, 1, 2.5), (3, 95, 3, 0, 0, 3),
                                             (4, 84, 4.5, 0, 1, 5.5), (8, 89, 8.5, 0, 1, 11)])
    write_run(sweep, "sf_base", "schedule-free", [], [(2, 81, 2, 0, 1), (4, 86, 4, 0, 1), (8, 90.5, 8, 0, 1)])
    write_run(sweep, "odd_base", "lion-magic", [], [(2, 80, 2, 0, 1), (8, 90, 8, 0, 1)])
    out = tmp_path / "rep"
    report.main([str(sweep), "--out", str(out)])
    assert "unknown schedule 'lion-magic' (1 runs" in capsys.readouterr().err
    est = {(r["methods"], r["estimator"]): r for r in read_rows(out / "estimators.csv")}
    assert list(est) == [("baseline", "cyclic"), ("baseline", "wsd"), ("baseline", "schedule-free"),
                         ("baseline", "lion-magic"), ("mixup", "cyclic"),  # then the calibrated cyclic curves
                         ("baseline", "baseline-calibrated"), ("mixup", "baseline-calibrated")]
    wsd, sf = est[("baseline", "wsd")], est[("baseline", "schedule-free")]
    assert float(wsd["mean_gap_pp"]) == pytest.approx(-4 / 3) and float(wsd["max_abs_gap_pp"]) == 2
    assert (float(wsd["cyclic_time_s"]), float(wsd["standard_time_s"])) == (11, 14)
    assert float(wsd["time_ratio"]) == pytest.approx(14 / 11)
    assert float(sf["cyclic_time_s"]) == 8 and float(sf["mean_gap_pp"]) == pytest.approx(2.5 / 3)
    assert {r["methods"] for r in read_rows(out / "gaps.csv")} == {"baseline", "mixup"}
    fidelity = report.fidelity_points(compare.analyse_runs(runs.load_runs([str(sweep)])).rows("estimators.csv"))
    assert fidelity["wsd"][:2] == pytest.approx((11 / 14, 4 / 3))
    # cyclic over baseline only, the set every estimator has (mixup's |gap| 4/3 would move it to 7/6)
    assert fidelity["cyclic"][:2] == pytest.approx((8.8 / 14, 1))
    assert (out / "fig8_fidelity_cost.png").stat().st_size > 1000
    assert "## One-run estimators against the standard curve" in (out / "report.md").read_text()


def test_fits_refuse_short_curves_with_a_note(sweep, tmp_path):
    standard(sweep, ["label_smoothing"], [(4, 70)])
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out), "--x", "epochs"])
    fits = {(r["methods"], r["schedule"]): r for r in read_rows(out / "fits.csv")}
    assert fits[("label_smoothing", "standard")]["note"] == "not fitted: needs 3+ points at distinct budgets, has 1"
    base = fits[("baseline", "cyclic")]  # 3 points for 3 parameters: the curve passes through them, no fit
    assert base["x"] == "epochs" and base["dof"] == "0" and "exact, not a fit" in base["note"]
    assert base["rmse_pp"] == base["mean_fitted_gap_pp"] == base["range_lo"] == base["a_lo"] == ""
    std = fits[("baseline", "standard")]
    assert (std["dof"], std["rmse_pp"], std["note"]) == ("0", "", "exact, not a fit: 3 points for 3 parameters")


def test_a_schedule_run_with_other_options_is_another_curve(sweep, tmp_path):
    rows = [(2, 78, 2, 0, 1, 2), (4, 84, 4, 1, 1, 6), (8, 89, 8, 2, 1, 14)]
    write_run(sweep, "wsd_a", "wsd", [], rows, cooldown_frac=0.2, cooldown_shape="1-sqrt")
    write_run(sweep, "wsd_b", "wsd", [], [(e, a + 1, t, c, 1, k) for e, a, t, c, _, k in rows], cooldown_frac=0.4,
              cooldown_shape="1-sqrt")
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out), "--metric", "final"])
    est = {(r["methods"], r["estimator"]): r for r in read_rows(out / "estimators.csv")}
    assert float(est[("baseline", "wsd (cooldown_frac=0.2)")]["mean_gap_pp"]) == pytest.approx(-4 / 3)
    assert float(est[("baseline", "wsd (cooldown_frac=0.4)")]["mean_gap_pp"]) == pytest.approx(-1 / 3)
    assert est[("baseline", "wsd (cooldown_frac=0.4)")]["cyclic_time_s"] == "14"


def test_a_copied_run_is_not_another_seed_and_other_hardware_is_another_group(tmp_path, capsys):
    """The same seed twice (a run copied to another folder) counts once, with a warning naming both; runs on other
    hardware or world sizes are compared apart (their time axes and BatchNorm batches differ)."""
    for seed in (0, 1):
        seeded(tmp_path / "a", [], [80 + seed, 85, 90], [79, 86, 89], seed)
    seeded(tmp_path / "copy", [], [80, 85, 90], [79, 86, 89], 0)
    standard(tmp_path / "gpu", [], [(8, 91)], device="cuda")
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    err = capsys.readouterr().err
    assert "seed 0 of baseline standard at 8 epochs appears twice" in err and "/copy/" in err
    curves = read_rows(out / "curves.csv")
    std8 = [c for c in curves if c["schedule"] == "standard" and c["epochs"] == "8"]
    assert sorted((c["acc_mean"], c["n"]) for c in std8) == [("90", "2"), ("91", "1")]


def test_complete_seeds_compares_an_unfinished_sweep_over_the_seeds_both_curves_have(tmp_path, capsys):
    seeded(tmp_path, [], [80, 85, 90], [79, 86, 89], 0)  # per-seed gaps -1, +1, -1
    seeded(tmp_path, [], [82, 87, 92], [82, 87, 92], 1)  # 0, 0, 0
    write_run(tmp_path, "cyc_base_s2", "cyclic", [], cyclic_rows([70, 70, 70], [2, 4, 8]), 2)  # no standard runs yet
    write_run(tmp_path, "wsd_base_s0", "wsd", [], [(8, 90, 8, 0, 1)], 0)  # a one-seed ablation: drops nobody
    # mixup: seed 1's 8-epoch run says 8.0000001 epochs, the same budget; seed 2 is as far as seed 1
    standard(tmp_path, ["mixup"], [(2, 81), (4, 86), (8, 91)], seed=0)
    standard(tmp_path, ["mixup"], [(2, 81), (4, 86)], seed=1)
    write_run(tmp_path, "std_mx_8_s1", "standard", ["mixup"], [(8.0000001, 91, 8, 0, 1)], 1)
    # label smoothing: seed 0 lacks the 8-epoch run and seed 1 the 4-epoch one, so no seed is complete
    standard(tmp_path, ["label_smoothing"], [(2, 81), (4, 86)], seed=0)
    standard(tmp_path, ["label_smoothing"], [(2, 81), (8, 91)], seed=1)
    loose, paired = tmp_path / "loose", tmp_path / "paired"
    compare.main([str(tmp_path), "--out", str(loose), "--metric", "final"])
    assert "left out" not in capsys.readouterr().out
    b = read_csv(loose / "gaps.csv")["baseline"]
    # without --complete-seeds too, the gap is read over the seeds both curves hold: not cyclic means 77, 81, 83.67
    # of three seeds against standard ones of two, 81, 86, 91
    assert (b["pairing"], b["n_seeds"]) == ("paired", "2") and float(b["mean_gap_pp"]) == pytest.approx(-1 / 6)
    assert "paired over the seeds both curves hold at each budget (2 of 3 seeds)" in b["note"]
    report.main([str(tmp_path), "--out", str(paired), "--metric", "final", "--complete-seeds"])
    out, err = capsys.readouterr()
    assert "no seed of label_smoothing has every run the others have; all its seeds are kept" in err
    b = read_csv(paired / "gaps.csv")["baseline"]
    assert (b["pairing"], b["n_seeds"]) == ("paired", "2")
    assert float(b["mean_gap_pp"]) == pytest.approx(-1 / 6)  # seeds 0 and 1: (-1 + 1 - 1) / 3 / 2
    assert float(b["per_run_abs_gap_pp"]) == pytest.approx(0.5)  # seed 0: 1, seed 1: 0
    left_out = [line for line in (paired / "report.md").read_text().splitlines() if "left out" in line]
    assert left_out == ["- left out (--complete-seeds): baseline seed 2, which lacks standard 2, standard 4, "
                        "standard 8"]
    std = [(c["methods"], float(c["epochs"]), int(c["n"])) for c in read_rows(paired / "curves.csv")
           if c["schedule"] == "standard"]
    assert ("mixup", 8.0, 2) in std and ("label_smoothing", 2.0, 2) in std
    assert [c["n"] for c in read_rows(paired / "curves.csv") if c["schedule"] == "wsd"] == ["1"]


def test_curves_with_extra_seeds_on_one_side_are_compared_over_the_seeds_both_hold(tmp_path):
    """A set with fewer seeds than the baseline, or an estimator run for extra seeds whose standard runs are not
    there, is compared seed by seed over the seeds both curves hold, not as two unpaired means."""
    seeded(tmp_path, [], [80, 85, 90], [79, 86, 89], 0)
    seeded(tmp_path, [], [82, 87, 92], [82, 87, 92], 1)
    seeded(tmp_path, [], [60, 70, 50], [60, 50, 70], 2)  # the baseline's seed 2: far off, unlike on its two curves
    seeded(tmp_path, ["mixup"], [81, 86, 91], [80, 87, 90], 0)  # gaps -1, +1, -1; +1 over the baseline's standard
    seeded(tmp_path, ["mixup"], [83, 89, 95], [83, 89, 95], 1)  # gaps 0; +1, +2, +3 over the baseline's standard
    write_run(tmp_path, "cyc_mixup_s3", "cyclic", ["mixup"], cyclic_rows([50, 50, 50], [20, 40, 80]), 3)  # slow
    standard(tmp_path, ["mixup"], [(4, 10)], seed=4)  # a standard run of a seed without a cyclic run
    compare.main([str(tmp_path), "--out", str(tmp_path / "out"), "--metric", "final"])
    mx = read_csv(tmp_path / "out" / "gaps.csv")["mixup"]
    assert (mx["pairing"], mx["n_seeds"]) == ("paired", "2") and float(mx["mean_gap_pp"]) == pytest.approx(-1 / 6)
    assert float(mx["per_run_abs_gap_pp"]) == pytest.approx(0.5)  # seed 0: 1, seed 1: 0
    assert float(mx["time_ratio"]) == pytest.approx(14 / 8)  # 2 + 4 + 8 s of standard runs per 8 s cyclic run
    assert float(mx["improvement_corr"]) == pytest.approx(1.0)  # improvements 1, 1.5, 2 on both curves
    assert "paired over the seeds both curves hold at each budget (2 of 4 seeds)" in mx["note"]
    points = {float(p["budget"]): p for p in read_rows(tmp_path / "out" / "points.csv") if p["methods"] == "mixup"}
    assert (float(points[4]["gap_pp"]), points[4]["cyclic_n"], points[4]["standard_n"]) == (0.5, "2", "2")
    base = read_csv(tmp_path / "out" / "gaps.csv")["baseline"]  # its three seeds agree: untouched
    assert (base["pairing"], base["n_seeds"], base["note"]) == ("paired", "3", "")
    improvement = {float(r["budget"]): r for r in read_rows(tmp_path / "out" / "improvement.csv")
                   if r["methods"] == "mixup" and r["schedule"] == "standard"}  # mixup - baseline, seeds 0 and 1
    assert [float(improvement[b]["improvement_pp"]) for b in (2, 4, 8)] == [1, 1.5, 2]
    assert (improvement[2]["n"], improvement[2]["n_baseline"], improvement[2]["pairing"]) == ("2", "2", "paired")
    assert float(improvement[2]["lo"]) == float(improvement[2]["hi"]) == 1


def test_a_time_ratio_interval_never_reaches_below_zero(tmp_path):
    for seed, per_epoch in ((0, 1.0), (1, 10.0)):  # standard runs 10x slower in seed 1: ratios 1.75 and 17.5
        standard(tmp_path, [], [(2, 80), (4, 85), (8, 90)], seed=seed, time_per_epoch=per_epoch)
        write_run(tmp_path, f"cyc_s{seed}", "cyclic", [], cyclic_rows([79, 86, 89], [2, 4, 8]), seed)
    compare.main([str(tmp_path), "--out", str(tmp_path / "out"), "--metric", "final"])
    b = read_csv(tmp_path / "out" / "gaps.csv")["baseline"]
    assert float(b["time_ratio"]) == pytest.approx((14 + 140) / 2 / 8)
    assert float(b["time_ratio_lo"]) == 0.0 < float(b["time_ratio"]) < float(b["time_ratio_hi"])


# Written out here, not read from analysis/runs.py: a key dropped from its list must fail this test.
ANALYSIS_RESULT_KEYS = ("dataset", "model", "model_kwargs", "subset", "lr", "batch_size", "grad_accum",
                        "warmup_epochs", "eta_min", "amp", "momentum", "nesterov", "weight_decay", "world_size",
                        "device", "compile", "eval_every", "tf32", "device_name")


@pytest.mark.parametrize("key", ANALYSIS_RESULT_KEYS)
def test_seeds_that_differ_in_any_result_option_are_never_averaged(tmp_path, key):
    seeded(tmp_path / "a", [], [80, 85, 90], [79, 86, 89], 0, **{key: 1})
    seeded(tmp_path / "b", [], [70, 75, 80], [70, 75, 80], 1, **{key: 2})
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    gaps = {r["group"]: r for r in read_rows(out / "gaps.csv")}
    assert set(gaps) == {f"{key}=1", f"{key}=2"} and {g["n_seeds"] for g in gaps.values()} == {"1"}
    assert float(gaps[f"{key}=2"]["mean_gap_pp"]) == 0


def test_seeds_are_paired_by_id_not_by_position(tmp_path):
    """The cyclic runs are found in another seed order than the standard ones (their folders sort so): the CI and
    the per-run |gap| must equal those of the same runs found in the same order."""
    std = {0: [80, 85, 90], 1: [70, 76, 83], 2: [75, 79, 88]}
    cyc = {0: [79, 86, 89], 1: [72, 74, 84], 2: [75, 80, 86]}
    tables = []
    for layout, folder in (("same", lambda s: f"s{s}"), ("reversed", lambda s: f"s{2 - s}")):
        root = tmp_path / layout
        for s in std:
            standard(root / "std" / f"s{s}", [], zip((2, 4, 8), std[s]), seed=s)
            write_run(root / "cyc" / folder(s), f"cyc_s{s}", "cyclic", [], cyclic_rows(cyc[s], [2, 4, 8]), s)
        compare.main([str(root), "--out", str(root / "out"), "--metric", "final"])
        tables.append(read_csv(root / "out" / "gaps.csv")["baseline"])
    keys = ("mean_gap_pp", "mean_gap_lo", "mean_gap_hi", "per_run_abs_gap_pp", "per_run_abs_gap_lo", "pairing")
    assert [tables[0][k] for k in keys] == [tables[1][k] for k in keys] and tables[0]["pairing"] == "paired"
    per_seed = [sum(abs(c - s) for c, s in zip(cyc[k], std[k])) / 3 for k in std]
    assert float(tables[0]["per_run_abs_gap_pp"]) == pytest.approx(sum(per_seed) / 3)


def test_runs_from_before_model_kwargs_average_with_runs_of_none(tmp_path):
    seeded(tmp_path / "old", [], [80, 85, 90], [79, 86, 89], 0)  # written before the key existed
    seeded(tmp_path / "new", [], [82, 87, 92], [81, 88, 91], 1, model_kwargs={})
    seeded(tmp_path / "dp", [], [70, 75, 80], [70, 75, 80], 2, model_kwargs={"drop_path_rate": 0.1})
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    gaps = {r["group"]: r for r in read_rows(out / "gaps.csv")}
    assert {g: r["n_seeds"] for g, r in gaps.items()} == {"model_kwargs={}": "2",
                                                          'model_kwargs={"drop_path_rate": 0.1}': "1"}


def test_runs_on_two_kinds_of_hardware_are_two_groups_unless_pooled_and_then_it_says_so(tmp_path, capsys):
    seeded(tmp_path / "a", [], [80, 85, 90], [79, 86, 89], 0, device_name="AMD EPYC 9454")
    seeded(tmp_path / "b", [], [82, 87, 92], [81, 88, 91], 1, device_name="Intel Xeon Platinum 8480+")
    out = tmp_path / "out"
    report.main([str(tmp_path), "--out", str(out), "--metric", "final"])  # never a time axis of two speeds
    assert {r["group"]: r["n_seeds"] for r in read_rows(out / "gaps.csv")} == {
        "device_name=AMD EPYC 9454": "1", "device_name=Intel Xeon Platinum 8480+": "1"}
    report.main([str(tmp_path), "--out", str(out), "--metric", "final", "--pool-hardware"])
    said = "ran on 2 kinds of hardware (AMD EPYC 9454; Intel Xeon Platinum 8480+): accuracies are pooled"
    assert said in capsys.readouterr().out and said in (out / "report.md").read_text()
    assert read_csv(out / "gaps.csv")["baseline"]["n_seeds"] == "2"  # the accuracies pooled, as it says


def test_the_cheap_benchmark_cyclic_runs_only_reports_each_methods_improvement_with_its_ci(tmp_path):
    """launch.sh sweep --no-standard: no standard run at all; the report still gives each method set's improvement
    over the baseline per budget with a CI over seeds (a plug-in's spec as its name), in a table and fig4."""
    for seed, noise in zip((0, 1, 2, 3), (0.1, -0.2, 0.0, 0.15)):
        base = [80 + noise, 85 - noise, 90 + noise]
        write_run(tmp_path, f"base_s{seed}", "cyclic", [], cyclic_rows(base, [2, 4, 8]), seed)
        write_run(tmp_path, f"mine_s{seed}", "cyclic", ["my_aug:p=0.5"],
                  cyclic_rows([a + 1 + noise / 2 for a in base], [2, 4, 8]), seed, method_options={})
        write_run(tmp_path, f"null_s{seed}", "cyclic", ["ema"],
                  cyclic_rows([a + (-1) ** seed * 0.5 for a in base], [2, 4, 8]), seed, method_options={})
    out = tmp_path / "rep"
    report.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    imp = {(r["methods"], float(r["budget"])): r for r in read_rows(out / "improvement.csv")}
    assert set(imp) == {(m, b) for m in ("my_aug:p=0.5", "ema") for b in (2, 4, 8)}
    for b in (2, 4, 8):
        mine, null = imp[("my_aug:p=0.5", b)], imp[("ema", b)]
        assert float(mine["lo"]) > 0 and float(mine["improvement_pp"]) == pytest.approx(1.0, abs=0.05)
        assert float(null["lo"]) < 0 < float(null["hi"]) and float(null["improvement_pp"]) == pytest.approx(0)
    md = (out / "report.md").read_text()
    assert "## Improvement over the baseline, per budget" in md and "## Gaps (cyclic - standard)" not in md
    assert "| my_aug:p=0.5 | cyclic | 8 | +1.0" in md and "| ema | cyclic | 8 | +0.00" in md
    assert (out / "fig4_improvement.png").exists()


def test_runs_of_one_method_name_but_another_plug_in_file_or_default_are_separate_sets(tmp_path):
    """A plug-in's runs stay in the baseline's family (compared with it), but runs of an edited plug-in file, or of
    a built-in whose default changed, are never averaged with the others under the same name."""
    seeded(tmp_path, [], [80, 85, 90], [79, 86, 89], 0, plugins={}, method_options={})
    seeded(tmp_path / "v1", ["mine"], [81, 86, 91], [80, 87, 90], 0, plugins={"mine": "sha256:1"},
           method_options={"mine": {}})
    seeded(tmp_path / "v2", ["mine"], [70, 75, 80], [70, 75, 80], 0, plugins={"mine": "sha256:2"},
           method_options={"mine": {}})
    seeded(tmp_path / "e1", ["ema"], [81, 86, 91], [80, 87, 90], 0, plugins={}, method_options={"ema": {"decay": 0.9}})
    seeded(tmp_path / "e2", ["ema"], [70, 75, 80], [70, 75, 80], 0, plugins={}, method_options={"ema": {"decay": 0.5}})
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    gaps = read_csv(out / "gaps.csv")
    assert {g["group"] for g in gaps.values()} == {""}  # one family: every set is compared with the baseline
    assert len([m for m in gaps if m.startswith("mine (")]) == 2 and len([m for m in gaps if m.startswith("ema (")]) == 2
    assert sorted(round(float(gaps[m]["mean_gap_pp"]), 6) for m in gaps if m.startswith("mine (")) == [-0.333333, 0.0]


@pytest.mark.parametrize("late_deficit,expect", [(0.5, True), (0.0, False)])
def test_the_gap_against_the_baseline_resolves_a_late_deficit_and_not_noise(tmp_path, late_deficit, expect):
    """The paper's caveat, constructed: a regulariser whose cyclic curve misses its standard one by 0.5 pp more
    than the baseline's does at the last two budgets, 5 seeds with small noise, is resolved (delta -0.33 pp over
    the three budgets); +-0.5 pp of noise around no difference is not."""
    rng = np.random.default_rng(0)
    for seed in range(5):
        off = rng.normal(0, 1.0)  # seed effects shared by a seed's runs: pairing by seed removes them
        base_std = [80 + off, 85 + off, 90 + off]
        base_cyc = [a + rng.normal(0, 0.05) for a in base_std]
        reg_std = [a + 1 for a in base_std]
        noise = rng.normal(0, 0.05, 3) if late_deficit else rng.uniform(-0.5, 0.5, 3)
        reg_cyc = [a + n - late_deficit * (j > 0) for j, (a, n) in enumerate(zip(reg_std, noise))]
        seeded(tmp_path, [], base_std, base_cyc, seed)
        seeded(tmp_path, ["label_smoothing"], reg_std, reg_cyc, seed)
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    g = read_csv(out / "gaps.csv")["label_smoothing"]
    assert g["delta_gap_seeds"] == "5" and read_csv(out / "gaps.csv")["baseline"]["delta_gap_vs_baseline"] == ""
    delta, lo, hi = (float(g[k]) for k in ("delta_gap_vs_baseline", "delta_gap_vs_baseline_lo",
                                           "delta_gap_vs_baseline_hi"))
    assert lo <= delta <= hi and (g["delta_gap_vs_baseline_resolved"] == "true") is expect
    if expect:
        assert delta == pytest.approx(-late_deficit * 2 / 3, abs=0.05) and hi < 0


def test_the_gap_against_the_baseline_pairs_each_seed_with_the_baselines_same_seed(tmp_path):
    """Each seed's cyclic run misses its standard curve by its own amount (+-1 pp, the same for the baseline and the
    set: a seed's draws), and the set by 0.3 pp more: paired by seed the difference is -0.3 pp with a narrow,
    resolved interval; against the baseline's mean gap the seeds' own amounts would widen it past zero."""
    rng = np.random.default_rng(1)
    for seed in range(4):
        own = rng.normal(0, 1.0)
        base_std = [80.0, 85.0, 90.0]
        seeded(tmp_path, [], base_std, [a + own + rng.normal(0, 0.01) for a in base_std], seed)
        reg_std = [a + 1 for a in base_std]
        seeded(tmp_path, ["label_smoothing"], reg_std, [a + own - 0.3 + rng.normal(0, 0.01) for a in reg_std], seed)
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    g = read_csv(out / "gaps.csv")["label_smoothing"]
    delta, lo, hi = (float(g[k]) for k in ("delta_gap_vs_baseline", "delta_gap_vs_baseline_lo",
                                           "delta_gap_vs_baseline_hi"))
    assert delta == pytest.approx(-0.3, abs=0.02) and -0.35 < lo < hi < -0.25
    assert g["delta_gap_vs_baseline_resolved"] == "true" and g["delta_gap_seeds"] == "4"


def test_a_run_with_a_segment_far_slower_than_its_own_median_is_named(sweep, tmp_path, capsys):
    """A segment below 0.8 of its run's median images/s (another job shared the machine) is named with its epoch;
    a quiet run's drift (0.9) is not."""
    for name, speeds in (("cyc_base", [2000, 1900, 1100, 1950, 2000]), ("cyc_mx", [2000, 1800, 1900, 2000])):
        path = sweep / name / "metrics.csv"
        rows = list(csv.DictReader(open(path)))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]) + ["images_per_s"])
            w.writeheader()
            w.writerows(dict(r, images_per_s=v) for r, v in zip(rows, speeds))
    compare.main([str(sweep), "--out", str(tmp_path / "out")])
    warned = [line for line in capsys.readouterr().out.splitlines() if "median images/s" in line]
    assert len(warned) == 1 and "cyc_base: its segment(s) ending at epoch 4 trained at 0.56" in warned[0]
