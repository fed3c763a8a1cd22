"""The one-run curve estimators: cyclic-decay, wsd (cooldown branches) and schedule-free, step by step."""
import csv
import math
import os
import sys

import pytest
import torch

import schedules as S
from conftest import TINY, run_train
from test_schedules import ETA, PEAK, pytorch_lrs as lambda_lrs  # the LR the optimizer really uses


def test_cyclic_decay_peaks_decay_by_gamma_and_match_the_closed_form():
    plan = S.make_plan("cyclic-decay", 1 + 2 + 4 + 8, 1, 2, 2, steps_per_epoch=4, cycle_decay=0.5)
    lrs = lambda_lrs(plan)
    assert plan.cycle_end_steps() == S.make_plan("cyclic", 15, 1, 2, 2, 4).cycle_end_steps() == [12, 28, 60]
    for s, lr in enumerate(lrs):
        assert lr == pytest.approx(S.lr_at(plan, s, PEAK, ETA), rel=1e-12), s
    assert lrs[3] == pytest.approx(PEAK)  # end of warmup
    assert [lrs[s] for s in (4, 12, 28)] == pytest.approx([PEAK, PEAK * 0.5, PEAK * 0.25])  # restarts at lr gamma^i
    assert lrs[27] == pytest.approx(ETA + (PEAK * 0.5 - ETA) * (1 + math.cos(math.pi * 15 / 16)) / 2)


def test_wsd_segments_and_cooldowns():
    plan = S.make_plan("wsd", 1 + 1 + 2 + 4, 1, 1, 2, steps_per_epoch=10, cooldown_frac=0.2, cooldown_shape="linear")
    assert plan.budget_steps == (20, 40, 80)
    segs = [(s.kind, s.start, s.end, s.run_start, s.branch) for s in plan.segments()]
    assert segs == [("trunk", 0, 16, 0, -1), ("branch", 16, 20, 16, 0), ("trunk", 16, 32, 20, -1),
                    ("branch", 32, 40, 36, 1), ("trunk", 32, 64, 44, -1), ("branch", 64, 80, 76, 2)]
    assert plan.run_steps == 64 + 4 + 8 + 16  # T_max - f T_max + f sum(T_k)
    lrs = lambda_lrs(plan)
    for s, lr in enumerate(lrs):
        assert lr == pytest.approx(S.lr_at(plan, s, PEAK, ETA), rel=1e-12), s
    assert lrs[:10] == pytest.approx([PEAK * (i + 1) / 10 for i in range(10)])  # warmup
    assert lrs[10:16] == pytest.approx([PEAK] * 6) and lrs[20:36] == pytest.approx([PEAK] * 16)  # the trunk
    # branch 1 (8 steps, linear): down by (PEAK - ETA) / 8 per step from its first, to exactly ETA on its last,
    # as a budget's last step should be (a cosine cycle's last is within (pi / 2T)^2 of its minimum)
    assert lrs[36:44] == pytest.approx([ETA + (PEAK - ETA) * (1 - (t + 1) / 8) for t in range(8)])
    assert [lrs[s.run_start + s.end - s.start - 1] for s in plan.segments() if s.kind == "branch"] == [ETA] * 3
    sqrt_plan = S.make_plan("wsd", 8, 1, 1, 2, steps_per_epoch=10)
    branch = [S.lr_at(sqrt_plan, s, PEAK, 0.0) for s in range(76, 92)]
    assert branch == pytest.approx([PEAK * (1 - math.sqrt((t + 1) / 16)) for t in range(16)]) and branch[-1] == 0


def test_schedule_free_warmup_is_what_the_optimizer_uses():
    from schedulefree import SGDScheduleFree
    plan = S.make_plan("schedule-free", 7, 1, 2, 2, steps_per_epoch=4)
    assert S.build_scheduler(None, plan) is None and plan.cycle_end_steps() == [12, 28]
    p = torch.nn.Parameter(torch.ones(3))
    opt = SGDScheduleFree([p], lr=PEAK, momentum=0.9, warmup_steps=plan.warmup_steps)
    opt.train()
    for s in range(plan.run_steps):
        p.grad = torch.ones(3)
        opt.step()
        assert opt.param_groups[0]["scheduled_lr"] == pytest.approx(S.lr_at(plan, s, PEAK)), s


