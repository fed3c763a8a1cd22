"""Read run directories (docs/run-format.md) into tradeoff-curve points, grouped so that only seeds are averaged.

Only config.json, metrics.csv and done are read, so runs from any tool that writes the format work.
Public: load_runs, read_run, RunError, group_runs, complete_seeds, curves, group_curves, match, restrict,
point_records, row_records, order_methods.
"""
import csv
import io
import json
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from analysis import stats
from runformat import (ADDED_DEFAULTS, LEGACY_METHOD_OPTIONS, canonical_methods, is_legacy,  # noqa: F401 (re-exported)
                       method_options)
from schedules import CYCLIC, SCHEDULES

REQUIRED_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "train_time_s", "cycle",
                    "cycle_end")
NUMERIC = ("epoch", "step", "lr", "val_acc1", "train_time_s", "cycle", "cycle_end")
FINITE = ("epoch", "step", "cycle", "cycle_end")  # a curve point cannot be placed without these
# Each column's range. A cell outside it (accuracy 1e9, a negative time) is damage: its row counts as a row of
# non-finite accuracy (no curve point, no peak), with one warning. Empty cells are "none" (train_loss after only
# skipped steps, val_acc5 under 5 classes); non-finite losses and accuracies are how a diverged run ends.
# train_loss (and train_loss_epoch) is whatever the methods' loss hooks return (a confidence penalty can make it
# negative): a number.
RANGES = {"val_acc1": (0, 100), "val_acc5": (0, 100), "train_loss": (-math.inf, math.inf), "val_loss": (0, math.inf),
          "train_time_s": (0, math.inf), "curve_cost_s": (0, math.inf), "train_loss_epoch": (-math.inf, math.inf)}
NON_FINITE_OK = ("val_acc1", "val_acc5", "train_loss", "val_loss", "train_loss_epoch")
MATCH_TOLERANCE = 0.05  # budgets match across curves when epochs agree within 5 %
ESTIMATORS = tuple(s for s in SCHEDULES if s != "standard")  # one run gives a whole curve
# Options that change a run's result, seed aside: runs differing in any are never averaged (group_runs). t0 and
# t_mult are left out because a standard run records t0 = epochs - warmup: they only separate estimator runs
# (SHAPE_KEYS). A schedule's own options (ESTIMATOR_KEYS) split curves; a method's options are in its canonical
# name, and runs of one name whose methods differ all the same (a default changed, another plug-in file) are told
# apart by Run.method_params.
# world_size changes each rank's BatchNorm batch and MixUp draws; device and compile change the time axis;
# eval_every the rows that --metric max (the default) takes its peak from; device_name (the GPU or CPU model) the
# speed on the time axis: runs of other hardware are another group unless --pool-hardware.
RESULT_KEYS = ("dataset", "model", "subset", "augment", "decode", "image_size", "lr", "batch_size", "grad_accum",
               "warmup_epochs", "eta_min", "amp", "momentum", "nesterov", "weight_decay", "world_size", "device",
               "compile", "eval_every", "model_kwargs", "tf32", "device_name", "opt", "opt_betas", "opt_eps",
               "decay_excluded", "clip_grad", "lamb_version")
SHAPE_KEYS = ("t0", "t_mult")  # the budgets an estimator samples
ESTIMATOR_KEYS = {"cyclic-decay": ("cycle_decay",), "wsd": ("cooldown_frac", "cooldown_shape", "cooldown_version"),
                  "schedule-free": ("sf_lr", "sf_warmup_epochs")}  # options that matter to one schedule only


# config.json keys read as numbers (the curve's budgets, the schedule figure's LR): checked when a run is read, so
# that one damaged run is skipped with one line instead of stopping a report. SCHEDULE_KEYS: what the schedule
# figure needs to redraw a run's LR from its config (without them it draws the logged LR).
NUMBER_KEYS = ("epochs", "warmup_epochs", "t0", "t_mult", "lr", "eta_min", "steps_per_epoch")
SCHEDULE_KEYS = ("epochs", "warmup_epochs", "t0", "t_mult", "lr", "steps_per_epoch")


