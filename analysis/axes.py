"""The x axes of a tradeoff curve besides wall-clock time (docs/time-axes.md): calibrated time and FLOPs.

  time        train_time_s, measured inside each run (the default): what it cost on the machine that ran it
  epochs      the budget
  calibrated  the run's optimizer steps x the step cost of its configuration measured on one device
              (calibration.json, written by python -m benchmarks.calibrate): what the method costs on that device
  flops       the run's training FLOPs (train_flops, counted by train.py; for older runs, the steps x the FLOPs per
              image that calibration.json counted): independent of hardware

annotate() puts the two values of the chosen axis on every metrics row: `axis_time` (along the row's own path, as
train_time_s) and `axis_cost` (the whole run so far, as curve_cost_s); `axis_rounds`, the two again with each
calibration round's costs (calibrated; FLOPs: one exact "round"), which the ratios' intervals resample; and
`axis_run_steps`, the optimizer steps the run had taken.
"""
import json
import math
import os
from dataclasses import dataclass

import costs

AXES = ("time", "epochs", "calibrated", "flops")
NEW_AXES = ("calibrated", "flops")  # on these the hardware's name does not split groups
# the columns each new axis writes: curves.csv's means of (time, cost), and gaps.csv's (standard, estimator, ratio)
COLUMNS = {"calibrated": ("calibrated_s", "calibrated_cost_s", "standard_calibrated_s", "cyclic_calibrated_s",
                          "calibrated_ratio"),
           "flops": ("train_flops", "curve_cost_flops", "standard_flops", "cyclic_flops", "flops_ratio")}
FORMAT = 1  # calibration.json's layout (benchmarks/calibrate.py)


class AxisError(ValueError):
    """A run or a calibration.json that cannot give the asked axis; one line naming the file and what to run."""


@dataclass
class Calibration:
    path: str
    device_name: str
    torch_version: str
    date: str
    rounds: int
    entries: dict  # {costs.key_text(key): entry}

    @property
    def command(self):
        return f"python -m benchmarks.calibrate {os.path.dirname(self.path) or '.'}"


def find_calibration(paths, required=True):
    """The calibration.json nearest at or above each analysed folder; AxisError unless exactly one file (none:
    None where not required)."""
    found = set()
    for p in paths:
        d = os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p))
        while True:
            if os.path.isfile(os.path.join(d, "calibration.json")):
                path = os.path.join(d, "calibration.json")
                found.add(path if os.path.relpath(path).startswith("..") else os.path.relpath(path))
                break
            if os.path.dirname(d) == d:
                break
            d = os.path.dirname(d)
    if not found and not required:
        return None
    if not found:
        raise AxisError(f"--x calibrated needs a calibration.json at or above {paths[0]}: run python -m "
                        f"benchmarks.calibrate {paths[0]} first (or give --calibration FILE)")
    if len(found) > 1:
        raise AxisError(f"--x calibrated: the folders analysed have {len(found)} calibration.json files "
                        f"({', '.join(sorted(found))}); give the one to use with --calibration FILE")
    return found.pop()


def read_calibration(path):
    """calibration.json as a Calibration; AxisError in one line where it is missing, not JSON or damaged."""
    again = f"run python -m benchmarks.calibrate {os.path.dirname(path) or '.'} again"
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AxisError(f"{path}: no such file; run python -m benchmarks.calibrate RUNS_DIR to write it")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AxisError(f"{path}: not a readable calibration ({getattr(e, 'msg', e)}); {again}")

    def damaged(why):
        return AxisError(f"{path}: damaged ({why}); {again}")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise damaged(f"not a calibration of format {FORMAT}")
    rounds = data.get("rounds")
    if not isinstance(rounds, int) or rounds < 1 or not isinstance(data.get("configs"), list):
        raise damaged("no rounds or configs")
    entries = {}
    for i, entry in enumerate(data["configs"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), dict):
            raise damaged(f"configs[{i}] has no key")
        sides = entry.get("sides")
        if not isinstance(sides, dict) or not sides:
            raise damaged(f"configs[{i}] has no sides")
        for side, s in sides.items():
            values = [s.get("step_s"), s.get("train_flops_per_image")] + list(s.get("rounds") or [])
            if (not isinstance(s.get("rounds"), list) or len(s["rounds"]) != rounds
                    or not all(is_positive(v) for v in values)):
                raise damaged(f"configs[{i}] size {side}: step_s, train_flops_per_image and {rounds} rounds must be "
                              f"positive numbers")
        # one image size: compile_dynamic splits nothing (costs.cost_key), also in a file written before that
        key = dict(entry["key"], compile_dynamic=None) if len(sides) == 1 else entry["key"]
        entries[costs.key_text(key)] = entry
    return Calibration(path, str(data.get("device_name")), str(data.get("torch_version")), str(data.get("date")),
                       rounds, entries)


def is_positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def label(axis, calibration=None):
    """The axis as a figure names it."""
    return {"time": "training time (s, log scale)", "epochs": "training epochs (log scale)",
            "calibrated": f"calibrated training time (s on {calibration.device_name if calibration else '?'}, log "
                          f"scale)", "flops": "training FLOPs (log scale)"}[axis]


def unit(axis):
    return {"time": "s", "epochs": "epochs", "calibrated": "calibrated s", "flops": "FLOPs"}[axis]


def annotate(runs, axis, calibration=None, study="RUNS_DIR"):
    """Put the axis's values on every row of every run (axis_time, axis_cost, axis_rounds, axis_run_steps);
    AxisError naming the first run that cannot have them (study: the folder to calibrate, for its message).
    calibration: needed on the calibrated axis; on the FLOPs axis it counts runs made before train.py did."""
    built = {}  # cost key -> MethodList: a resizing configuration's methods are built once
    for run in runs:
        for row, values in zip(run.rows, run_axis(run, axis, calibration, built, study)):
            row["axis_time"], row["axis_cost"], row["axis_rounds"], row["axis_run_steps"] = values


