"""--log tensorboard / wandb mirror metrics.csv; the planner's LR per step is the LR the optimizer used; the planner's
costs; a single run's report."""
import csv
import json
import os
import signal
import subprocess
import sys

import pytest

import schedules as S
from conftest import ENV, ROOT, TINY, run_train
from test_resume import kill_after

tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                         reason="tensorboard is installed by requirements-test.txt")


def scalars(run):
    acc = tb.EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def assert_mirrors_metrics(run, run_steps):
    got, rows = scalars(run), metrics(run)
    for col in ("val_acc1", "val_loss", "train_loss", "lr", "train_time_s", "cycle_end"):
        assert [v for _, v in got[f"metrics/{col}"]] == pytest.approx([float(r[col]) for r in rows], rel=1e-6), col
    # x: the run's optimizer steps (for every schedule but wsd, metrics.csv's step); lr: one point per step
    assert [s for s, _ in got["lr"]] == list(range(1, run_steps + 1))
    return got


SCHEDULES = ["standard", "cyclic", "constant", "cyclic-decay", "wsd", "schedule-free"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_planners_csv_is_the_lr_the_optimizer_used_and_tensorboard_mirrors_the_rows(tmp_path, schedule):
    run = str(tmp_path / "run")
    shape = ["--cycle-decay", "0.5", "--cooldown-frac", "0.3"]  # TINY: warmup 1, t0 1 (later flags win)
    extra = ["--epochs", "3"] if schedule == "standard" else ["--cycles", "3"]
    run_train(TINY + shape + extra + ["--schedule", schedule, "--amp", "none", "--log", "tensorboard",
                                      "--run-dir", run])
    config = json.load(open(os.path.join(run, "config.json")))
    got = assert_mirrors_metrics(run, config["run_steps"])
    peak = config["sf_lr"] if schedule == "schedule-free" else config["lr"]
    cmd = [sys.executable, "schedules.py", "--schedule", schedule, "--warmup-epochs", "1", "--t0", "1",
           "--cycles", "3", "--cycle-decay", "0.5", "--cooldown-frac", "0.3",
           "--steps-per-epoch", str(config["steps_per_epoch"]), "--lr", str(peak), "--csv", str(tmp_path / "lr.csv")]
    if schedule == "standard":
        cmd += ["--epochs", "3"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    with open(tmp_path / "lr.csv") as f:
        planned = [float(r["lr"]) for r in csv.DictReader(f)]
    assert planned == pytest.approx([v for _, v in got["lr"]], rel=1e-6, abs=1e-9)


def test_a_resumed_run_hides_what_the_killed_process_logged_after_its_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    args = TINY + ["--eval-every", "0.5", "--amp", "none", "--log", "tensorboard", "--run-dir", run]
    kill_after(args, 3, 0.2)
    run_train(args + ["--resume", "auto"])
    assert_mirrors_metrics(run, json.load(open(os.path.join(run, "config.json")))["run_steps"])
    # a resume from an earlier checkpoint than the events on disk (the previous one: the newest lost)
    checkpoints = os.path.join(run, "checkpoints")
    os.replace(os.path.join(checkpoints, "prev.pt"), os.path.join(checkpoints, "last.pt"))
    os.remove(os.path.join(run, "done"))
    run_train(args + ["--resume"])
    assert_mirrors_metrics(run, json.load(open(os.path.join(run, "config.json")))["run_steps"])


FAKE_WANDB = '''import json, os
calls = []
class Run:
    def log(self, values, step):
        calls.append(["log", values, step])
    def mark_preempting(self):
        calls.append(["preempting"])
    def finish(self, exit_code=None):
        calls.append(["finish", exit_code])
        with open(os.environ["FAKE_WANDB_OUT"], "w") as f:
            json.dump(calls, f)
def init(**kw):
    calls.append(["init", {k: v for k, v in kw.items() if k != "config"}, sorted(kw["config"])])
    return Run()
'''


def test_wandb_gets_the_config_and_every_row_offline_unless_configured(tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    run, out = str(tmp_path / "run"), str(tmp_path / "calls.json")
    env = {"PYTHONPATH": str(tmp_path / "fake"), "FAKE_WANDB_OUT": out}
    env_no_mode = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
    p = subprocess.run([sys.executable, "train.py", *TINY, "--amp", "none", "--log", "wandb", "--run-dir", run],
                       cwd=ROOT, env=dict(env_no_mode, **env), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    calls = json.load(open(out))
    init = calls[0]
    assert init[0] == "init" and init[1]["mode"] == "offline" and init[1]["dir"] == run and "lr" in init[2]
    assert init[1]["id"] == open(os.path.join(run, "wandb", "run-id")).read().strip()
    rows = [c for c in calls if c[0] == "log" and "metrics/val_acc1" in c[1]]
    assert [c[1]["metrics/val_acc1"] for c in rows] == [float(r["val_acc1"]) for r in metrics(run)]


def test_a_run_stopped_by_a_signal_tells_wandb_it_was_preempted_and_a_finished_one_that_it_ended_well(tmp_path):
    """A stop at a checkpoint (SIGTERM: scancel, a time limit) closed the W&B run with exit code 0, shown as
    finished; it is resumable, so W&B is told it was preempted, with the process's exit status."""
    from test_reliability import SIGNALLED, signalled
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    run, out = str(tmp_path / "run"), str(tmp_path / "calls.json")
    env = {"PYTHONPATH": str(tmp_path / "fake"), "FAKE_WANDB_OUT": out}
    rc, err = signalled(SIGNALLED + ["--log", "wandb", "--run-dir", run], signal.SIGTERM, env=env)
    assert rc == 143, err[-2000:]
    assert json.load(open(out))[-2:] == [["preempting"], ["finish", 143]]
    p = subprocess.run([sys.executable, "train.py", *SIGNALLED, "--log", "wandb", "--run-dir", run, "--resume"],
                       cwd=ROOT, env=dict(ENV, **env), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.load(open(out))[-1] == ["finish", 0] and ["preempting"] not in json.load(open(out))


@pytest.mark.parametrize("tracker", ["wandb", "neptune"])
def test_a_tracker_that_is_not_installed_or_unknown_stops_the_run_in_one_line(tmp_path, tracker):
    if tracker == "wandb":
        try:
            import wandb  # noqa: F401
            pytest.skip("wandb is installed here")
        except ImportError:
            pass
    p = run_train(TINY + ["--log", tracker, "--run-dir", str(tmp_path / "run")], check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert ("pip install wandb" if tracker == "wandb" else "unknown tracker 'neptune'") in p.stderr
    assert not os.path.exists(tmp_path / "run")


def test_the_planners_costs_are_eq1_for_cyclic_and_the_closed_form_for_wsd():
    budgets = S.cycle_end_epochs(8, 8, 2, 6)
    assert S.epochs_trained("standard", budgets) / S.epochs_trained("cyclic", budgets) == S.eq1_ratio(budgets)
    assert S.epochs_trained("wsd", budgets, 0.2) == pytest.approx(0.8 * 512 + 0.2 * 1008)
    # the closed form is what a wsd run trains, step for step (periods here whole steps)
    plan = S.make_plan("wsd", 512, 8, 8, 2, steps_per_epoch=10, cooldown_frac=0.2)
    assert plan.run_steps == pytest.approx(10 * S.epochs_trained("wsd", budgets, 0.2))
    out = subprocess.run([sys.executable, "schedules.py", "--images-per-s", "570", "--train-size", "1281167",
                          "--gpus", "8"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines()]
    table = {r[0]: r[1:5] for r in rows if len(r) > 4 and r[0] in S.SCHEDULES and r[1][0].isdigit()}
    hours = lambda e: e * 1281167 / 570 / 3600
    assert float(table["standard"][0]) == 1008 and float(table["cyclic"][0]) == 512
    assert float(table["standard"][3]) == pytest.approx(hours(1008), abs=0.05)  # GPU-hours
    assert float(table["cyclic"][2]) == pytest.approx(hours(512) / 8, abs=0.05)  # wall-clock on 8 GPUs
    assert float(table["wsd"][0]) == pytest.approx(611.2)


def test_a_single_runs_report_draws_its_figure(tmp_path):
    run = str(tmp_path / "run")
    run_train(TINY + ["--amp", "none", "--schedule", "wsd", "--run-dir", run])
    p = subprocess.run([sys.executable, "-m", "analysis.report", run], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(os.path.join(run, "report", "run.png")) > 10_000