class RunError(ValueError):
    """A run directory that cannot be read; the message names the file."""


@dataclass
class Run:
    path: str
    config: dict
    rows: list  # dicts with floats for NUMERIC columns (and curve_cost_s where present)
    done: bool
    variant: str = ""  # set by group_runs where a method set was run with several strengths: "mixup=0.4"
    schedule_variant: str = ""  # likewise for a schedule's own options: "cooldown_frac=0.4"
    pooled: tuple = ()  # RESULT_KEYS left out of the family (load_runs' pool: --pool-hardware)

    @property
    def methods(self):
        label = methods_label(canonical_methods(self.config))
        return f"{label} ({self.variant})" if self.variant else label

    @property
    def schedule(self):
        return self.config["schedule"]

    def option(self, key):
        """config[key] as a hashable value: None when missing (the default for keys runs predate), JSON text for a
        list or an object."""
        value = self.config.get(key, ADDED_DEFAULTS.get(key))
        return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value

    @property
    def seed(self):
        return self.option("seed")

    @property
    def family(self):
        """The result-defining options, seed and schedule shape aside; a missing key counts as None."""
        return tuple((k, self.option(k)) for k in RESULT_KEYS if k not in self.pooled)

    @property
    def curve(self):
        """The name of the run's curve: its schedule, with its variant where one schedule has several."""
        return f"{self.schedule} ({self.schedule_variant})" if self.schedule_variant else self.schedule

    @property
    def method_params(self):
        """What the method set's name does not say: every option of its methods, defaults included (a default
        changed between runs), and each plug-in method's file hash (an edited plug-in)."""
        return (("methods", json.dumps(method_options(self.config), sort_keys=True)),
                ("plugins", json.dumps(self.config.get("plugins") or {}, sort_keys=True)))

    @property
    def schedule_params(self):
        """The options only the run's schedule uses (wsd's cooldown, schedule-free's LR, ...)."""
        return tuple((k, self.option(k)) for k in ESTIMATOR_KEYS.get(self.schedule, ()))

    @property
    def shape(self):
        """An estimator's schedule shape; () for a standard run, which joins every shape of its family."""
        return () if self.schedule == "standard" else tuple((k, self.option(k)) for k in SHAPE_KEYS)


@dataclass
class Point:
    methods: str
    schedule: str
    epochs: float
    time_s: float
    acc: float
    run: str
    seed: object = None
    cost_s: float = None  # curve_cost_s: the whole run's compute so far (train_time_s where absent)
    axis_time: float = None  # --x calibrated or flops (analysis.axes.annotate): the row's value, as time_s
    axis_cost: float = None  # ... and the whole run's so far, as cost_s
    axis_rounds: tuple = None  # calibrated: (times, costs) with each calibration round's step costs


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
    seeds: list = field(default_factory=list)
    times: list = field(default_factory=list)
    costs: list = field(default_factory=list)
    acc_lo: float = None  # 95 % CI of acc_mean over seeds; None with one seed
    acc_hi: float = None
    axis_times: list = field(default_factory=list)  # per run: Point.axis_time, axis_cost, axis_rounds
    axis_costs: list = field(default_factory=list)
    axis_rounds: list = field(default_factory=list)

    @property
    def cost_mean(self):
        return sum(self.costs) / len(self.costs)

    @property
    def axis_time_mean(self):
        return mean_of(self.axis_times)

    @property
    def axis_cost_mean(self):
        return mean_of(self.axis_costs)

    def x(self, axis):
        """Where the point sits on a curve's x axis: 'time' (mean train_time_s), 'epochs', or the mean of a new
        axis's values (analysis.axes: 'calibrated', 'flops')."""
        return self.time_mean if axis == "time" else self.epochs if axis == "epochs" else self.axis_time_mean

    def samples(self, value="acc"):
        """(seed, value) per run behind the point; value is 'acc', 'time', 'cost', 'axis_time', 'axis_cost' or
        'axis_rounds'."""
        return list(zip(self.seeds, {"acc": self.accs, "time": self.times, "cost": self.costs,
                                     "axis_time": self.axis_times, "axis_cost": self.axis_costs,
                                     "axis_rounds": self.axis_rounds}[value]))


