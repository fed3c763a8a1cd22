"""What a run's training costs, counted from its plan: the image size each optimizer step trains at, the steps at
each size so far (along one model's path, and over the whole run: wsd's branches), and the configuration that fixes
a step's cost on a device. train.py records `train_flops` with it; analysis and benchmarks.calibrate read every run
with it, older ones included, so that a recorded count and a derived one cannot differ.

Pure Python and NumPy; torch is imported only where a run's methods must be built to learn its sizes."""
import json
from collections import Counter

import numpy as np

import schedules
from runformat import ADDED_DEFAULTS, canonical_methods, method_options

# What changes the cost of one optimizer step on a given device, seed, schedule and LR aside: runs equal in all of
# these share one entry of calibration.json. A method's options are in method_options (every option, defaults
# included); schedule_free: its optimizer is another (SGDScheduleFree); check_finite: --skip-nonfinite's sync per step;
# compile_dynamic: how a compiled model takes its image sizes (compile_choice.compile_model).
COST_KEYS = ("dataset", "augment", "decode", "image_size", "model", "model_kwargs", "methods", "method_options",
             "plugins", "batch_size", "grad_accum", "world_size", "amp", "opt", "schedule_free", "decay_excluded",
             "clip_grad", "compile", "deterministic", "check_finite", "compile_dynamic")
# runs (and calibration.json keys) from before the options; compile_dynamic None: torch.compile's default, as runs
# compiled before the key were
COST_DEFAULTS = {"compile": False, "deterministic": False, "skip_nonfinite": 0, "compile_dynamic": None}


def cost_key(config):
    """The COST_KEYS of a run's config.json as a dict (missing keys: the value runs had before the key).
    compile_dynamic only splits runs compiled at several image sizes: eager, or at one size (one static graph
    whichever way: a fresh run records false, a run from before the key none), it is None."""
    c = {**ADDED_DEFAULTS, **COST_DEFAULTS, **config}
    sides = c.get("train_flops_per_image_by_side")  # (runs from before it: as recorded)
    derived = {"methods": canonical_methods(config), "method_options": method_options(config),
               "schedule_free": c["schedule"] == "schedule-free", "check_finite": bool(c["skip_nonfinite"]),
               "compile_dynamic": None if not c["compile"] or (sides is not None and len(sides) == 1)
               else c["compile_dynamic"]}
    return {k: derived[k] if k in derived else c.get(k) for k in COST_KEYS}


def method_specs(key):
    """--method specs of a cost key's methods with every option given ('mixup:alpha=0.2'): built as the run built
    them even where a default changed since."""
    from methods.api import format_value
    return [name + "".join(f"{':' if i == 0 else ','}{k}={format_value(v)}" for i, (k, v) in
                           enumerate(sorted(key["method_options"].get(name, {}).items())))
            for name in (spec.split(":")[0] for spec in key["methods"])]


def methods_of(config):
    """The MethodList a run's config.json records (plug-in files loaded from the paths it recorded)."""
    from methods import MethodList, build, load_plugins
    load_plugins(config.get("plugin_files") or [])
    return MethodList([build(spec) for spec in method_specs(cost_key(config))])


def key_text(key):
    """A cost key as canonical JSON text: what two keys are compared by (a key written before compile_dynamic was
    one reads as its default)."""
    return json.dumps({"compile_dynamic": COST_DEFAULTS["compile_dynamic"], **key}, sort_keys=True)


def plan_of(config):
    """The schedule a run's config.json describes, in optimizer steps (train.make_plan's); ValueError (or a
    KeyError, TypeError) where the config cannot give one."""
    c = config
    t0, t_mult = c.get("family_t0", c["t0"]), c.get("family_t_mult", c["t_mult"])
    plan = schedules.make_plan(c["schedule"], c["epochs"], c["warmup_epochs"], t0, t_mult, c["steps_per_epoch"],
                               c.get("cycle_decay", 1.0), c.get("cooldown_frac", 0.2),
                               c.get("cooldown_shape", "1-sqrt"))
    if c["schedule"] == "schedule-free" and c.get("sf_warmup_epochs") is not None:
        from dataclasses import replace
        plan = replace(plan, warmup_steps=round(c["sf_warmup_epochs"] * c["steps_per_epoch"]))
    return plan


def step_context(plan, path_step, steps_per_epoch, seed=0, rank=0, world_size=1, num_classes=0):
    """The methods' Context of a path step (methods/api.py), as train.py's loop makes it."""
    from methods import Context
    return Context(step=path_step, epoch=path_step / steps_per_epoch, rank=rank, world_size=world_size, seed=seed,
                   run_progress=path_step / plan.total_steps, cycle_progress=plan.budget_progress(path_step),
                   num_classes=num_classes)


def side_name(size):
    """(H, W) as calibration.json and config.json name an image size: '28x28'."""
    return f"{size[0]}x{size[1]}"


def step_sides(plan, methods, size, steps_per_epoch):
    """The size name of every path step of `plan` (a list), or None where no method changes the size."""
    if not methods.resizes:
        return None
    names = {}
    return [names.setdefault(s, side_name(s)) for s in (
        methods.train_image_size(size, step_context(plan, p, steps_per_epoch)) for p in range(plan.total_steps))]


class StepCounts:
    """Optimizer steps per image size: along a model's path up to a path step, or over the run up to a run step.
    `sides`: each path step's size name (step_sides), or None with `side` the one size of every step."""

    def __init__(self, plan, sides=None, side=None):
        self.plan, self.side = plan, side
        self.prefix = None
        if sides is not None:
            names = sorted(set(sides))
            index = np.array([names.index(s) for s in sides], dtype=np.int64)
            self.prefix = {n: np.concatenate([[0], np.cumsum(index == i)]) for i, n in enumerate(names)}

    @property
    def sides(self):
        return sorted(self.prefix) if self.prefix is not None else [self.side]

    def path(self, n):
        """{size: steps} of path steps [0, n)."""
        if self.prefix is None:
            return {self.side: n}
        n = min(n, self.plan.total_steps)
        return {s: int(p[n]) for s, p in self.prefix.items() if p[n]}

    def run(self, n):
        """{size: steps} of run steps [0, n): wsd's trunk and every branch taken so far."""
        if self.plan is None or self.plan.schedule != "wsd":  # run steps are path steps
            return self.path(n)
        out = Counter()
        for seg in self.plan.segments():
            take = min(seg.end - seg.start, n - seg.run_start)
            if take <= 0:
                break
            out.update(subtract(self.path(seg.start + take), self.path(seg.start)))
        return dict(out)


def subtract(a, b):
    return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}


def run_steps_at_row(plan, step, branch_row):
    """Run steps the process had taken when it wrote the row of path step `step`: a wsd branch's row (its
    cycle_end row) after its trunk's and branches' steps before it; every other schedule's row after `step`."""
    if plan.schedule != "wsd":
        return step
    kind = "branch" if branch_row else "trunk"
    seg = next((s for s in plan.segments() if s.kind == kind and s.start < step <= s.end), None)
    if seg is None:
        raise ValueError(f"no {kind} segment of the wsd plan ends a row at step {step}")
    return seg.run_start + step - seg.start


def priced(counts, price):
    """sum over sizes of steps x price[size]: FLOPs or seconds of the steps counted."""
    return sum(n * price[side] for side, n in counts.items())