def read(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


WSD = TINY + ["--schedule", "wsd", "--amp", "none", "--mixup", "0.2", "--eval-every", "0", "--cooldown-frac", "0.25"]


@pytest.fixture(scope="module")
def wsd_reference(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("wsd") / "run")
    run_train(WSD + ["--run-dir", run])
    return run


def test_wsd_run_rows_costs_and_lr(wsd_reference):
    rows = read(wsd_reference)
    # budgets at 2 and 4 epochs (16, 32 steps); cooldowns of 4 and 8 steps: 24 + 4 + 8 = 36 optimizer steps
    assert [(r["epoch"], r["step"], r["cycle"], r["cycle_end"]) for r in rows] == [("2", "16", "0", "1"),
                                                                                   ("4", "32", "1", "1")]
    plan = S.make_plan("wsd", 4, 1, 1, 2, 8, cooldown_frac=0.25)
    assert plan.run_steps == 36
    assert float(rows[0]["lr"]) == pytest.approx(S.lr_at(plan, 15, 0.1))  # the branch's last step, 1-sqrt
    assert float(rows[1]["lr"]) == pytest.approx(S.lr_at(plan, 35, 0.1))
    t = [(float(r["train_time_s"]), float(r["curve_cost_s"])) for r in rows]
    assert t[0][0] == pytest.approx(t[0][1], abs=2e-3)  # the first branch's path is all the run has done
    assert t[1][0] < t[1][1]  # the second excludes the first branch's cooldown, the cost includes it
    # on a real clock only bounds; the exact accounting of every step, branches included, under a clock the test
    # drives: test_accounting.py::test_training_time_counts_training_steps_only
    assert 0 < t[1][1] - t[1][0] < t[0][1]


def test_a_wsd_branch_is_a_true_copy(wsd_reference, tmp_path):
    """The second branch of the 2-budget run equals the only branch of a run whose one budget is that one
    (t0 3 x 1 epochs: budget 4 epochs, same warmup and trunk): branch 1 left the trunk untouched."""
    run = str(tmp_path / "one")
    run_train(WSD + ["--run-dir", run, "--t0", "3", "--cycles", "1"])
    one, two = read(run), read(wsd_reference)
    assert len(one) == 1 and one[0]["step"] == two[1]["step"] == "32"
    for col in ("val_loss", "val_acc1", "lr"):
        assert one[0][col] == two[1][col], col


# train.py in a process that dies (exit 9) when it is about to take optimizer step k + 1
CRASH_AT = """import sys, train
real, calls = train.train_step, [0]
def crash(*a, **k):
    calls[0] += 1
    if calls[0] > int(sys.argv[1]):
        raise SystemExit(9)
    return real(*a, **k)
train.train_step = crash
train.main(sys.argv[2:])
"""


@pytest.mark.parametrize("steps,in_branch", [(14, True), (16, False), (18, False), (31, True)])
def test_wsd_resumes_exactly_inside_and_between_branches(wsd_reference, tmp_path, steps, in_branch):
    """Run steps 12-15 are branch 0, 16-27 the trunk again, 28-35 branch 1. Checkpoints after every step
    (--checkpoint-every 1e-6 minutes); the process dies after `steps` steps: inside a branch (its checkpoint
    carries the trunk), at a branch's end, on the trunk. Resumed, it ends with the uninterrupted run's rows
    and final weights (the last branch's model)."""
    import subprocess
    from conftest import ENV, ROOT
    run = str(tmp_path / "run")
    args = WSD + ["--run-dir", run, "--checkpoint-every", "1e-6"]
    p = subprocess.run([sys.executable, "-c", CRASH_AT, str(steps)] + args, cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 9, p.stderr[-2000:]
    ckpt = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)
    assert ckpt["step"] == steps and (ckpt["trunk"] is not None) == in_branch
    run_train(args + ["--resume"])
    drop = ("train_time_s", "curve_cost_s", "images_per_s", "eval_time_s", "startup_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(read(run)) == strip(read(wsd_reference))
    a, b = (torch.load(os.path.join(r, "checkpoints", "last.pt"), weights_only=True)["model"]
            for r in (run, wsd_reference))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_free_and_cyclic_decay_runs(tmp_path):
    for schedule in ("schedule-free", "cyclic-decay"):
        run = str(tmp_path / schedule)
        p = run_train(TINY + ["--run-dir", run, "--schedule", schedule, "--eval-every", "1", "--sf-lr", "0.3"])
        rows = read(run)
        assert [r["cycle_end"] for r in rows] == ["0", "1", "0", "1"], schedule
        assert all(r["train_time_s"] == r["curve_cost_s"] for r in rows)
        assert "curve points at epochs 2, 4" in p.stdout
    # every row's LR is its schedule's closed form at the row's last step (schedule-free: its own warmup to
    # --sf-lr, then flat); that it evaluates its averaged weights: test_evaluation.py
    for schedule, peak in (("schedule-free", 0.3), ("cyclic-decay", 0.1)):
        plan = S.make_plan(schedule, 4, 1, 1, 2, 8, cycle_decay=0.7)
        got = [float(r["lr"]) for r in read(str(tmp_path / schedule))]
        assert got == pytest.approx([S.lr_at(plan, int(r["step"]) - 1, peak) for r in read(str(tmp_path / schedule))],
                                    rel=1e-6), schedule
    assert [float(r["lr"]) for r in read(str(tmp_path / "schedule-free"))][1:] == pytest.approx([0.3] * 3)
    decay = read(str(tmp_path / "cyclic-decay"))  # the second cycle peaks at 0.7 x 0.1: mid-cycle it is below 0.07
    assert float(decay[2]["lr"]) == pytest.approx(S.lr_at(plan, 23, 0.1), rel=1e-6) and float(decay[2]["lr"]) < 0.07


def test_schedule_free_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    import train
    monkeypatch.setitem(sys.modules, "schedulefree", None)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--run-dir", str(tmp_path / "r"), "--schedule", "schedule-free"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "schedulefree" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