def mean_of(values):
    """The mean, or None where some value is missing (no axis annotated)."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def methods_label(methods):
    return "+".join(sorted(methods)) or "baseline"


def order_methods(method_sets):
    """Method-set labels in display order: the baseline, then by number of methods, then by name."""
    return sorted(set(method_sets), key=lambda m: (m != "baseline", m.count("+"), m))


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def find_run_dirs(paths):
    """Every directory at or below `paths` that holds a config.json or a metrics.csv."""
    found = []
    for root in paths:
        if not os.path.exists(root):
            raise RunError(f"{root}: no such file or directory")
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in ("checkpoints", "tensorboard", "wandb"))
            if "config.json" in files or "metrics.csv" in files:
                found.append(d)
    return sorted(set(found))


def read_text(path):
    """A file's text; RunError naming the file and line when it is unreadable or not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RunError(f"{path}: unreadable ({e.strerror})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RunError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); the file is damaged")


def read_config(path):
    """config.json as a dict holding valid schedule, methods and epochs; RunError otherwise."""
    cfg_path = os.path.join(path, "config.json")
    try:
        config = json.loads(read_text(cfg_path))
    except json.JSONDecodeError as e:
        raise RunError(f"{cfg_path}: not JSON ({e.msg} at line {e.lineno})")
    if not isinstance(config, dict):
        raise RunError(f"{cfg_path}: holds {type(config).__name__}, not an object of options")
    for key in ("schedule", "methods", "epochs"):
        if key not in config:
            raise RunError(f"{cfg_path}: missing key '{key}'")
    if not isinstance(config["schedule"], str):
        raise RunError(f"{cfg_path}: 'schedule' must be a name, not {config['schedule']!r}")
    if not isinstance(config["methods"], list) or not all(isinstance(m, str) for m in config["methods"]):
        raise RunError(f"{cfg_path}: 'methods' must be a list of names, not {config['methods']!r}")
    for key in NUMBER_KEYS:  # a missing one is a value of its own (None), as in a hand-written config
        value = config.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RunError(f"{cfg_path}: '{key}' must be a finite number, not {value!r}")
    return config


def parse_row(raw, csv_path, line):
    """One metrics.csv row with NUMERIC columns (and curve_cost_s) as floats; RunError on a bad cell."""
    row = dict(raw)
    for c in NUMERIC:
        try:
            row[c] = float(raw[c])
        except (TypeError, ValueError):
            raise RunError(f"{csv_path}:{line}: column {c} is not a number ({raw[c]!r})")
        if c in FINITE and not math.isfinite(row[c]):
            raise RunError(f"{csv_path}:{line}: column {c} is {raw[c]!r}")
    try:
        row["curve_cost_s"] = float(raw.get("curve_cost_s"))
    except (TypeError, ValueError):
        row["curve_cost_s"] = row["train_time_s"]  # old runs, and runs where nothing branches
    row["line"] = line
    bad = row["damaged"] = damaged_column(row, raw)
    if bad:
        warn(f"{csv_path}:{line}: column {bad} is {raw.get(bad, row[bad])!r}, outside [{RANGES[bad][0]:g}, "
             f"{RANGES[bad][1]:g}]; that row is left out (no curve point)")
        row["val_acc1"] = math.nan
    return row


