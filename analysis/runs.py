"""Read run directories (../shared/run-format.md) into tradeoff-curve points and match curves.

Only config.json, metrics.csv and done are read, so runs from any tool that writes the format work.
"""
import csv
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

REQUIRED_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "train_time_s", "cycle",
                    "cycle_end")
NUMERIC = ("epoch", "step", "lr", "val_acc1", "train_time_s", "cycle", "cycle_end")
MATCH_TOLERANCE = 0.05  # budgets match across curves when epochs agree within 5 %


class RunError(ValueError):
    """A run directory that cannot be read; the message names the file."""


@dataclass
class Run:
    path: str
    config: dict
    rows: list  # dicts with floats for NUMERIC columns
    done: bool

    @property
    def methods(self):
        return methods_label(self.config.get("methods", []))

    @property
    def schedule(self):
        return self.config["schedule"]


@dataclass
class Point:
    methods: str
    schedule: str
    epochs: float
    time_s: float
    acc: float
    run: str


@dataclass
class CurvePoint:
    methods: str
    schedule: str
    epochs: float
    n: int
    acc_mean: float
    acc_std: float
    time_mean: float
    accs: list = field(default_factory=list)


def methods_label(methods):
    return "+".join(sorted(methods)) or "baseline"


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def find_run_dirs(paths):
    """Every directory at or below `paths` that holds a config.json or a metrics.csv."""
    found = []
    for root in paths:
        if not os.path.exists(root):
            raise RunError(f"{root}: no such file or directory")
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x != "checkpoints")
            if "config.json" in files or "metrics.csv" in files:
                found.append(d)
    return sorted(set(found))


def read_run(path):
    cfg_path, csv_path = os.path.join(path, "config.json"), os.path.join(path, "metrics.csv")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{cfg_path}: unreadable ({e})")
    for key in ("schedule", "methods", "epochs"):
        if key not in config:
            raise RunError(f"{cfg_path}: missing key '{key}'")
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise RunError(f"{csv_path}: missing column(s) {', '.join(missing)}")
            rows = []
            for line, raw in enumerate(reader, start=2):
                row = dict(raw)
                for c in NUMERIC:
                    try:
                        row[c] = float(raw[c])
                    except (TypeError, ValueError):
                        raise RunError(f"{csv_path}:{line}: column {c} is not a number ({raw[c]!r})")
                rows.append(row)
    except OSError as e:
        raise RunError(f"{csv_path}: unreadable ({e})")
    if not rows:
        raise RunError(f"{csv_path}: no rows")
    return Run(path, config, rows, os.path.exists(os.path.join(path, "done")))


def load_runs(paths, include_partial=False):
    """Readable runs below `paths`; malformed ones and (unless asked) unfinished ones are skipped with a warning."""
    runs = []
    for d in find_run_dirs(paths):
        try:
            run = read_run(d)
        except RunError as e:
            warn(f"skipped: {e}")
            continue
        if not run.done and not include_partial:
            warn(f"skipped unfinished run {d} (no 'done'; --include-partial to use it)")
            continue
        runs.append(run)
    return runs


def run_points(run, metric="max"):
    """The curve points of one run: a standard run gives one, a cyclic or constant run one per cycle end."""
    if run.schedule == "standard":
        last = run.rows[-1]
        acc = max(r["val_acc1"] for r in run.rows) if metric == "max" else last["val_acc1"]
        return [Point(run.methods, "standard", last["epoch"], last["train_time_s"], acc, run.path)]
    points = []
    for r in run.rows:
        if r["cycle_end"] != 1:
            continue
        acc = r["val_acc1"]
        if metric == "max":
            acc = max(x["val_acc1"] for x in run.rows if x["cycle"] == r["cycle"] and x["step"] <= r["step"])
        points.append(Point(run.methods, run.schedule, r["epoch"], r["train_time_s"], acc, run.path))
    return points


def curves(runs, metric="max"):
    """{(methods, schedule): [CurvePoint sorted by epochs]}: points averaged over seeds."""
    groups = defaultdict(list)
    for run in runs:
        for p in run_points(run, metric):
            groups[(p.methods, p.schedule, round(p.epochs, 3))].append(p)
    out = defaultdict(list)
    for (methods, schedule, epochs), pts in groups.items():
        accs = [p.acc for p in pts]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        out[(methods, schedule)].append(CurvePoint(methods, schedule, epochs, len(pts), mean, std,
                                                   sum(p.time_s for p in pts) / len(pts), accs))
    for pts in out.values():
        pts.sort(key=lambda p: p.epochs)
    return dict(out)


def match(curve_a, curve_b, min_epochs=0.0):
    """Pairs (a, b) of points whose epochs agree within 5 %; each point used once, nearest first."""
    pairs, used = [], set()
    for a in curve_a:
        if a.epochs < min_epochs:
            continue
        best = min((b for b in curve_b if id(b) not in used), key=lambda b: abs(b.epochs - a.epochs), default=None)
        if best is not None and abs(best.epochs - a.epochs) <= MATCH_TOLERANCE * max(a.epochs, best.epochs):
            pairs.append((a, best))
            used.add(id(best))
    return pairs


def pearson(xs, ys):
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
