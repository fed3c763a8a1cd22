"""Learning-rate schedules of the paper and the one-run curve estimators, in optimizer steps.

Every schedule is a linear warmup followed by:
  standard       cosine decay to eta_min over the rest of the run (CosineAnnealingLR): one budget
  cyclic         cosine cycles whose period grows by t_mult (CosineAnnealingWarmRestarts): a budget per cycle end
  constant       cyclic with t_mult = 1 (the paper's Appendix B)
  cyclic-decay   cyclic whose cycle peaks decay: peak of cycle i = lr * gamma^i (--cycle-decay)
  wsd            warmup-stable-decay (Haegele et al. 2024): a trunk at the peak LR, and for every budget T_k a
                 cooldown branch copied from the trunk at (1 - f) T_k that decays to eta_min over f T_k
  schedule-free  SGDScheduleFree (Defazio et al. 2024): no schedule but its own warmup, evaluated at every budget

The one-run estimators take their budgets from the cyclic run of the same shape (warmup, t0, t_mult,
cycles), so all of them sample the same steps, and a standard run at such a budget ends on that step too.

Every period is counted in optimizer steps and the scheduler is stepped once per optimizer step,
after optimizer.step(). The closed form `lr_at` is the definition; `build_scheduler` composes
PyTorch's schedulers (a LambdaLR with the closed form where torch has none) and the tests check that
the two agree at every step. A wsd run is a sequence of segments (trunk, branch 0, trunk, branch 1,
...): its *run step* counts every optimizer step the process takes, its *path step* the steps along
one model's own path (which also fix the data a step sees); the two coincide for every other schedule.

Run as a script it plans a curve: the budgets and the cost of every schedule (`python schedules.py --warmup-epochs 8
--t0 8 --cycles 6 [--images-per-s R --train-size N --gpus G]`), and writes a schedule's LR per step (--csv).
"""
import argparse
import csv
import math
import sys
from dataclasses import dataclass


SCHEDULES = ("standard", "cyclic", "constant", "cyclic-decay", "wsd", "schedule-free")
CYCLIC = ("cyclic", "constant", "cyclic-decay")  # schedules made of cosine cycles
COOLDOWN_SHAPES = ("1-sqrt", "linear")


@dataclass(frozen=True)
class Segment:
    """A stretch of a run: path steps [start, end) of the trunk, or of cooldown branch `branch` (0-based)."""
    kind: str  # "trunk" or "branch"
    start: int
    end: int
    run_start: int  # run step of its first step
    branch: int = -1


@dataclass(frozen=True)
class Plan:
    """A schedule's shape in optimizer steps. Cyclic fields are unused by 'standard'; budget_steps are the
    curve points of wsd and schedule-free (the cycle ends of the cyclic run of the same shape)."""
    schedule: str
    total_steps: int  # path steps of the longest path
    warmup_steps: int
    t0_steps: int = 0
    t_mult: int = 2
    cycle_decay: float = 1.0
    budget_steps: tuple = ()
    cooldown_frac: float = 0.2
    cooldown_shape: str = "1-sqrt"

    def cycle_lengths(self):
        """Length in steps of each cosine cycle (one for 'standard' and the one-run estimators)."""
        if self.schedule not in CYCLIC:
            return [self.total_steps - self.warmup_steps]
        lengths, left, period = [], self.total_steps - self.warmup_steps, self.t0_steps
        while left > 0:
            lengths.append(min(period, left))
            left -= period
            period *= self.t_mult
        return lengths

    def cycle_end_steps(self):
        """Path steps after which a curve point is read: the cycle ends (LR at its minimum), the budgets of
        wsd and schedule-free, the end of a standard run."""
        if self.budget_steps:
            return list(self.budget_steps)
        ends, s = [], self.warmup_steps
        for n in self.cycle_lengths():
            s += n
            ends.append(s)
        return ends

    def budget_progress(self, step):
        """Fraction of its budget done before path step `step` (0-based): from the previous curve point (the start,
        for the first: the warmup belongs to the first cycle) to the next; a standard run's is the run's."""
        start = 0
        for end in self.cycle_end_steps():
            if step < end:
                return (step - start) / (end - start)
            start = end
        return 1.0

    def cycle_of_step(self, step):
        """Cycle (budget) index of the path step with 0-based index `step`; -1 during warmup."""
        if step < self.warmup_steps:
            return -1
        ends = self.cycle_end_steps()
        for i, end in enumerate(ends):
            if step < end:
                return i
        return len(ends) - 1

    def segments(self):
        """The run in order: for wsd trunk, branch 0, trunk, branch 1, ...; for the others one trunk."""
        if self.schedule != "wsd":
            return [Segment("trunk", 0, self.total_steps, 0)]
        out, at, run = [], 0, 0
        for k, budget in enumerate(self.budget_steps):
            branch_at = budget - round(self.cooldown_frac * budget)
            if branch_at > at:
                out.append(Segment("trunk", at, branch_at, run))
                run += branch_at - at
                at = branch_at
            out.append(Segment("branch", branch_at, budget, run, k))
            run += budget - branch_at
        return out

    @property
    def run_steps(self):
        """Optimizer steps the whole run takes (wsd: trunk plus every branch)."""
        last = self.segments()[-1]
        return last.run_start + last.end - last.start

    def segment_at(self, run_step):
        """The segment that holds run step `run_step` (0-based), and the path step it trains."""
        segments = self.segments()
        for seg in segments:
            if run_step < seg.run_start + seg.end - seg.start:
                return seg, seg.start + run_step - seg.run_start
        return segments[-1], segments[-1].end