def damaged_column(row, raw):
    """The first column of `row` whose cell is outside its RANGES (text that is not a number included), or None."""
    for c, (low, high) in RANGES.items():
        cell = row[c] if c in NUMERIC or c == "curve_cost_s" else raw.get(c)
        if cell in (None, ""):  # empty, or an optional column the run does not have
            continue
        try:
            value = float(cell)
        except ValueError:
            return c
        if not (low <= value <= high if math.isfinite(value) else c in NON_FINITE_OK):
            return c
    return None


def read_metrics(path, done):
    """metrics.csv's rows; a last row cut short mid-write is dropped with a warning, or refused in a done run."""
    csv_path = os.path.join(path, "metrics.csv")
    text = read_text(csv_path)
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise RunError(f"{csv_path}: missing column(s) {', '.join(missing)}")
    raws = list(enumerate(reader, start=2))
    if raws and not text.endswith("\n") and None in raws[-1][1].values():  # fewer fields than the header
        if done:
            raise RunError(f"{csv_path}:{raws[-1][0]}: last row cut short, yet the run is marked done")
        warn(f"{csv_path}:{raws[-1][0]}: last row cut short (run still being written?), ignored")
        raws.pop()
    if not raws:
        raise RunError(f"{csv_path}: no rows")
    return [parse_row(raw, csv_path, line) for line, raw in raws]


def read_run(path):
    """The Run in directory `path`; RunError naming the file when it cannot be read."""
    done = os.path.exists(os.path.join(path, "done"))
    return Run(path, read_config(path), read_metrics(path, done), done)


def load_runs(paths, include_partial=False, pool=()):
    """Readable runs below `paths`; malformed ones and (unless asked) unfinished ones are skipped with a warning.
    `pool`: result-defining keys whose runs may be averaged together all the same (("device_name",): the seeds of
    a study that ran on several kinds of hardware; their times then mix speeds, which the report says)."""
    runs, unknown = [], defaultdict(list)
    for d in find_run_dirs(paths):
        if not include_partial and not os.path.exists(os.path.join(d, "done")):
            warn(f"skipped unfinished run {d} (no 'done'; --include-partial to use it)")
            continue
        if os.path.exists(os.path.join(d, "claimed-twice")):  # (plan.py: its plan line ran twice, maybe at once)
            warn(f"skipped suspect run {d} (claimed-twice: two workers may have written it at once; check it, then "
                 f"delete the folder to run it again, or the file to keep it)")
            continue
        try:
            run = read_run(d)
        except RunError as e:
            warn(f"skipped: {e}")
            continue
        if run.schedule not in ("standard",) + ESTIMATORS:
            unknown[run.schedule].append(d)
        run.pooled = tuple(pool)
        runs.append(run)
    for schedule, dirs in unknown.items():
        warn(f"unknown schedule '{schedule}' ({len(dirs)} runs, e.g. {dirs[0]}): read as a one-run estimator "
             "(a point per cycle_end row, at that row's accuracy)")
    return runs


def point_acc(run, row, metric):
    """A point's accuracy: its own row's, or with metric max the best of its run (standard) or its cycle."""
    if metric != "max":
        return row["val_acc1"]
    if run.schedule == "standard":
        rows = run.rows
    elif run.schedule in CYCLIC:  # the best row of the point's own cycle
        rows = [x for x in run.rows if x["cycle"] == row["cycle"] and x["step"] <= row["step"]]
    else:  # wsd branches, schedule-free budgets, unknown schedules: rows of other points are not comparable
        rows = [row]
    return max((x["val_acc1"] for x in rows if math.isfinite(x["val_acc1"])), default=math.nan)


