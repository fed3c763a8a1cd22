"""Runs that survive crashes: exact resume after SIGKILL, corrupt checkpoints, refusals, NaN."""
import csv
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import ENV, ROOT, TINY, run_train, train_cmd
from rundir import load_checkpoint

TIME_COLUMNS = {"train_time_s", "curve_cost_s", "images_per_s", "eval_time_s", "startup_s"}
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
    run_train(ARGS + ["--run-dir", str(run)], fresh=True)  # a new interpreter: the resumed runs are forked
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


def test_non_finite_loss_stops_at_the_first_bad_step_with_its_lr_and_writes_nothing_after_it(tmp_path):
    """Step 1's loss is computed on the initial weights, finite at any LR; its update (warmup LR 1e30/8) blows the
    weights up, so step 2 (LR 2/8 x 1e30) is the first non-finite one. No good point was reached: no row, no
    checkpoint, no done (the checkpoint kept before a later NaN: test_reliability.py)."""
    run = str(tmp_path / "run")
    p = run_train(TINY + ["--run-dir", run, "--lr", "1e30", "--amp", "none"], check=False)
    assert p.returncode == 3, p.stderr[-500:]
    assert "non-finite training loss at step 2 (lr 2.5e+29); the last good checkpoint is kept" in p.stderr
    assert not os.path.exists(os.path.join(run, "done")) and not os.path.exists(os.path.join(run, "checkpoints"))
    assert open(os.path.join(run, "metrics.csv")).read().count("\n") == 1  # the header only


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


# ---- damaged run folders (reliability round 3) -----------------------------------------------

def unfinished_copy(reference, tmp_path):
    """The finished reference run, copied and made unfinished: its checkpoints are the last two rows'."""
    run = str(tmp_path / "run")
    shutil.copytree(reference, run)
    os.remove(os.path.join(run, "done"))
    return run


def test_a_cut_last_row_and_blank_lines_are_repaired_on_resume(reference, tmp_path):
    run = str(tmp_path / "run")
    kill_after(ARGS + ["--run-dir", run], 3, 0.1)
    metrics = os.path.join(run, "metrics.csv")
    lines = open(metrics).read().splitlines(keepends=True)
    with open(metrics, "w") as f:  # a blank line between rows, and a row cut short mid-write after the last one
        f.write("".join(lines[:2] + ["\n"] + lines[2:]) + "9.5,76,0.0")
    run_train(ARGS + ["--run-dir", run, "--resume"])
    assert metrics_without_time(run) == metrics_without_time(reference)
    assert open(metrics).read().count("\n") == len(metrics_without_time(reference)) + 1


def test_a_cut_row_that_the_checkpoint_counts_is_refused_and_kept(tmp_path):
    run = str(tmp_path / "run")
    kill_after(ARGS + ["--run-dir", run], 3, 0.1)
    counted = load_checkpoint(run)["metrics_rows"]  # the newest checkpoint, as --resume reads it
    metrics = os.path.join(run, "metrics.csv")
    lines = open(metrics).read().splitlines(keepends=True)
    damaged = "".join(lines[:counted]) + lines[counted][:-12]  # the checkpoint's last row, cut short
    open(metrics, "w").write(damaged)
    p = run_train(ARGS + ["--run-dir", run, "--resume"], check=False)
    assert p.returncode == 2 and f"has {counted - 1} whole rows but the checkpoint recorded {counted}" in p.stderr
    assert open(metrics).read() == damaged


def test_a_checkpoint_with_flipped_bytes_is_never_loaded(reference, tmp_path):
    run = unfinished_copy(reference, tmp_path)
    last = os.path.join(run, "checkpoints", "last.pt")
    data = bytearray(open(last, "rb").read())
    middle = len(data) // 2  # inside the model's weights
    data[middle:middle + 64] = bytes(64)
    open(last, "wb").write(data)
    torch.load(last, weights_only=True)  # torch.load alone takes it, damaged weights and all
    p = run_train(ARGS + ["--run-dir", run, "--resume"])
    assert "last.pt is unreadable" in p.stderr and "CRC" in p.stderr
    assert os.path.exists(last + ".corrupt")  # set aside: the next save cannot rotate it over prev.pt
    assert metrics_without_time(run) == metrics_without_time(reference)  # resumed from prev.pt, one row earlier
    ref_w, w = final_weights(reference), final_weights(run)
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)