COOLDOWN_VERSION = 2  # 1: step t at (t / length) of the way down, the last step above eta_min (before 2026-12)


def cooldown_factor(shape, t, length):
    """Fraction of the way from eta_min to the peak at step t (0-based) of a cooldown of `length` steps: below the
    peak from the first step, and exactly eta_min on the last, as a budget's last step should be (the LR of a
    cosine cycle's last step is within (pi / 2T)^2 of it)."""
    x = (t + 1) / length
    return 1 - math.sqrt(x) if shape == "1-sqrt" else 1 - x


def lr_at(plan, step, peak_lr, eta_min=0.0):
    """Closed-form LR used by optimizer step `step` (0-based run step): the schedule's definition.
    For schedule-free it is the warmup the optimizer applies itself (SGDScheduleFree's scheduled_lr)."""
    seg, step = plan.segment_at(step)
    if step < plan.warmup_steps and seg.kind == "trunk":
        return peak_lr * (step + 1) / plan.warmup_steps
    if plan.schedule == "schedule-free" or (plan.schedule == "wsd" and seg.kind == "trunk"):
        return peak_lr
    if plan.schedule == "wsd":
        return eta_min + (peak_lr - eta_min) * cooldown_factor(plan.cooldown_shape, step - seg.start,
                                                               seg.end - seg.start)
    cycle = plan.cycle_of_step(step)
    start = plan.warmup_steps + sum(plan.cycle_lengths()[:cycle])
    if plan.schedule == "standard":
        period = plan.total_steps - plan.warmup_steps
    else:
        period = plan.t0_steps * plan.t_mult ** cycle
        peak_lr = peak_lr * plan.cycle_decay ** cycle
    t_cur = step - start
    return eta_min + (peak_lr - eta_min) * (1 + math.cos(math.pi * t_cur / period)) / 2


def build_scheduler(optimizer, plan, eta_min=0.0):
    """PyTorch schedulers for `plan`; step once after every optimizer.step(). None for schedule-free.

    standard and cyclic/constant: a LambdaLR warmup handed over by SequentialLR to CosineAnnealingLR or
    CosineAnnealingWarmRestarts at the milestone. cyclic-decay and wsd, for which torch has no scheduler:
    one LambdaLR with the closed form. Resume by building a fresh one and calling load_state_dict
    (never with last_epoch >= 0: pytorch/pytorch#49630)."""
    # imported here so that planning and the analysis (which reads the schedule lists) run without torch
    from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, LambdaLR, SequentialLR
    if plan.schedule == "schedule-free":
        return None
    if plan.schedule in ("cyclic-decay", "wsd"):
        peak = optimizer.param_groups[0]["lr"]
        return LambdaLR(optimizer, lambda s: lr_at(plan, min(s, plan.run_steps - 1), peak, eta_min) / peak)
    if plan.schedule == "standard":
        main = CosineAnnealingLR(optimizer, T_max=plan.total_steps - plan.warmup_steps, eta_min=eta_min)
    else:
        main = CosineAnnealingWarmRestarts(optimizer, T_0=plan.t0_steps, T_mult=plan.t_mult, eta_min=eta_min)
    if plan.warmup_steps == 0:
        return main
    warmup = LambdaLR(optimizer, lambda s: (s + 1) / plan.warmup_steps)
    return SequentialLR(optimizer, [warmup, main], milestones=[plan.warmup_steps])


