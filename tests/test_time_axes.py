"""The time axes that do not depend on when or where a run trained (docs/time-axes.md): FLOPs counted by train.py,
calibrated time from benchmarks.calibrate's calibration.json, and the analysis on both."""
import csv
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import costs
import train
from analysis import axes
from analysis.runs import read_run
from analysis.stats import median_ci
from conftest import ROOT, TINY
from methods import MethodList, ProgressiveResizing
from methods.sam import SAM
from test_accounting import driven, in_process  # noqa: F401 (a fixture)

COMMITTED = os.path.join(ROOT, "results", "fashion-mnist", "baseline", "s0", "standard-e1")  # an old run


def rows(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


# ---- FLOPs -----------------------------------------------------------------------------------------

def blank_data(size=8, chans=1):
    return SimpleNamespace(in_chans=chans, image_size=size, device=torch.device("cpu"), num_classes=10)


def test_flops_per_image_are_the_analytic_forward_and_backward_count():
    """Conv 1->4 (3x3, 8x8 output) then linear 256->10: forward 2 x MACs each; backward the weight gradients of both
    and the input gradient of the linear layer only (the images need none)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 10))
    conv, linear = 2 * 4 * 8 * 8 * 1 * 9, 2 * 256 * 10
    ctx = costs.step_context(SimpleNamespace(total_steps=10, budget_progress=lambda p: 0.0), 0, 10)
    per_image = train.flops_per_image(model, MethodList([]), torch.autocast("cpu", enabled=False), blank_data(), 4,
                                      {"8x8": ctx})
    assert per_image == {"8x8": 2 * conv + 3 * linear}
    sam = train.flops_per_image(model, MethodList([SAM()]), torch.autocast("cpu", enabled=False), blank_data(), 4,
                                {"8x8": ctx})
    assert sam == {"8x8": 2 * (2 * conv + 3 * linear)}  # SAM's second forward and backward


def test_progressive_resizing_counts_each_size_of_its_schedule():
    """Per size, the FLOPs of the model at that size (counted directly); the sizes those of its ramp."""
    import schedules
    from models import build_model
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, 3)
    plan = schedules.make_plan("cyclic", 4, 1, 1, 2, 8)
    pr = ProgressiveResizing()
    flops = train.count_flops(model, MethodList([pr]), torch.autocast("cpu", enabled=False), blank_data(32, 3), plan,
                              4, 8)
    expected_sides = {f"{s}x{s}" for s in (pr.size(32, plan.budget_progress(p)) for p in range(plan.total_steps))}
    assert set(flops.per_image) == expected_sides and len(expected_sides) >= 3
    for side in expected_sides:
        s = int(side.split("x")[0])
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(4, 3, s, s)).sum().backward()
        model.zero_grad()
        assert flops.per_image[side] == pytest.approx(counter.get_total_flops() / 4, rel=1e-3)  # (the loss's few)
    assert flops.per_image["16x16"] < flops.per_image["32x32"] / 3  # a quarter of the pixels


def test_a_run_records_its_flops_and_progressive_resizing_rows_follow_its_sizes(in_process, tmp_path):
    """A wsd run with progressive resizing. train_flops at each row = the FLOPs of a batch at each path step's size
    (the method's own schedule over the plan) summed over the row's path; curve_cost_flops the same over every step
    the run took (the trunk once, each branch); the calibrated axis prices the same steps at each size's cost. All
    counted here apart from train.py's and the analysis's bookkeeping."""
    import schedules
    run = str(tmp_path / "pr")
    in_process.main(TINY + ["--run-dir", run, "--method", "progressive_resizing", "--schedule", "wsd",
                            "--eval-every", "0.5"])
    config = json.load(open(os.path.join(run, "config.json")))
    per_image = config["train_flops_per_image_by_side"]
    assert config["train_flops_per_image"] == per_image["32x32"] and len(per_image) >= 3
    plan = schedules.make_plan("wsd", config["epochs"], 1, 1, 2, 8, cooldown_frac=config["cooldown_frac"])
    pr = ProgressiveResizing()
    side = [f"{s}x{s}" for s in (pr.size(32, plan.budget_progress(p)) for p in range(plan.total_steps))]
    run_order = [p for seg in plan.segments() for p in range(seg.start, seg.end)]  # the path step of each run step

    def run_steps(row):  # taken when the row was written: its segment's start in the run, plus the way in
        step, branch = int(row["step"]), row["cycle_end"] == "1"
        seg = next(s for s in plan.segments() if (s.kind == "branch") == branch and s.start < step <= s.end)
        return seg.run_start + step - seg.start
    got = rows(run)
    assert len(got) >= 8 and any(r["train_flops"] != r["curve_cost_flops"] for r in got)  # branches cost extra
    for r in got:
        path = sum(per_image[side[p]] for p in range(int(r["step"]))) * 32
        whole = sum(per_image[side[p]] for p in run_order[:run_steps(r)]) * 32
        assert (float(r["train_flops"]), float(r["curve_cost_flops"])) == pytest.approx((path, whole), rel=1e-9)
    cost = {s: 1e-3 * int(s.split("x")[0]) ** 2 for s in per_image}  # a step cost per size, by hand
    calibration = axes.Calibration("calibration.json", "CPU", "2", "today", 1, {costs.key_text(costs.cost_key(
        config)): dict(image_shape=[3, 32, 32], sides={s: dict(step_s=c, rounds=[c], train_flops_per_image=1.0)
                                                        for s, c in cost.items()})})
    (read,) = [read_run(run)]
    axes.annotate([read], "calibrated", calibration)
    for row, r in zip(read.rows, got):
        expected = (sum(cost[side[p]] for p in range(int(r["step"]))),
                    sum(cost[side[p]] for p in run_order[:run_steps(r)]))
        assert (row["axis_time"], row["axis_cost"]) == pytest.approx(expected, rel=1e-9)


# ---- a slowdown moves the measured axis only ---------------------------------------------------------

def test_an_injected_slowdown_changes_the_measured_axis_and_neither_calibrated_time_nor_flops(in_process, tmp_path,
                                                                                          monkeypatch):
    """Two runs of the same options under a clock the test drives (1 s a step); in the second, steps 9-16 take 5 s
    more (a machine busy for a while). Its train_time_s grows by 40 s from that segment on; its calibrated time
    (steps x the step cost benchmarks.calibrate measured for their one configuration) and its FLOPs do not move."""
    study = tmp_path / "study"
    clock = driven(in_process, monkeypatch)
    in_process.main(TINY + ["--run-dir", str(study / "quiet"), "--eval-every", "1"])
    timed_step = in_process.train_step
    calls = []

    def slow(*args, **kwargs):
        calls.append(1)
        if 9 <= len(calls) <= 16:
            clock.now += 5.0  # someone else's job on the machine
        return timed_step(*args, **kwargs)
    monkeypatch.setattr(in_process, "train_step", slow)
    in_process.main(TINY + ["--run-dir", str(study / "busy"), "--eval-every", "1"])
    quiet, busy = rows(study / "quiet"), rows(study / "busy")
    assert [float(r["train_time_s"]) for r in busy] == [float(r["train_time_s"]) + (40 if int(r["step"]) > 8 else 0)
                                                        for r in quiet]

    from benchmarks import calibrate
    calibrate.main([str(study), "--device", "cpu", "--rounds", "2", "--steps", "1", "--warmup-steps", "0"])
    calibration = axes.read_calibration(str(study / "calibration.json"))
    (entry,) = calibration.entries.values()  # seed and run folder aside, one configuration
    assert entry["runs"] == 2 and list(entry["sides"]) == ["32x32"]
    step_s = entry["sides"]["32x32"]["step_s"]
    for axis in ("calibrated", "flops"):
        runs = [read_run(str(study / name)) for name in ("quiet", "busy")]
        axes.annotate(runs, axis, calibration)
        values = [[(r["axis_time"], r["axis_cost"]) for r in run.rows] for run in runs]
        assert values[0] == values[1]
        if axis == "calibrated":
            assert values[0] == [(r["step"] * step_s, r["step"] * step_s) for r in runs[0].rows]
        else:
            per_image = runs[0].config["train_flops_per_image"]
            assert values[0] == [pytest.approx((r["step"] * 32 * per_image,) * 2, rel=1e-9) for r in runs[0].rows]
            assert entry["sides"]["32x32"]["train_flops_per_image"] == per_image  # the calibration counts alike


# ---- bad calibrations ----------------------------------------------------------------------------------

def analyse(runs_dir, out, *flags):
    return subprocess.run([sys.executable, "-m", "analysis.compare", str(runs_dir), "--out", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def old_study(tmp_path):
    """A copy of a committed run made before train.py counted FLOPs."""
    study = tmp_path / "study"
    shutil.copytree(COMMITTED, study / "run")
    return study, json.load(open(study / "run" / "config.json"))


def calibration_of(config, step_s=0.5, **top):
    entry = dict(key=costs.cost_key(config), label="x", runs=1, example_run="run", image_shape=[1, 28, 28],
                 sides={"28x28": dict(step_s=step_s, rounds=[step_s, 1.1 * step_s], train_flops_per_image=5e7)},
                 eval=dict(eval_s=1.0, rounds=[1.0, 1.0]))
    return dict(dict(format=1, device="cpu", device_name="Another CPU", torch_version="9.9", date="today", rounds=2,
                     configs=[entry]), **top)


@pytest.mark.parametrize("damage", ["missing", "not json", "no such configuration", "a negative cost"])
def test_a_bad_calibration_is_refused_in_one_line_and_nothing_is_written(tmp_path, damage):
    study, config = old_study(tmp_path)
    path = study / "calibration.json"
    if damage == "not json":
        path.write_text('{"format": 1, "configs": [')
    elif damage == "no such configuration":
        path.write_text(json.dumps(calibration_of(dict(config, batch_size=128))))
    elif damage == "a negative cost":
        path.write_text(json.dumps(calibration_of(config, step_s=-1.0)))
    p = analyse(study, tmp_path / "out", "--x", "calibrated")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert "calibration.json" in err[0] and "python -m benchmarks.calibrate" in err[0], err
    assert not (tmp_path / "out").exists()


def test_old_runs_without_flops_are_one_line_until_a_calibration_counts_them(tmp_path):
    study, config = old_study(tmp_path)
    p = analyse(study, tmp_path / "out", "--x", "flops")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "records no training FLOPs" in err[0], p.stderr
    assert f"python -m benchmarks.calibrate {study}" in err[0] and not (tmp_path / "out").exists()
    (study / "calibration.json").write_text(json.dumps(calibration_of(config)))
    p = analyse(study, tmp_path / "out", "--x", "flops")
    assert p.returncode == 0, p.stderr
    curves = list(csv.DictReader(open(tmp_path / "out" / "curves.csv")))
    assert float(curves[0]["train_flops_mean"]) == 234 * 256 * 5e7  # its steps x batch x the calibration's count


def test_a_calibration_from_another_device_is_used_and_says_so(tmp_path):
    """The calibrated axis prices every step at the calibrating device's cost, whatever machine ran the run, and
    the output says where it was calibrated and that the runs trained elsewhere."""
    study, config = old_study(tmp_path)
    (study / "calibration.json").write_text(json.dumps(calibration_of(config)))
    p = analyse(study, tmp_path / "out", "--x", "calibrated")
    assert p.returncode == 0, p.stderr
    assert "measured on Another CPU (torch 9.9" in p.stdout and "what their steps cost on Another CPU" in p.stdout
    curves = list(csv.DictReader(open(tmp_path / "out" / "curves.csv")))
    measured = rows(study / "run")[-1]["train_time_s"]  # the wall-clock column keeps its meaning
    assert float(curves[0]["calibrated_s_mean"]) == 234 * 0.5 and float(curves[0]["time_mean"]) == float(measured)
    gaps = list(csv.DictReader(open(tmp_path / "out" / "gaps.csv")))
    assert "calibrated_ratio_lo" in gaps[0] and "standard_time_s" in gaps[0]


def test_calibration_check_sets_each_runs_calibrated_time_beside_its_measured_one(tmp_path):
    """A step cost of measured / steps predicts the run exactly (ratio 1); twice that, 2; no calibration: one line."""
    study, config = old_study(tmp_path)
    measured = float(rows(study / "run")[-1]["train_time_s"])
    check = [sys.executable, "-m", "benchmarks.calibration_check", str(study)]
    p = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "calibration.json" in p.stderr.strip().splitlines()[-1], p.stderr
    for scale in (1, 2):
        (study / "calibration.json").write_text(json.dumps(calibration_of(config, step_s=scale * measured / 234)))
        p = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        line = p.stdout.splitlines()[1]  # under the header: the one run
        assert float(line.split()[-1]) == pytest.approx(scale, abs=1e-3), p.stdout
        assert f"median {scale:.3f}" in p.stdout and f"{2 - scale} of 1 within 5 %" in p.stdout


def test_a_methods_cost_relative_to_the_baseline_is_the_centre_of_its_interval(tmp_path):
    """method_costs.csv: `relative` is the median of the rounds' ratios, inside its interval (a ratio of the two
    medians may fall outside it: rounds 3 2 3 over 1 2 3 give 1.5 that way, 1 this way)."""
    study, config = old_study(tmp_path)
    shutil.copytree(study / "run", study / "ls")
    ls = dict(config, methods=["label_smoothing"], label_smoothing=0.1)  # (an old run: its option in a key)
    (study / "ls" / "config.json").write_text(json.dumps(ls))

    def entry(cfg, rounds):
        return dict(calibration_of(cfg, step_s=float(sorted(rounds)[1]))["configs"][0],
                    sides={"28x28": dict(step_s=float(sorted(rounds)[1]), rounds=rounds, train_flops_per_image=5e7)})
    calibration = calibration_of(config, rounds=3)
    calibration["configs"] = [entry(config, [1.0, 2.0, 3.0]), entry(ls, [3.0, 2.0, 3.0])]  # ratios 3, 1, 1
    (study / "calibration.json").write_text(json.dumps(calibration))
    p = analyse(study, tmp_path / "out", "--x", "calibrated")
    assert p.returncode == 0, p.stderr
    costs_csv = {r["methods"]: r for r in csv.DictReader(open(tmp_path / "out" / "method_costs.csv"))}
    assert set(costs_csv) == {"baseline", "label_smoothing"}, costs_csv
    row = costs_csv["label_smoothing"]
    assert float(row["relative"]) == pytest.approx(1.0) and float(row["per_image"]) == pytest.approx(
        3.0 / 256) and float(costs_csv["baseline"]["per_image"]) == pytest.approx(2.0 / 256)
    assert float(row["relative_lo"]) <= float(row["relative"]) <= float(row["relative_hi"])


def test_the_default_axis_writes_no_new_columns(tmp_path):
    study, _ = old_study(tmp_path)
    p = analyse(study, tmp_path / "out")
    assert p.returncode == 0, p.stderr
    header = open(tmp_path / "out" / "curves.csv").readline().strip()
    assert header == "methods,schedule,epochs,n,acc_mean,acc_std,time_mean,acc_lo,acc_hi,cost_mean,group"
    assert not (tmp_path / "out" / "method_costs.csv").exists()


def test_median_ci_is_the_order_statistic_interval_with_its_coverage():
    assert median_ci([3.0]) == (3.0, None, None, None)
    assert median_ci([5, 1, 3, 2, 4]) == (3.0, 1.0, 5.0, 1 - 2 / 2 ** 5)  # too few for 95 %: [min, max]
    median, lo, hi, coverage = median_ci(range(10))
    assert (median, lo, hi) == (4.5, 1, 8) and coverage == pytest.approx(0.9785, abs=1e-4)


@pytest.mark.parametrize("axis", ["calibrated", "flops"])
def test_a_study_with_the_baselines_two_curves_reads_on_the_new_axes(tmp_path, axis):
    """The baseline's standard and cyclic curves (two seeds) make the baseline-calibrated estimator, whose rows
    crashed the new axes (no axis columns); its only row, the baseline's, is in-sample: point estimates only."""
    study = tmp_path / "study"
    for seed in ("s0", "s1"):
        for run in ("cyclic", "standard-e1", "standard-e2", "standard-e4", "standard-e8"):
            shutil.copytree(os.path.join(ROOT, "results", "fashion-mnist", "baseline", seed, run), study / seed / run)
    configs = [json.load(open(study / "s0" / run / "config.json")) for run in ("cyclic", "standard-e1")]
    entries = [calibration_of(c)["configs"][0] for c in configs]
    unique = list({json.dumps(e["key"], sort_keys=True): e for e in entries}.values())
    (study / "calibration.json").write_text(json.dumps(dict(calibration_of(configs[0]), configs=unique)))
    p = analyse(study, tmp_path / "out", "--x", axis, "--metric", "final")
    assert p.returncode == 0, p.stderr
    rows_ = {r["estimator"]: r for r in csv.DictReader(open(tmp_path / "out" / "estimators.csv"))}
    calibrated = rows_["baseline-calibrated"]
    assert calibrated["mean_gap_pp"] != "" and calibrated["mean_gap_lo"] == calibrated["resolved"] == ""
    assert rows_["cyclic"]["mean_gap_lo"] != ""


@pytest.mark.parametrize("flags", [[], ["--device", "gpu"], ["--rounds", "0"]])
def test_calibrate_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, flags):
    study = tmp_path / "study"
    study.mkdir()
    if flags:  # a folder of runs, bad options
        shutil.copytree(COMMITTED, study / "run")
    p = subprocess.run([sys.executable, "-m", "benchmarks.calibrate", str(study), *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("benchmarks.calibrate: error: "), p.stderr
    assert not (study / "calibration.json").exists()