def test_resume_auto_removes_nothing_it_cannot_resume(tmp_path):
    foreign = tmp_path / "foreign"  # someone else's run: a config.json of other keys, five rows, no checkpoint
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"note": "results of another tool"}))
    (foreign / "metrics.csv").write_text("epoch,val_acc1\n" + "".join(f"{e},{50 + e}\n" for e in range(5)))
    before = {f: (foreign / f).read_text() for f in ("config.json", "metrics.csv")}
    p = run_train(ARGS + ["--run-dir", str(foreign), "--resume", "auto"], check=False)
    assert p.returncode == 2 and "cannot be resumed and nothing was removed" in p.stderr and "--overwrite" in p.stderr
    assert {f: (foreign / f).read_text() for f in before} == before
    run = str(tmp_path / "run")  # a run of ours whose two checkpoints are both damaged
    kill_after(ARGS + ["--run-dir", run], 3, 0.1)
    for name in os.listdir(os.path.join(run, "checkpoints")):
        open(os.path.join(run, "checkpoints", name), "r+b").write(b"garbage")
    rows = open(os.path.join(run, "metrics.csv")).read()
    p = run_train(ARGS + ["--run-dir", run, "--resume", "auto"], check=False)
    assert p.returncode == 2 and "no readable checkpoint" in p.stderr and ".corrupt" in p.stderr
    assert open(os.path.join(run, "metrics.csv")).read() == rows
    assert any(n.endswith(".corrupt") for n in os.listdir(os.path.join(run, "checkpoints")))


@pytest.mark.parametrize("config", [True, False])  # killed after its config.json, or after its metrics.csv header
def test_resume_auto_restarts_a_run_that_died_before_its_first_checkpoint(reference, tmp_path, config):
    run = tmp_path / "run"
    run.mkdir()
    if config:
        shutil.copy(os.path.join(reference, "config.json"), run)  # this very run's options, written at its start
    header = open(os.path.join(reference, "metrics.csv")).readline()
    (run / "metrics.csv").write_text(header)
    p = run_train(ARGS + ["--run-dir", str(run), "--resume", "auto"])
    assert "has no checkpoint (the run stopped before its first); starting it again" in p.stdout
    assert metrics_without_time(str(run)) == metrics_without_time(reference)


def test_resume_with_another_evaluation_cadence_is_refused(reference, tmp_path):
    run = unfinished_copy(reference, tmp_path)
    p = run_train(ARGS + ["--run-dir", run, "--resume", "--eval-every", "1"], check=False)
    assert p.returncode == 2 and "eval_every: 0.5 -> 1.0" in p.stderr


def test_a_run_from_an_older_train_py_resumes_with_its_columns_extended(reference, tmp_path):
    """A metrics.csv written before a column existed (startup_s): kept rows get the new columns empty."""
    run = unfinished_copy(reference, tmp_path)
    os.remove(os.path.join(run, "checkpoints", "last.pt"))  # one row to retrain
    metrics = os.path.join(run, "metrics.csv")
    rows = list(csv.reader(open(metrics)))
    cut = rows[0].index("startup_s")  # the file as written before startup_s and the columns after it
    with open(metrics, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(r[:cut] for r in rows)
    run_train(ARGS + ["--run-dir", run, "--resume"])
    got = list(csv.DictReader(open(metrics)))
    assert [r["startup_s"] for r in got[:-1]] == [""] * (len(got) - 1) and got[-1]["startup_s"] != ""
    newer = lambda rs: [{k: v for k, v in r.items() if k not in rows[0][cut:]} for r in rs]  # noqa: E731
    assert newer(metrics_without_time(run)) == newer(metrics_without_time(reference))


def test_a_checkpoint_and_metrics_from_before_train_loss_epoch_resume_with_the_window_restarted(reference, tmp_path):
    """A run from before train_loss_epoch (its column absent from metrics.csv, its checkpoints without the loss
    window), resumed from its second-last row: the old rows read the column as empty, the resumed row averages the
    steps since the resume (its own train_loss), and every other column is the uninterrupted run's."""
    from rundir import save_checkpoint
    run = unfinished_copy(reference, tmp_path)
    last, prev = (os.path.join(run, "checkpoints", f) for f in ("last.pt", "prev.pt"))
    old = torch.load(prev, weights_only=True)
    for rank in old["ranks"]:
        del rank["loss_window"]
    os.remove(last)
    save_checkpoint(run, old)
    metrics = os.path.join(run, "metrics.csv")
    rows = list(csv.reader(open(metrics)))
    cut = rows[0].index("train_loss_epoch")  # the file as written before it (and the columns added after it)
    with open(metrics, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(r[:cut] for r in rows)
    run_train(ARGS + ["--run-dir", run, "--resume"])
    got, ref = metrics_without_time(run), metrics_without_time(reference)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in rows[0][cut:]} for r in rs]  # noqa: E731
    assert strip(got) == strip(ref)
    assert [r["train_loss_epoch"] for r in got[:-1]] == [""] * (len(got) - 1)
    assert float(got[-1]["train_loss_epoch"]) == pytest.approx(float(got[-1]["train_loss"]), abs=2e-6)
    assert abs(float(got[-1]["train_loss_epoch"]) - float(ref[-1]["train_loss_epoch"])) > 1e-3
