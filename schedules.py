"""Learning-rate schedules of the paper, in optimizer steps, plus the arithmetic of cycles.

Three schedules, each a linear warmup followed by:
  standard  cosine decay to eta_min over the rest of the run (CosineAnnealingLR)
  cyclic    cosine cycles whose period grows by t_mult (CosineAnnealingWarmRestarts)
  constant  cyclic with t_mult = 1 (the paper's Appendix B)

Every period is counted in optimizer steps and the scheduler is stepped once per optimizer step,
after optimizer.step(). The closed form `lr_at` is the definition; `build_scheduler` composes
PyTorch's schedulers and the tests check that the two agree at every step.

Run as a script it plans a cyclic run: `python schedules.py --warmup-epochs 8 --t0 8 --cycles 6`.
"""
import argparse
import csv
import math
import sys
from dataclasses import dataclass

from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, LambdaLR, SequentialLR

SCHEDULES = ("standard", "cyclic", "constant")


@dataclass(frozen=True)
class Plan:
    """A schedule's shape in optimizer steps. Cyclic fields are unused by 'standard'."""
    schedule: str
    total_steps: int
    warmup_steps: int
    t0_steps: int = 0
    t_mult: int = 2

    def cycle_lengths(self):
        """Length in steps of each cosine cycle (one for 'standard')."""
        if self.schedule == "standard":
            return [self.total_steps - self.warmup_steps]
        lengths, left, period = [], self.total_steps - self.warmup_steps, self.t0_steps
        while left > 0:
            lengths.append(min(period, left))
            left -= period
            period *= self.t_mult
        return lengths

    def cycle_end_steps(self):
        """Optimizer-step counts after which a cycle ends (LR at its minimum): the curve's points."""
        ends, s = [], self.warmup_steps
        for n in self.cycle_lengths():
            s += n
            ends.append(s)
        return ends

    def cycle_of_step(self, step):
        """Cycle index of the optimizer step with 0-based index `step`; -1 during warmup."""
        if step < self.warmup_steps:
            return -1
        for i, end in enumerate(self.cycle_end_steps()):
            if step < end:
                return i
        return len(self.cycle_end_steps()) - 1


def lr_at(plan, step, peak_lr, eta_min=0.0):
    """Closed-form LR used by optimizer step `step` (0-based): the schedule's definition."""
    if step < plan.warmup_steps:
        return peak_lr * (step + 1) / plan.warmup_steps
    cycle = plan.cycle_of_step(step)
    start = plan.warmup_steps + sum(plan.cycle_lengths()[:cycle])
    if plan.schedule == "standard":
        period = plan.total_steps - plan.warmup_steps
    else:
        period = plan.t0_steps * plan.t_mult ** cycle
    t_cur = step - start
    return eta_min + (peak_lr - eta_min) * (1 + math.cos(math.pi * t_cur / period)) / 2


def build_scheduler(optimizer, plan, eta_min=0.0):
    """PyTorch schedulers for `plan`; step once after every optimizer.step().

    The warmup is a LambdaLR; SequentialLR hands over to the cosine scheduler at the milestone.
    Resume by building a fresh one and calling load_state_dict (never with last_epoch >= 0:
    pytorch/pytorch#49630)."""
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


def make_plan(schedule, epochs, warmup_epochs, t0, t_mult, steps_per_epoch):
    """Plan in steps; periods are rounded to whole optimizer steps."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if schedule == "standard":
        return Plan(schedule, round(epochs * steps_per_epoch), warmup_steps)
    if schedule == "constant":
        t_mult = 1
    # Total from the rounded periods, so that the run ends exactly on a cycle end.
    t0_steps = round(t0 * steps_per_epoch)
    cycles = cycles_for_epochs(warmup_epochs, t0, t_mult, epochs)
    return Plan(schedule, warmup_steps + t0_steps * sum(t_mult ** i for i in range(cycles)), warmup_steps,
                t0_steps, t_mult)


def speedup_ratio(t_mult, n):
    """The paper's Eq. 1: total epochs of n standard runs at the cycle ends over the cyclic run's,
    warmup not counted: sum_{i<n} T0 r^i / (T0 r^(n-1))."""
    if t_mult == 1:
        return float(n)
    r = t_mult
    return (1 - r ** n) / ((1 - r) * r ** (n - 1))


def cycle_end_epochs(warmup_epochs, t0, t_mult, cycles):
    return [cyclic_epochs(warmup_epochs, t0, t_mult, n) for n in range(1, cycles + 1)]


# ---- planning command ----------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Plan a cyclic run: sample points, total epochs and the Eq. 1 speedup.")
    p.add_argument("--schedule", choices=("cyclic", "constant"), default="cyclic")
    p.add_argument("--warmup-epochs", type=float, default=8)
    p.add_argument("--t0", type=float, default=8)
    p.add_argument("--t-mult", type=int, default=2)
    p.add_argument("--cycles", type=int, default=6)
    p.add_argument("--steps-per-epoch", type=int, default=1, help="optimizer steps per epoch, for --csv")
    p.add_argument("--lr", type=float, default=1.0, help="peak LR, for --csv")
    p.add_argument("--eta-min", type=float, default=0.0)
    p.add_argument("--csv", help="write step,epoch,lr for every optimizer step to this file")
    a = p.parse_args(argv)
    for flag, bad in (("--cycles", a.cycles < 1), ("--t0", a.t0 <= 0), ("--t-mult", a.t_mult < 1),
                      ("--warmup-epochs", a.warmup_epochs < 0), ("--steps-per-epoch", a.steps_per_epoch < 1)):
        if bad:
            sys.exit(f"schedules.py: error: {flag} is out of range (cycles, t0, t-mult, steps-per-epoch >= 1; warmup >= 0)")
    t_mult = 1 if a.schedule == "constant" else a.t_mult
    ends = cycle_end_epochs(a.warmup_epochs, a.t0, t_mult, a.cycles)
    total = ends[-1]
    ratio = speedup_ratio(t_mult, a.cycles)
    ratio_warm = sum(ends) / total
    print(f"schedule {a.schedule}: warmup {a.warmup_epochs:g} + t0 {a.t0:g} x t_mult {t_mult}, {a.cycles} cycles")
    print(f"sample points (cycle-end epochs): {', '.join(f'{e:g}' for e in ends)}")
    print(f"cyclic run: {total:g} epochs")
    print(f"standard runs at the same points: {' + '.join(f'{e:g}' for e in ends)} = {sum(ends):g} epochs")
    print(f"speedup ratio, Eq. 1 (warmup not counted): {ratio:.4f}")
    print(f"speedup ratio, warmup counted in every run: {ratio_warm:.4f}")
    if a.csv:
        plan = make_plan(a.schedule, total, a.warmup_epochs, a.t0, t_mult, a.steps_per_epoch)
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "epoch", "lr"])
            for s in range(plan.total_steps):
                w.writerow([s, f"{s / a.steps_per_epoch:.6g}", f"{lr_at(plan, s, a.lr, a.eta_min):.10g}"])
        print(f"wrote {plan.total_steps} rows to {a.csv}")


if __name__ == "__main__":
    main()