def run_axis(run, axis, calibration, cache, study):
    """[(axis_time, axis_cost, per-round (times, costs), run steps)] per row of the run."""
    config, where = run.config, os.path.join(run.path, "config.json")
    key = costs.cost_key(config)
    entry = calibration.entries.get(costs.key_text(key)) if calibration is not None else None
    if axis == "calibrated" and entry is None:
        raise AxisError(f"{calibration.path} has no step cost of the configuration of {run.path} (another model, "
                        f"methods, batch, precision or layout than it calibrated); run {calibration.command}")
    recorded = config.get("train_flops_per_image_by_side")
    recorded = recorded if isinstance(recorded, dict) and recorded else None
    per_image = recorded or ({s: v["train_flops_per_image"] for s, v in entry["sides"].items()} if entry else None)
    prices = calibration.path if entry and not recorded else where  # where the FLOPs per image come from
    if axis == "flops" and per_image is None and not all(has_flops(r) for r in run.rows):
        raise AxisError(f"{run.path} records no training FLOPs (made before train.py counted them) and no "
                        f"calibration.json at or above it counts its configuration's: run python -m "
                        f"benchmarks.calibrate {study} (it counts them), then analyse again")
    sides = sorted(entry["sides"] if entry else per_image or [None])
    try:
        counts = step_counts(run, key, sides, entry, cache)
        return [row_axis(run, row, counts, axis, entry, per_image, calibration, prices) for row in run.rows]
    except (KeyError, TypeError, ValueError) as e:
        raise AxisError(f"{where}: its steps cannot be counted from its schedule ({e})") from None
    except MissingSize as e:
        raise AxisError(f"{e.args[0]} has no cost of the {e.args[1]} images {run.path} trains at (a run added since "
                        f"it was made?); run python -m benchmarks.calibrate {study} again") from None


class MissingSize(Exception):
    """A run trains at an image size its price list (calibration.json, config.json's FLOPs) lacks."""


def row_axis(run, row, counts, axis, entry, per_image, calibration, prices):
    """(axis_time, axis_cost, per-round (times, costs), run steps) of one metrics row."""
    batch, step = run.config["batch_size"], int(round(row["step"]))
    path = counts.path(step)
    taken = counts.run(step if counts.plan is None else
                       costs.run_steps_at_row(counts.plan, step, is_branch_row(run, row)))
    if axis == "flops":
        if has_flops(row):
            t, c = float(row["train_flops"]), float(row["curve_cost_flops"])
        else:
            check_sizes(taken, per_image, prices)
            t, c = costs.priced(path, per_image) * batch, costs.priced(taken, per_image) * batch
        return t, c, ((t,), (c,)), sum(taken.values())
    check_sizes(taken, entry["sides"], calibration.path)
    step_s = {s: v["step_s"] for s, v in entry["sides"].items()}
    by_round = [{s: v["rounds"][r] for s, v in entry["sides"].items()} for r in range(calibration.rounds)]
    return (costs.priced(path, step_s), costs.priced(taken, step_s),
            (tuple(costs.priced(path, p) for p in by_round), tuple(costs.priced(taken, p) for p in by_round)),
            sum(taken.values()))


def check_sizes(counts, price, where):
    missing = sorted(set(counts) - set(price))
    if missing:
        raise MissingSize(where, missing[0])


def has_flops(row):
    try:
        return math.isfinite(float(row.get("train_flops"))) and math.isfinite(float(row.get("curve_cost_flops")))
    except (TypeError, ValueError):
        return False


def is_branch_row(run, row):
    return run.schedule == "wsd" and row["cycle_end"] == 1


def step_counts(run, key, sides, entry, cache):
    """costs.StepCounts of the run: one size, or (a method that resizes) each path step's size from its plan."""
    plan = costs.plan_of(run.config) if run.schedule == "wsd" or len(sides) > 1 else None
    if len(sides) == 1:
        return costs.StepCounts(plan, None, sides[0])
    methods = cache.get(costs.key_text(key))
    if methods is None:
        methods = cache[costs.key_text(key)] = costs.methods_of(run.config)
    if entry is not None:
        size = tuple(entry["image_shape"][1:])
    else:  # the largest size it trains at: resizing shrinks the data's images
        size = max((tuple(int(v) for v in s.split("x")) for s in sides), key=lambda hw: hw[0] * hw[1])
    return costs.StepCounts(plan, costs.step_sides(plan, methods, size, run.config["steps_per_epoch"]))


def calibration_lines(calibration, runs):
    """What the calibrated axis is, on which device, and where the runs trained elsewhere (or on another torch)."""
    trained = sorted({n for r in runs for n in (r.config.get("device_names") or [r.config.get("device_name")])
                      if n} | set())
    versions = sorted({str(r.config.get("torch_version")) for r in runs if r.config.get("torch_version")})
    lines = [f"calibrated time: each run's optimizer steps x its configuration's step cost measured on "
             f"{calibration.device_name} (torch {calibration.torch_version}, {calibration.date}, "
             f"{calibration.rounds} interleaved rounds; {calibration.path})"]
    other = [n for n in trained if n != calibration.device_name]
    if other or versions != [calibration.torch_version]:
        lines.append(f"the runs trained on {'; '.join(trained) or 'unrecorded hardware'} (torch "
                     f"{', '.join(versions) or '?'}): their calibrated times are what their steps cost on "
                     f"{calibration.device_name} with torch {calibration.torch_version}, not what they took")
    return lines
