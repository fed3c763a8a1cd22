"""analysis.compare and analysis.report on run directories written by hand."""
import csv
import json
import math

import pytest

from analysis import compare, report

COLS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "train_time_s", "cycle", "cycle_end"]


def write_run(root, name, schedule, methods, rows, seed=0, done=True):
    """rows: (epoch, acc, time, cycle, cycle_end)."""
    d = root / name
    d.mkdir(parents=True)
    epochs = rows[-1][0]
    cfg = dict(schedule=schedule, methods=methods, seed=seed, epochs=epochs, warmup_epochs=1, t0=1,
               t_mult=2 if schedule == "cyclic" else 1, lr=0.1, steps_per_epoch=4)
    (d / "config.json").write_text(json.dumps(cfg))
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLS)
        for e, acc, t, cyc, end in rows:
            w.writerow([e, int(e * 4), 0.01, 1.0, 1.0, acc, 99.0, t, cyc, end])
    if done:
        (d / "done").touch()
    return d


def cyclic_rows(accs, times, mid=None):
    """Cycle ends at 2, 4, 8 epochs (warmup 1, t0 1, t_mult 2); `mid` adds a higher mid-cycle row to cycle 2."""
    rows = [(1, 10.0, 1.0, -1, 0), (2, accs[0], times[0], 0, 1), (4, accs[1], times[1], 1, 1)]
    if mid is not None:
        rows.append((6, mid, (times[1] + times[2]) / 2, 2, 0))
    return rows + [(8, accs[2], times[2], 2, 1)]


def standard(root, methods, budgets_accs, seed=0, time_per_epoch=1.0):
    for e, acc in budgets_accs:
        write_run(root, f"std_{'+'.join(methods) or 'base'}_{e}_s{seed}", "standard", methods,
                  [(e / 2, acc - 5, e / 2 * time_per_epoch, 0, 0), (e, acc, e * time_per_epoch, 0, 1)], seed)


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
    write_run(sweep, "empty", "standard", [], [(8, 50, 8, 0, 1)]).joinpath("metrics.csv").write_text(",".join(COLS) + "\n")
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


def test_report_writes_every_figure_and_links_them(sweep, tmp_path):
    write_run(sweep, "const_base", "constant", [], [(2, 78, 2, 0, 1), (3, 80, 3, 1, 1), (4, 81, 4, 2, 1)])
    out = tmp_path / "rep"
    report.main([str(sweep), "--out", str(out)])
    md = (out / "report.md").read_text()
    for fig in ("fig1_schedules", "fig2_total_time", "fig3_tradeoff", "fig4_improvement", "fig5_constant",
                "fig6_ordering"):
        for ext in ("png", "pdf"):
            assert (out / f"{fig}.{ext}").stat().st_size > 1000, fig
        assert f"]({fig}.png)" in md
    assert "| mixup |" in md and (out / "gaps.csv").exists()


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no readable finished runs"):
        compare.main([str(tmp_path), "--out", str(tmp_path / "o")])
