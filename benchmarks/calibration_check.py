"""How well the calibrated axis predicts what runs measured: per run, its measured training time (train_time_s of
its last row) against its calibrated time (its optimizer steps x its configuration's step cost in calibration.json).

    python -m benchmarks.calibration_check RUNS_DIR [--calibration FILE]

On runs that trained alone on the machine that calibrated them, the two should agree (docs/time-axes.md: the cost
model predicts what nothing disturbed); runs packed beside others, on other hardware or on a drifting VM differ by
that disturbance, which is what the calibrated axis leaves out. Prints a line per run, then the median and the
extremes of calibrated / measured.
"""
import argparse
import os
import statistics
import sys

from analysis import axes
from analysis.runs import load_runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir")
    p.add_argument("--calibration", default=None, help="default: the calibration.json at or above RUNS_DIR")
    a = p.parse_args(argv)
    if not os.path.isdir(a.runs_dir):
        sys.exit(f"benchmarks.calibration_check: error: {a.runs_dir} is not a folder of runs")
    runs = load_runs([a.runs_dir])
    if not runs:
        sys.exit(f"benchmarks.calibration_check: error: no finished runs below {a.runs_dir}")
    try:
        calibration = axes.read_calibration(a.calibration or axes.find_calibration([a.runs_dir]))
        axes.annotate(runs, "calibrated", calibration, a.runs_dir)
    except axes.AxisError as e:
        sys.exit(f"benchmarks.calibration_check: error: {e}")
    ratios = []
    print(f"{'run':<60} {'measured s':>10} {'calibrated s':>12} {'cal/meas':>8}")
    for run in sorted(runs, key=lambda r: r.path):
        last = run.rows[-1]
        measured, calibrated = float(last["train_time_s"]), last["axis_time"]
        ratios.append(calibrated / measured)
        print(f"{os.path.relpath(run.path, a.runs_dir):<60} {measured:>10.1f} {calibrated:>12.1f} {ratios[-1]:>8.3f}")
    within = sum(abs(r - 1) <= 0.05 for r in ratios)
    print(f"{len(ratios)} runs: calibrated / measured median {statistics.median(ratios):.3f}, range "
          f"[{min(ratios):.3f}, {max(ratios):.3f}]; {within} of {len(ratios)} within 5 % "
          f"(calibration: {calibration.path}, {calibration.device_name})")


if __name__ == "__main__":
    main()