# ---- epochs <-> cycles ---------------------------------------------------------------------

def cyclic_epochs(warmup_epochs, t0, t_mult, cycles):
    """Total epochs of a cyclic run with `cycles` complete cycles."""
    return warmup_epochs + sum(t0 * t_mult ** i for i in range(cycles))


def cycles_for_epochs(warmup_epochs, t0, t_mult, epochs):
    """Number of whole cycles that fill `epochs` exactly, or raise ValueError with the nearest valid values."""
    valid = [cyclic_epochs(warmup_epochs, t0, t_mult, n) for n in range(1, 64)]
    for n, e in enumerate(valid, start=1):
        if math.isclose(e, epochs, rel_tol=1e-9):
            return n
        if e > epochs:
            nearest = ([f"{valid[n - 2]:g} ({n - 1} cycles)"] if n > 1 else []) + [f"{e:g} ({n} cycles)"]
            raise ValueError(f"--epochs {epochs:g} does not end a cycle (warmup {warmup_epochs:g} + t0 {t0:g} "
                             f"x t_mult {t_mult}); use --epochs {' or '.join(nearest)}, or --cycles N")
    raise ValueError(f"--epochs {epochs:g} is too large for t0 {t0:g}")


def cycle_end_epochs(warmup_epochs, t0, t_mult, cycles):
    return [cyclic_epochs(warmup_epochs, t0, t_mult, n) for n in range(1, cycles + 1)]


def budget_steps(epochs, warmup_epochs, t0, t_mult, steps_per_epoch):
    """Optimizer steps of a run of `epochs`: when `epochs` ends a cycle of the cyclic run of this shape,
    exactly the step where that cycle ends (periods rounded to whole steps as the cyclic run rounds
    them), so standard and cyclic curves sample the same step; otherwise epochs x steps, rounded."""
    try:
        n = cycles_for_epochs(warmup_epochs, t0, t_mult, epochs)
    except ValueError:
        return round(epochs * steps_per_epoch)
    return round(warmup_epochs * steps_per_epoch) + round(t0 * steps_per_epoch) * sum(t_mult ** i for i in range(n))


def make_plan(schedule, epochs, warmup_epochs, t0, t_mult, steps_per_epoch, cycle_decay=1.0, cooldown_frac=0.2,
              cooldown_shape="1-sqrt"):
    """Plan in steps; periods are rounded to whole optimizer steps. For every schedule but standard,
    `epochs` must end a cycle of (warmup_epochs, t0, t_mult); for standard, (t0, t_mult) are the shape of
    the cyclic family whose budget it samples (see budget_steps)."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if schedule == "standard":
        return Plan(schedule, budget_steps(epochs, warmup_epochs, t0, t_mult, steps_per_epoch), warmup_steps)
    if schedule == "constant":
        t_mult = 1
    t0_steps = round(t0 * steps_per_epoch)
    cycles = cycles_for_epochs(warmup_epochs, t0, t_mult, epochs)
    ends = [warmup_steps + t0_steps * sum(t_mult ** i for i in range(n)) for n in range(1, cycles + 1)]
    if schedule in ("wsd", "schedule-free"):
        return Plan(schedule, ends[-1], warmup_steps, t0_steps, t_mult, budget_steps=tuple(ends),
                    cooldown_frac=cooldown_frac, cooldown_shape=cooldown_shape)
    return Plan(schedule, ends[-1], warmup_steps, t0_steps, t_mult, cycle_decay if schedule == "cyclic-decay" else 1.0)


def eq1_ratio(budgets):
    """The paper's Eq. 1 applied to a set of budgets: the epochs of one standard run per budget over the
    epochs of the one run that reaches the largest, sum(budgets) / max(budgets). With warmup = t0 the
    budgets are 2 T0 r^i and this is exactly Eq. 1; otherwise it counts the warmup in every run, as the
    measured wall-clock ratio does. The one definition that config.json and analysis use."""
    return sum(budgets) / max(budgets)


def speedup_ratio(t_mult, n):
    """Eq. 1 in closed form for n cycles: sum_{i<n} T0 r^i / (T0 r^(n-1))."""
    return eq1_ratio([t_mult ** i for i in range(n)])


# ---- planning command ----------------------------------------------------------------------

def epochs_trained(schedule, budgets, cooldown_frac=0.2):
    """Epochs of training it takes to sample `budgets` (cycle-end epochs): the standard sweep trains one run per
    budget; cyclic, constant, cyclic-decay and schedule-free one run to the largest; wsd its trunk to the last
    branch point, (1 - f) T_max, plus every cooldown branch, f T_k (Eq. 1 generalised: (1 - f) max + f sum)."""
    if schedule == "standard":
        return sum(budgets)
    if schedule == "wsd":
        return (1 - cooldown_frac) * max(budgets) + cooldown_frac * sum(budgets)
    return max(budgets)


def write_lr_csv(path, plan, steps_per_epoch, lr, eta_min):
    """The LR of every optimizer step of `plan`: step (0-based, of the whole run), epoch (along the model's own
    path), lr, segment (trunk, or the wsd cooldown branch k)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "lr", "segment"])
        for s in range(plan.run_steps):
            seg, at = plan.segment_at(s)
            w.writerow([s, f"{at / steps_per_epoch:.6g}", f"{lr_at(plan, s, lr, eta_min):.10g}",
                        "trunk" if seg.kind == "trunk" else f"branch {seg.branch}"])


