import math
import subprocess
import sys

import pytest
import torch

import schedules as S

PEAK, ETA = 0.8, 0.01


def pytorch_lrs(plan, eta_min=ETA):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=PEAK)
    sched = S.build_scheduler(opt, plan, eta_min)
    lrs = []
    for _ in range(plan.run_steps):  # = total_steps but for wsd, whose branches add steps
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def cos_lr(t_cur, period):
    return ETA + (PEAK - ETA) * (1 + math.cos(math.pi * t_cur / period)) / 2


@pytest.mark.parametrize("schedule", ["cyclic", "standard", "constant"])
def test_every_step_matches_closed_form(schedule):
    epochs = 2 + 3 * 7 if schedule == "cyclic" else (2 + 3 * 4 if schedule == "constant" else 20)
    plan = S.make_plan(schedule, epochs, 2, 3, 2, steps_per_epoch=5)
    lrs = pytorch_lrs(plan)
    assert len(lrs) == plan.total_steps
    for s, lr in enumerate(lrs):
        assert lr == pytest.approx(S.lr_at(plan, s, PEAK, ETA), rel=1e-12, abs=1e-12), s


def test_cyclic_values_at_warmup_restarts_and_cycle_ends():
    # warmup 2 epochs, t0 3, t_mult 2, 3 cycles, 5 steps per epoch: warmup 10 steps, cycles of 15, 30, 60 steps
    plan = S.make_plan("cyclic", 2 + 3 + 6 + 12, 2, 3, 2, steps_per_epoch=5)
    lrs = pytorch_lrs(plan)
    assert plan.warmup_steps == 10 and plan.cycle_lengths() == [15, 30, 60]
    assert plan.cycle_end_steps() == [25, 55, 115]
    assert lrs[0] == pytest.approx(PEAK / 10)              # linear warmup from peak/W
    assert lrs[9] == pytest.approx(PEAK)                    # warmup's last step reaches the peak
    assert lrs[10] == pytest.approx(PEAK)                   # first post-warmup step runs at the peak
    for start, period in ((10, 15), (25, 30), (55, 60)):    # restarts land at warmup + t0, + 2 t0, ...
        assert lrs[start] == pytest.approx(PEAK), start
        assert lrs[start + period - 1] == pytest.approx(cos_lr(period - 1, period))  # last step of the cycle
        assert lrs[start + period // 2] == pytest.approx(cos_lr(period // 2, period))
        assert lrs[start + period - 1] < lrs[start + period - 2]
    assert [plan.cycle_of_step(s) for s in (0, 9, 10, 24, 25, 54, 55, 114)] == [-1, -1, 0, 0, 1, 1, 2, 2]


def test_standard_is_one_cosine_after_warmup():
    plan = S.make_plan("standard", 10, 2, 99, 2, steps_per_epoch=4)
    lrs = pytorch_lrs(plan)
    assert plan.cycle_end_steps() == [40]
    assert lrs[7] == pytest.approx(PEAK) and lrs[8] == pytest.approx(PEAK)
    assert lrs[8 + 16] == pytest.approx((PEAK + ETA) / 2)  # half-way through the 32 cosine steps
    assert lrs[-1] == pytest.approx(cos_lr(31, 32))


def test_constant_has_equal_periods():
    plan = S.make_plan("constant", 1 + 2 * 4, 1, 2, 2, steps_per_epoch=3)
    assert plan.t_mult == 1 and plan.cycle_lengths() == [6, 6, 6, 6]
    lrs = pytorch_lrs(plan)
    assert [lrs[s] for s in (3, 9, 15, 21)] == pytest.approx([PEAK] * 4)


def test_periods_are_in_optimizer_steps_whatever_the_ranks_and_accumulation():
    # steps per epoch depend on the global batch only; world size and accumulation split it
    from data import ResidentData
    import numpy as np
    x = np.zeros((100, 1, 4, 4), np.uint8)
    data = ResidentData(x, np.zeros(100), x[:10], np.zeros(10), (0.5,), (0.5,), torch.device("cpu"), 0, False, 10)
    spe = {data.train_loader(20, rank, world, 0).steps_per_epoch for world in (1, 2, 4) for rank in range(world)}
    assert spe == {5}
    plans = {S.make_plan("cyclic", 7, 1, 2, 2, s) for s in spe}
    assert len(plans) == 1 and plans.pop().cycle_end_steps() == [15, 35]


def test_resume_by_load_state_dict_continues_exactly():
    plan = S.make_plan("cyclic", 1 + 2 + 4 + 8, 1, 2, 2, steps_per_epoch=4)
    ref = pytorch_lrs(plan)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=PEAK)
    sched = S.build_scheduler(opt, plan, ETA)
    for _ in range(13):  # stop mid-cycle
        opt.step()
        sched.step()
    state, opt_state = sched.state_dict(), opt.state_dict()
    opt2 = torch.optim.SGD([p], lr=PEAK)
    sched2 = S.build_scheduler(opt2, plan, ETA)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    rest = []
    for _ in range(13, plan.total_steps):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == pytest.approx(ref[13:], rel=1e-12)