def run_points(run, metric="max"):
    """The curve points of one run: a standard run gives one, an estimator one per cycle_end row.

    A point whose own row has a non-finite val_acc1 (a diverged run) is left out with one warning per run."""
    ends = [run.rows[-1]] if run.schedule == "standard" else [r for r in run.rows if r["cycle_end"] == 1]
    points, lost = [], []
    for r in ends:
        if not math.isfinite(r["val_acc1"]):
            lost.append(r)
            continue
        points.append(Point(run.methods, run.curve, r["epoch"], r["train_time_s"], point_acc(run, r, metric),
                            run.path, run.seed, r["curve_cost_s"], r.get("axis_time"), r.get("axis_cost"),
                            r.get("axis_rounds")))
    lost = [r for r in lost if not r.get("damaged")]  # a damaged row was told of when it was read
    if lost:
        warn(f"{os.path.join(run.path, 'metrics.csv')}: val_acc1 is not a finite number at epoch(s) "
             f"{', '.join(format(r['epoch'], 'g') for r in lost)}; those points left out")
    return points


def describe(keys_values, differing):
    """'k=v k=v' for the keys in `differing`."""
    return " ".join(f"{k}={v}" for k, v in keys_values if k in differing)


def differing_keys(tuples):
    """Keys whose values are not the same in every one of the (key, value) tuples."""
    return {k for k in {k for t in tuples for k, _ in t} if len({dict(t).get(k) for t in tuples}) > 1}


def name_variants(runs):
    """Set run.variant (run.schedule_variant) where runs of one family and method set (schedule) differ in the
    options of a method (of the schedule), so that they make separate method sets (curves)."""
    for run in runs:
        run.variant = run.schedule_variant = ""
    for attr, params, key in (("variant", "method_params", "methods"), ("schedule_variant", "schedule_params",
                                                                         "schedule")):
        sets = defaultdict(list)
        for run in runs:
            sets[(run.family, getattr(run, key))].append(run)
        for members in sets.values():
            differing = differing_keys({getattr(r, params) for r in members})
            for r in members:
                setattr(r, attr, describe(getattr(r, params), differing))


def group_runs(runs):
    """{label: runs} where runs differ only in seed; the label names the options that differ between groups.

    One group per family of result-defining options. Within a family, estimator runs of several schedule shapes
    (t0, t_mult) make a group per shape, each holding the family's standard runs too; a method set run with
    several strengths becomes one method set per strength, named like 'mixup (mixup=0.4)'."""
    families = defaultdict(list)
    for run in runs:
        families[run.family].append(run)
    name_variants(runs)
    varying = differing_keys(list(families))
    groups = {}
    for family, members in families.items():
        label = describe(family, varying)
        shapes = {r.shape for r in members if r.schedule != "standard"}
        per_schedule = defaultdict(set)
        for r in members:
            per_schedule[r.schedule].add(r.shape)
        if all(len(s) <= 1 for s in per_schedule.values()):
            groups[label] = members
            continue
        standard = [r for r in members if r.schedule == "standard"]
        shape_keys = differing_keys(list(shapes))
        for shape in sorted(shapes, key=repr):
            same_shape = [r for r in members if r.shape == shape]
            groups[f"{label} {describe(shape, shape_keys)}".strip()] = standard + same_shape
    return groups


def complete_seeds(runs):
    """(kept, left_out) for the runs of one group: per method set only the seeds that have every run it needs, so
    that while a sweep is unfinished each comparison is cyclic seed s against standard seed s over the same seeds.
    A seed needs every standard budget some seed of the set has and every estimator run that 2+ seeds have (a
    one-seed run, an ablation, drops nobody). left_out: (methods, seed, [missing (curve, epochs)]). A set where
    no seed has all it needs keeps every seed, with a warning (each comparison then pairs the seeds it can)."""
    held = defaultdict(lambda: defaultdict(set))  # methods -> seed -> {(curve, epochs)}
    for r in runs:
        held[r.methods][r.seed].add((r.curve, round(float(r.config["epochs"]), 3)))
    left_out = []
    for m, seeds in held.items():
        count = Counter(slot for got in seeds.values() for slot in got)
        needed = {slot for slot, n in count.items() if slot[0] == "standard" or n >= min(2, len(seeds))}
        missing = {seed: sorted(needed - got) for seed, got in seeds.items()}
        if all(missing.values()):
            warn(f"--complete-seeds: no seed of {m} has every run the others have; all its seeds are kept")
            continue
        left_out += [(m, seed, lacks) for seed, lacks in missing.items() if lacks]
    dropped = {(m, seed) for m, seed, _ in left_out}
    return [r for r in runs if (r.methods, r.seed) not in dropped], left_out


