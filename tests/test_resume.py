"""Runs that survive crashes: exact resume after SIGKILL, corrupt checkpoints, refusals, NaN."""
import csv
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import ENV, ROOT, TINY, run_train, train_cmd

TIME_COLUMNS = {"train_time_s", "curve_cost_s", "images_per_s", "eval_time_s"}
# Mid-cycle evaluations every half epoch give checkpoints to resume from; MixUp adds its own RNG.
ARGS = TINY + ["--eval-every", "0.5", "--mixup", "0.2", "--amp", "none"]


def metrics_without_time(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in csv.DictReader(f)]


def final_weights(run):
    return torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    run_train(ARGS + ["--run-dir", str(run)])
    return str(run)


def wait_for_rows(process, args, rows, extra_delay):
    metrics = os.path.join(args[args.index("--run-dir") + 1], "metrics.csv")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) - 1 >= rows:
            time.sleep(extra_delay)
            return
        time.sleep(0.01)


def kill_after(args, rows, extra_delay):
    """Start train.py, SIGKILL it once metrics.csv has `rows` rows (plus a delay), return when dead."""
    p = subprocess.Popen(train_cmd(args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_rows(p, args, rows, extra_delay)
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.parametrize("rows,delay", [(1, 0.0), (3, 0.15), (5, 0.4)])
def test_sigkill_then_resume_gives_the_same_run(reference, tmp_path, rows, delay):
    run = str(tmp_path / "run")
    kill_after(ARGS + ["--run-dir", run], rows, delay)
    assert not os.path.exists(os.path.join(run, "done"))
    run_train(ARGS + ["--run-dir", run, "--resume", "auto"])  # a kill before the first checkpoint restarts
    assert metrics_without_time(run) == metrics_without_time(reference)
    ref_w, w = final_weights(reference), final_weights(run)
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path):
    run = str(tmp_path / "run")
    kill_after(ARGS + ["--run-dir", run], 4, 0.0)
    last = os.path.join(run, "checkpoints", "last.pt")
    if os.path.exists(last + ".new"):  # killed between the renames of a save: that file is the newest
        last += ".new"
    with open(last, "r+b") as f:  # truncated, as a crash mid-write of a non-atomic file would leave it
        f.truncate(100)
    p = run_train(ARGS + ["--run-dir", run, "--resume"])
    assert "unreadable" in p.stderr and "previous" in p.stderr
    assert metrics_without_time(run) == metrics_without_time(reference)


def test_resume_auto_starts_fresh_without_checkpoint_and_refuses_changes(tmp_path):
    run = str(tmp_path / "run")
    run_train(TINY + ["--run-dir", run, "--resume", "auto"])
    assert os.path.exists(os.path.join(run, "done"))
    p = run_train(TINY + ["--run-dir", run, "--resume", "--lr", "0.2"], check=False)
    assert p.returncode == 2 and "--resume" in p.stderr and "lr: 0.1 -> 0.2" in p.stderr
    config = os.path.join(run, "config.json")
    edited = open(config).read().replace('"lr": 0.1,', '"lr": 0.2,')
    assert edited != open(config).read()
    with open(config, "w") as f:  # the checkpoint, not an edited config.json, says what the run was trained with
        f.write(edited)
    p = run_train(TINY + ["--run-dir", run, "--resume", "--lr", "0.2"], check=False)
    assert p.returncode == 2 and "lr: 0.1 -> 0.2" in p.stderr
    last = os.path.join(run, "checkpoints", "last.pt")
    ckpt = torch.load(last, weights_only=True)
    del ckpt["config"]  # as an older train.py wrote it: nothing to check a resume against
    torch.save(ckpt, last)
    p = run_train(TINY + ["--run-dir", run, "--resume"], check=False)
    assert p.returncode == 2 and "does not record its options" in p.stderr and "--overwrite" in p.stderr
    before = open(os.path.join(run, "metrics.csv")).read()
    p = run_train(TINY + ["--run-dir", run], check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr
    assert open(os.path.join(run, "metrics.csv")).read() == before  # the refusal touched nothing


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    p = run_train(TINY + ["--run-dir", run, "--lr", "1e30", "--amp", "none"], check=False)
    assert p.returncode == 3, p.stderr[-500:]
    assert "non-finite training loss at step" in p.stderr and "lr" in p.stderr
    assert not os.path.exists(os.path.join(run, "done"))


def test_torchrun_restarts_a_killed_worker_and_finishes_the_same_run(tmp_path):
    ddp_args = ARGS + ["--amp", "none"]
    ref = str(tmp_path / "ref")
    run_train(ddp_args + ["--run-dir", ref], torchrun=2)
    run = str(tmp_path / "run")
    args = ddp_args + ["--run-dir", run, "--resume", "auto"]
    p = subprocess.Popen(train_cmd(args, torchrun=2, torchrun_args=["--max-restarts", "1"]), cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(p, args, 3, 0.1)
    workers = subprocess.run(["pgrep", "-f", "-P", str(p.pid), "train.py"], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)  # one worker dies; the agent restarts both, which resume
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert os.path.exists(os.path.join(run, "done"))
    assert metrics_without_time(run) == metrics_without_time(ref)