def hours(epochs, train_size, images_per_s):
    return epochs * train_size / images_per_s / 3600


def planner_parser():
    """The planner's flags (python schedules.py --help)."""
    p = argparse.ArgumentParser(description="Plan a tradeoff curve: its budgets, and the cost of the standard sweep "
                                            "and of each one-run estimator; --csv writes a schedule's LR per step.")
    p.add_argument("--schedule", choices=("all",) + SCHEDULES, default="all",
                   help="the schedule to plan (all: every one); --csv needs one")
    p.add_argument("--warmup-epochs", type=float, default=8)
    p.add_argument("--t0", type=float, default=8)
    p.add_argument("--t-mult", type=int, default=2)
    p.add_argument("--cycles", type=int, default=6)
    p.add_argument("--cycle-decay", type=float, default=0.7, help="cyclic-decay: peak of cycle i is lr x GAMMA^i")
    p.add_argument("--cooldown-frac", type=float, default=0.2, help="wsd: each budget's cooldown fraction")
    p.add_argument("--cooldown-shape", choices=COOLDOWN_SHAPES, default="1-sqrt")
    p.add_argument("--images-per-s", type=float, default=None, metavar="R",
                   help="training images per second per GPU (or per machine): prints wall-clock and GPU-hours")
    p.add_argument("--train-size", type=int, default=None, metavar="N", help="training images per epoch")
    p.add_argument("--gpus", type=int, default=1, help="GPUs training at R images/s each (wall-clock)")
    p.add_argument("--steps-per-epoch", type=int, default=1, help="optimizer steps per epoch, for --csv")
    p.add_argument("--epochs", type=float, default=None, help="standard, for --csv: the budget (default the largest)")
    p.add_argument("--lr", type=float, default=1.0, help="peak LR, for --csv")
    p.add_argument("--eta-min", type=float, default=0.0)
    p.add_argument("--csv", help="write step,epoch,lr,segment for every optimizer step of --schedule to this file")
    return p


def check_planner_args(a):
    """Exit with one line on a flag out of range, a cost without both of its figures, or --csv of every schedule."""
    for flag, bad in (("--cycles", a.cycles < 1), ("--t0", a.t0 <= 0), ("--t-mult", a.t_mult < 1),
                      ("--warmup-epochs", a.warmup_epochs < 0), ("--steps-per-epoch", a.steps_per_epoch < 1),
                      ("--cycle-decay", not 0 < a.cycle_decay <= 1), ("--cooldown-frac", not 0 < a.cooldown_frac < 1),
                      ("--gpus", a.gpus < 1), ("--images-per-s", a.images_per_s is not None and a.images_per_s <= 0),
                      ("--train-size", a.train_size is not None and a.train_size < 1),
                      ("--epochs", a.epochs is not None and a.epochs <= 0)):
        if bad:
            sys.exit(f"schedules.py: error: {flag} is out of range (cycles, t0, t-mult, steps-per-epoch, gpus >= 1; "
                     f"warmup >= 0; cycle-decay in (0, 1]; cooldown-frac in (0, 1); images-per-s, train-size, "
                     f"epochs > 0)")
    if (a.images_per_s is None) != (a.train_size is None):
        sys.exit("schedules.py: error: --images-per-s and --train-size go together (the cost needs both)")
    if a.csv and a.schedule == "all":
        sys.exit("schedules.py: error: --csv writes one schedule's LR: add --schedule NAME")