def average(points):
    """One CurvePoint from the points of one (group, methods, schedule, budget): their mean, std and 95 % CI."""
    p0 = points[0]
    return curve_point(p0.methods, p0.schedule, p0.epochs, *([getattr(p, k) for p in points] for k in (
        "seed", "acc", "time_s", "cost_s", "axis_time", "axis_cost", "axis_rounds")))


def curve_point(methods, schedule, epochs, seeds, accs, times, costs, axis_times, axis_costs, axis_rounds):
    """The CurvePoint of these runs (one per seed): mean, std and 95 % CI of their accuracies, their mean time."""
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
    lo, hi = stats.mean_ci(accs)
    return CurvePoint(methods, schedule, epochs, len(accs), mean, std, sum(times) / len(times), list(accs),
                      list(seeds), list(times), list(costs), lo, hi, list(axis_times), list(axis_costs),
                      list(axis_rounds))


def restrict(point, seeds):
    """`point` averaged over its runs of `seeds` only (at least one of them)."""
    keep = [i for i, seed in enumerate(point.seeds) if seed in seeds]
    return curve_point(point.methods, point.schedule, point.epochs, *([col[i] for i in keep] for col in (
        point.seeds, point.accs, point.times, point.costs, point.axis_times, point.axis_costs, point.axis_rounds)))


def group_curves(runs, metric="max"):
    """{(methods, schedule): [CurvePoint sorted by epochs]} of runs of one group: points averaged over seeds."""
    buckets = defaultdict(dict)
    for run in runs:
        for p in run_points(run, metric):
            seeds = buckets[(p.methods, p.schedule, round(p.epochs, 3))]
            if p.seed in seeds:  # a copy of a run (another folder, a rerun) is not another seed
                warn(f"seed {p.seed} of {p.methods} {p.schedule} at {p.epochs:g} epochs appears twice "
                     f"({seeds[p.seed].run} and {p.run}); using the first only")
                continue
            seeds[p.seed] = p
    cmap = defaultdict(list)
    for (methods, schedule, _), seeds in buckets.items():
        cmap[(methods, schedule)].append(average(list(seeds.values())))
    for pts in cmap.values():
        pts.sort(key=lambda p: p.epochs)
    return dict(cmap)


def curves(runs, metric="max"):
    """{group: {(methods, schedule): [CurvePoint sorted by epochs]}}, the groups of group_runs."""
    return {label: group_curves(members, metric) for label, members in group_runs(runs).items()}


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


def point_records(runs, metric="max"):
    """One dict per curve point of each run (group, methods, schedule, seed, epochs, time_s, cost_s, acc, run).

    A standard run serves every schedule shape of its family, so it appears once in each such group: filter on
    `group` before counting runs."""
    return [dict(group=label, methods=p.methods, schedule=p.schedule, seed=p.seed, epochs=p.epochs, time_s=p.time_s,
                 cost_s=p.cost_s, acc=p.acc, run=p.run)
            for label, members in group_runs(runs).items() for run in members for p in run_points(run, metric)]


def row_records(runs):
    """One dict per metrics.csv row, with its run's group, methods, schedule, seed and path in front (a standard
    run's rows once per group that holds it, as in point_records)."""
    return [dict(group=label, methods=run.methods, schedule=run.curve, seed=run.seed, run=run.path,
                 **{k: v for k, v in row.items() if k != "line"})
            for label, members in group_runs(runs).items() for run in members for row in run.rows]