def test_cycles_and_epochs():
    assert S.cyclic_epochs(8, 8, 2, 6) == 512
    assert S.cycles_for_epochs(8, 8, 2, 512) == 6
    assert S.cycle_end_epochs(8, 8, 2, 6) == [16, 32, 64, 128, 256, 512]
    with pytest.raises(ValueError, match=r"use --epochs 256 \(5 cycles\) or 512 \(6 cycles\)"):
        S.cycles_for_epochs(8, 8, 2, 300)


def test_speedup_ratio_eq1():
    assert S.speedup_ratio(2, 6) == pytest.approx(63 / 32)
    assert S.speedup_ratio(3, 3) == pytest.approx((1 + 3 + 9) / 9)
    assert S.speedup_ratio(1, 5) == 5


def test_planning_command(tmp_path):
    out = subprocess.run([sys.executable, "schedules.py", "--schedule", "cyclic", "--warmup-epochs", "8", "--t0", "8",
                          "--t-mult", "2", "--cycles", "6", "--steps-per-epoch", "3",
                          "--csv", str(tmp_path / "lr.csv")],
                         capture_output=True, text=True, check=True, cwd=S.__file__.rsplit("/", 1)[0]).stdout
    assert "16, 32, 64, 128, 256, 512" in out and "512 epochs" in out
    assert "16 + 32 + 64 + 128 + 256 + 512 = 1008 epochs" in out
    assert "1.9688" in out and f"{1008 / 512:.4f}" in out
    rows = (tmp_path / "lr.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,lr,segment" and len(rows) == 1 + 512 * 3
    assert float(rows[1 + 24].split(",")[2]) == pytest.approx(1.0)  # first post-warmup step at the peak


def test_fractional_periods_round_to_whole_steps_and_end_on_a_cycle():
    plan = S.make_plan("cyclic", 4, 0.5, 0.5, 2, steps_per_epoch=117)  # 58.5 steps per half epoch
    assert plan.cycle_lengths() == [58, 116, 232]
    assert plan.cycle_end_steps()[-1] == plan.total_steps == 58 + 58 * 7


def test_standard_budgets_end_on_the_cyclic_runs_step_for_awkward_step_counts():
    # 117 steps per epoch, warmup = t0 = 0.5 epochs: 58.5 steps round to 58, so the cyclic run's cycles end at
    # 116, 232, 464; a standard run at 1, 2, 4 epochs must end there too, not at 117, 234, 468
    for spe in (117, 13, 391):
        cyclic = S.make_plan("cyclic", 4, 0.5, 0.5, 2, steps_per_epoch=spe)
        standard = [S.make_plan("standard", e, 0.5, 0.5, 2, steps_per_epoch=spe).total_steps for e in (1, 2, 4)]
        assert standard == cyclic.cycle_end_steps(), spe
    assert S.make_plan("standard", 1, 0.5, 0.5, 2, 117).total_steps == 116
    assert S.make_plan("standard", 3, 0.5, 0.5, 2, 117).total_steps == 351  # not a cycle end: epochs x steps


def test_eq1_ratio_is_one_definition():
    assert S.eq1_ratio([16, 32, 64, 128, 256, 512]) == pytest.approx(1008 / 512)
    assert S.eq1_ratio([1, 2, 4, 8]) == S.speedup_ratio(2, 4) == pytest.approx(15 / 8)
    assert S.eq1_ratio(S.cycle_end_epochs(1, 2, 2, 3)) == pytest.approx((3 + 7 + 15) / 15)  # warmup counted