def main(argv=None):
    """Print the plan of a curve (budgets, Eq. 1, each schedule's epochs and cost); --csv writes one schedule's LR."""
    a = planner_parser().parse_args(argv)
    check_planner_args(a)
    ends = cycle_end_epochs(a.warmup_epochs, a.t0, a.t_mult, a.cycles)
    constant_ends = cycle_end_epochs(a.warmup_epochs, a.t0, 1, a.cycles)  # as train.py --schedule constant --cycles
    print(f"shape: warmup {a.warmup_epochs:g} + t0 {a.t0:g} x t_mult {a.t_mult}, {a.cycles} cycles")
    print(f"budgets (cycle-end epochs): {', '.join(f'{e:g}' for e in ends)}")
    print(f"standard runs at these budgets: {' + '.join(f'{e:g}' for e in ends)} = {sum(ends):g} epochs")
    print(f"cyclic run: {ends[-1]:g} epochs")
    print(f"speedup ratio, Eq. 1 on these budgets (warmup counted in every run): {eq1_ratio(ends):.4f}")
    print(f"speedup ratio, Eq. 1 in closed form (warmup not counted): {speedup_ratio(a.t_mult, a.cycles):.4f}")
    print_schedules(a, ends, constant_ends)
    if a.csv:
        write_planned_csv(a, ends, constant_ends)


def print_schedules(a, ends, constant_ends):
    """The table of each schedule's epochs against the standard sweep's (and its cost with --images-per-s), then
    wsd's branch points and the constant schedule's budgets where shown."""
    shown = SCHEDULES if a.schedule == "all" else ("standard", a.schedule)
    cost = a.images_per_s is not None
    print(f"\n{'schedule':<14} {'epochs':>9} {'x standard':>10}" + (
        f" {'wall-clock h':>13} {'GPU-hours':>10}" if cost else "") + "  samples the budgets by")
    how = {"standard": "one cosine run per budget", "cyclic": "cycle ends (one run)",
           "constant": "cycle ends of period t0 (its own budgets, below)",
           "cyclic-decay": f"cycle ends, peaks x {a.cycle_decay:g} per cycle",
           "wsd": f"a cooldown branch per budget ({a.cooldown_frac:g} of it, {a.cooldown_shape})",
           "schedule-free": "evaluating its averaged weights (one run, no schedule)"}
    for name in dict.fromkeys(shown):
        e = epochs_trained(name, constant_ends if name == "constant" else ends, a.cooldown_frac)
        line = f"{name:<14} {e:>9.6g} {e / sum(ends):>10.3f}"
        if cost:
            h = hours(e, a.train_size, a.images_per_s)
            line += f" {h / a.gpus:>13.1f} {h:>10.1f}"
        print(line + "  " + how[name])
    if "wsd" in shown:
        branch = [(1 - a.cooldown_frac) * e for e in ends]
        print(f"wsd branch points (epochs): {', '.join(f'{b:g}' for b in branch)}; cooldowns: "
              f"{', '.join(f'{a.cooldown_frac * e:g}' for e in ends)} epochs")
    if "constant" in shown:
        few = constant_ends if len(constant_ends) <= 8 else constant_ends[:3] + ["..."] + constant_ends[-1:]
        print(f"constant budgets (epochs): {', '.join(f'{e:g}' if e != '...' else e for e in few)} "
              f"({len(constant_ends)} budgets: --cycles of period t0, as train.py --schedule constant takes them; "
              f"launch.sh sweep --constant trains {2 ** a.cycles - 1}, the cyclic run's length)")
    if cost:
        print(f"cost at {a.images_per_s:g} img/s per GPU, {a.train_size} images per epoch, {a.gpus} GPU(s) (linear "
              f"scaling assumed; evaluation not counted)")


def write_planned_csv(a, ends, constant_ends):
    """--csv: the LR of every optimizer step of --schedule (standard: at --epochs, default the largest budget)."""
    if a.schedule == "standard":
        total = a.epochs or ends[-1]
    else:
        total = constant_ends[-1] if a.schedule == "constant" else ends[-1]
    try:
        plan = make_plan(a.schedule, total, a.warmup_epochs, a.t0, a.t_mult, a.steps_per_epoch, a.cycle_decay,
                         a.cooldown_frac, a.cooldown_shape)
    except ValueError as e:
        sys.exit(f"schedules.py: error: {e}")
    write_lr_csv(a.csv, plan, a.steps_per_epoch, a.lr, a.eta_min)
    print(f"wrote {plan.run_steps} rows to {a.csv}")

if __name__ == "__main__":
    main()
