"""What a hostile user breaks: NaN that must stop the run, two writers, lost rows, full disks, bad run dirs."""
import csv
import errno
import os
import signal
import subprocess
import time

import pytest
import torch

import rundir
from conftest import ENV, ROOT, TINY, run_train, train_cmd


def rows(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def ckpt_step(run, name="last.pt"):
    return torch.load(os.path.join(run, "checkpoints", name), weights_only=True)["step"]


# ---- NaN ---------------------------------------------------------------------------------------

def test_a_skipped_step_leaves_no_trace_in_weights_or_batchnorm():
    from conftest import step_context
    from methods import MethodList
    from models import build_model
    from timm.optim import SGDW
    from train import train_step
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, 1)
    opt = SGDW(model.parameters(), lr=0.1, momentum=0.9)
    args = (opt, torch.amp.GradScaler("cpu", enabled=False), MethodList([]), torch.autocast("cpu", enabled=False))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    train_step(model, *args, x, y, 1, False, step_context(0), check_finite=True)  # one good step: momentum exists
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x[3, 0, 5, 5] = float("nan")
    assert train_step(model, *args, x, y, 2, False, step_context(1), check_finite=True) is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                        after[k])]
    assert train_step(model, *args, x.nan_to_num(), y, 1, False, step_context(2), check_finite=True) is not None


def test_first_bad_step_is_reported_and_the_checkpoint_before_it_kept(tmp_path, monkeypatch, capsys):
    """NaN injected at steps 11 and 13 (0-based 10, 12), after the checkpoint of step 8: the error names the
    earliest, step 11, not the latest nor the evaluation at 16, and last.pt still holds step 8."""
    import train
    real = train.train_step

    def poisoned(*a, **k):
        loss = real(*a, **k)
        return loss * float("nan") if a[9].step in (10, 12) else loss
    monkeypatch.setattr(train, "train_step", poisoned)
    monkeypatch.delenv("RANK", raising=False)
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--run-dir", run, "--eval-every", "1", "--amp", "none", "--checkpoint-every", "0"])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite training loss at step 11 " in err and "last good checkpoint is kept" in err
    assert ckpt_step(run) == 8 and not os.path.exists(os.path.join(run, "done"))


def test_non_finite_validation_stops_the_run_without_done(tmp_path, monkeypatch, capsys):
    import train
    real, calls = train.evaluate, []

    def broken(*a, **k):
        calls.append(1)
        val = real(*a, **k)
        return dict(val, loss=float("nan")) if len(calls) == 2 else val
    monkeypatch.setattr(train, "evaluate", broken)
    monkeypatch.delenv("RANK", raising=False)
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--run-dir", run, "--eval-every", "1", "--amp", "none"])
    assert e.value.code == 3 and "non-finite validation loss at step 16" in capsys.readouterr().err
    assert ckpt_step(run) == 8 and not os.path.exists(os.path.join(run, "done"))
    assert [r["val_loss"] for r in rows(run)][1] == "nan"  # the evidence is logged


def test_a_row_after_only_skipped_steps_has_no_train_loss(tmp_path, monkeypatch):
    """Every step of the second epoch is non-finite and skipped: its row leaves train_loss empty, never 0."""
    import train
    real = train.train_step

    def poisoned(model, optimizer, scaler, objective, autocast, x, y, *rest, **k):
        if 8 <= rest[2].step < 16:
            x = x * float("nan")
        return real(model, optimizer, scaler, objective, autocast, x, y, *rest, **k)
    monkeypatch.setattr(train, "train_step", poisoned)
    monkeypatch.delenv("RANK", raising=False)
    run = str(tmp_path / "run")
    train.main(TINY + ["--run-dir", run, "--eval-every", "1", "--amp", "none", "--skip-nonfinite", "8"])
    r = rows(run)
    assert r[1]["train_loss"] == "" and r[1]["skipped_steps"] == "8"
    assert all(float(x["train_loss"]) > 0 for x in r[2:]) and float(r[-1]["val_loss"]) < 3  # the model is sane
    assert os.path.exists(os.path.join(run, "done"))


# ---- one writer, nothing lost ----------------------------------------------------------------------

def test_a_second_process_on_the_same_run_dir_is_refused(tmp_path):
    run = str(tmp_path / "run")
    args = TINY + ["--run-dir", run, "--resume", "auto", "--subset", "2048", "--cycles", "3"]
    first = subprocess.Popen(train_cmd(args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = os.path.join(run, "lock")
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(lock) and open(lock).read().strip()):
            time.sleep(0.05)
        second = run_train(args, check=False)
        assert second.returncode == 2, second.stderr
        assert f"in use by another train.py (pid {first.pid})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()


def test_resume_refuses_a_metrics_file_shorter_than_the_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    run_train(TINY + ["--run-dir", run, "--eval-every", "1"])
    os.remove(os.path.join(run, "done"))  # as if it had died after its last checkpoint
    path = os.path.join(run, "metrics.csv")
    lines = open(path).read().splitlines(keepends=True)
    with open(path, "w") as f:
        f.writelines(lines[:2])
    config = open(os.path.join(run, "config.json")).read()
    p = run_train(TINY + ["--run-dir", run, "--eval-every", "1", "--resume"], check=False)
    assert p.returncode == 2 and "metrics.csv has 1 whole rows but the checkpoint recorded 4" in p.stderr
    os.remove(path)
    p = run_train(TINY + ["--run-dir", run, "--eval-every", "1", "--resume"], check=False)
    assert p.returncode == 2 and "metrics.csv is missing" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert open(os.path.join(run, "config.json")).read() == config  # nothing rewritten


def test_a_finished_run_is_never_redone_by_resume(tmp_path):
    run = str(tmp_path / "run")
    run_train(TINY + ["--run-dir", run])
    before = open(os.path.join(run, "metrics.csv")).read()
    import shutil
    shutil.rmtree(os.path.join(run, "checkpoints"))
    for flag in (["--resume", "auto"], ["--resume"]):
        p = run_train(TINY + ["--run-dir", run] + flag)
        assert "already finished" in p.stdout
    assert open(os.path.join(run, "metrics.csv")).read() == before
    p = run_train(TINY + ["--run-dir", run, "--overwrite"])  # unless asked to
    assert "done:" in p.stdout


def test_resume_from_prev_moves_the_corrupt_last_aside(tmp_path):
    run = str(tmp_path / "run")
    from test_resume import kill_after, ARGS
    kill_after(ARGS + ["--run-dir", run], 4, 0.0)
    last = os.path.join(run, "checkpoints", "last.pt")
    if os.path.exists(last + ".new"):  # killed between the renames of a save: that file is the newest
        last += ".new"
    with open(last, "r+b") as f:
        f.truncate(100)
    run_train(ARGS + ["--run-dir", run, "--resume"])
    assert os.path.exists(last + ".corrupt")
    for name in ("last.pt", "prev.pt"):  # both loadable: the corrupt file was never rotated into prev.pt
        assert isinstance(ckpt_step(run, name), int)


# ---- clear lines instead of tracebacks ------------------------------------------------------------

@pytest.mark.parametrize("case", ["file", "parent-file", "read-only"])
def test_unusable_run_dir_is_one_line_before_any_data_is_loaded(tmp_path, case):
    target = tmp_path / "x"
    if case == "file":
        target.write_text("not a folder")
        run = target
    elif case == "parent-file":
        target.write_text("not a folder")
        run = target / "run"
    else:
        target.mkdir()
        os.chmod(target, 0o555)
        run = target / "run"
        if os.access(target, os.W_OK):
            pytest.skip("this user (root) writes into read-only folders")
    # a dataset that would fail to load: the run-dir line must come first
    p = run_train(["--data", "imagenet", "--data-dir", str(tmp_path / "missing"), "--run-dir", str(run)], check=False)
    assert p.returncode == 2 and "--run-dir" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    run = str(tmp_path)
    rundir.save_checkpoint(run, {"step": 1})
    rundir.save_checkpoint(run, {"step": 2})

    def full(obj, f):
        f.write(b"partial")
        raise error
    monkeypatch.setattr(rundir.torch, "save", full)
    with pytest.raises(rundir.RunDirError) as e:
        rundir.save_checkpoint(run, {"step": 3})
    assert "disk" in str(e.value) and "last.pt" in str(e.value) and "\n" not in str(e.value)
    assert ckpt_step(run) == 2 and ckpt_step(run, "prev.pt") == 1
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["last.pt", "prev.pt"]  # no stray temporary file


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    log = rundir.MetricsLog(str(tmp_path))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rundir.os, "fsync", full)
    with pytest.raises(rundir.RunDirError, match="disk full while writing .*metrics.csv"):
        log.append({"epoch": 1})


def test_a_full_disk_during_a_run_is_one_line_from_train_py(tmp_path, monkeypatch, capsys):
    import train

    def full(self, row):
        raise rundir.RunDirError(f"disk full while writing {self.path}; free space and resume with --resume")
    monkeypatch.setattr(train.MetricsLog, "append", full)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("train.py: error: disk full") and len(err.splitlines()) == 1


# ---- a model that cannot train on the data: one line, before anything is written -------------------

BAD_MODELS = [
    (["--model-kwargs", "drop_path_rate=nan"], "--model-kwargs: drop_path_rate=nan is not a finite number"),
    (["--model-kwargs", "drop_path_rate=-inf"], "--model-kwargs: drop_path_rate=-inf is not a finite number"),
    (["--model-kwargs", "drop_path_rate=abc"], "drop_path_rate=abc is not a number; small_resnet takes a number"),
    (["--model", "resnet18", "--model-kwargs", "drop_rate=abc"], "drop_rate=abc is not a number; resnet18 takes"),
    (["--model", "resnet18", "--model-kwargs", "drop_path_rate=abc"], "resnet18 cannot be built with these values"),
    (["--model", "resnet18", "--model-kwargs", "drop_rate=2"], "a forward pass on 3x32x32 images fails"),
    (["--config", "recipes/vit-fmnist.yaml"], "--model-kwargs img_size: vit_tiny_patch16_224 takes 28x28 images, "
                                              "but --data synthetic has 32x32; give --model-kwargs img_size=32"),
    (["--config", "recipes/vit-fmnist.yaml", "--amp", "auto"], "--model-kwargs img_size"),  # not mid-measurement
]


@pytest.mark.parametrize("argv,message", BAD_MODELS, ids=[" ".join(a) for a, _ in BAD_MODELS])
def test_a_model_that_cannot_train_on_the_data_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys,
                                                                             monkeypatch):
    """These were tracebacks (drop_rate=abc and the ViT on 32-pixel images mid-run, leaving config.json, lock and
    metrics.csv; with --amp auto inside the precision measurement): the model's options are checked against the
    data with one forward pass before the run folder exists."""
    import precision
    import train
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # --amp auto measures, wherever this runs
    run = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--amp", "none"] + argv + ["--run-dir", str(run)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not run.exists()


def test_the_checks_of_a_model_leave_the_run_as_it_was(tmp_path, monkeypatch):
    """The trial forward pass (dropout and drop-path draw from the RNG, BatchNorm counts its batches) is undone:
    weights, buffers and every RNG as they were, and a run's rows are those of the run trained without the check."""
    import csv

    import train
    from data import build_data
    from methods import MethodList
    from models import build_model
    data = build_data("synthetic", None, torch.device("cpu"), 64)
    torch.manual_seed(0)
    model = build_model("resnet10t", 10, 3, {"drop_rate": 0.5, "drop_path_rate": 0.5})
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, train.rng_state()
    args = train.parse_args(["--model", "resnet10t", "--data", "synthetic"])
    train.check_model_runs(model, data, MethodList([]), args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = train.rng_state()
    assert all(torch.equal(rng[k], after[k]) if isinstance(rng[k], torch.Tensor) else rng[k] == after[k] for k in rng)
    monkeypatch.delenv("RANK", raising=False)
    flags = TINY + ["--model", "resnet10t", "--model-kwargs", "drop_rate=0.3,drop_path_rate=0.2", "--cycles", "1",
                    "--eval-every", "0.5", "--method", "mixup"]
    train.main(flags + ["--run-dir", str(tmp_path / "checked")])
    monkeypatch.setattr(train, "check_model_runs", lambda *a: None)
    train.main(flags + ["--run-dir", str(tmp_path / "unchecked")])
    rows = [[{k: v for k, v in r.items() if not k.endswith("_s")} for r in csv.DictReader(open(tmp_path / d /
                                                                                              "metrics.csv"))]
            for d in ("checked", "unchecked")]
    assert rows[0] == rows[1] and len(rows[0]) == 4


def test_amp_auto_measures_only_after_the_schedule_checks(tmp_path, capsys, monkeypatch):
    """--amp auto timed the model for seconds before a bad schedule option was refused."""
    import precision
    import train
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(precision, "measures_precision", lambda *a: True)
    monkeypatch.setattr(precision, "measure_precision", lambda *a: pytest.fail("measured before the schedule's checks"))
    for extra in ([], ["--print-amp"]):
        with pytest.raises(SystemExit) as e:
            train.main(TINY + ["--amp", "auto", "--t0", "0.05", "--run-dir", str(tmp_path / "r")] + extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "--t0 0.05 epochs is under one optimizer step" in err, err
        assert not (tmp_path / "r").exists()


# ---- signals: SIGTERM or SIGINT stops the run at a checkpoint ----------------------------------------------------

# 32 steps an epoch, 128 in all, a row every 32: a signal sent once the first row is written lands mid-training
SIGNALLED = TINY + ["--batch-size", "8", "--eval-every", "1", "--checkpoint-every", "0", "--mixup", "0.2"]


def signalled(args, signum, torchrun=0, rank=0, env=None, torchrun_args=()):
    """Start train.py (or torchrun), and once its first row is written send `signum` to it (under torchrun to the
    worker of `rank` alone); returns (exit status, stderr). env: added to the tests' environment."""
    from test_resume import wait_for_rows
    p = subprocess.Popen(train_cmd(args, torchrun, torchrun_args), cwd=ROOT, env=dict(ENV, **(env or {})), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    wait_for_rows(p, args, 1, 0.0)
    os.kill(worker(p.pid, rank) if torchrun else p.pid, signum)
    _, err = p.communicate(timeout=600)
    return p.returncode, err


def worker(agent, rank):
    """The pid of torchrun's worker of `rank` (the one whose environment says RANK=rank)."""
    for pid in subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    raise AssertionError(f"torchrun {agent} has no worker of rank {rank}")


def same_run(run, reference):
    from test_resume import final_weights, metrics_without_time
    assert metrics_without_time(run) == metrics_without_time(reference)
    ref_w, w = final_weights(reference), final_weights(run)
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    run_train(SIGNALLED + ["--run-dir", run], fresh=True)  # a new interpreter: the resumed runs are forked
    return run


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_training_checkpoints_the_next_step_exits_128_plus_it_and_resumes_exactly(
        uninterrupted, tmp_path, signum):
    run = str(tmp_path / "run")
    rc, err = signalled(SIGNALLED + ["--run-dir", run], signum)
    step = ckpt_step(run)
    assert rc == 128 + signum, err[-2000:]
    assert f"train.py: {signum.name}: checkpoint at step {step} saved; resume with --resume auto" in err
    assert 32 < step < 128 and len(rows(run)) == 1 and not os.path.exists(os.path.join(run, "done"))
    run_train(SIGNALLED + ["--run-dir", run, "--resume", "auto"])
    same_run(run, uninterrupted)


@pytest.mark.parametrize("restarts", [0, 3])
def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_run_resumes_exactly(tmp_path, restarts):
    """SLURM signals every process and torchrun every worker, but one rank may get it first: the ranks' votes
    (every 25 steps, --checkpoint-every off too) stop both at one step, after rank 0's checkpoint there. Under
    --max-restarts torchrun restarted the stopped ranks (it was not signalled itself), and the run trained on:
    rank 0 now stops its agent too."""
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_train(SIGNALLED + ["--run-dir", ref], torchrun=2)
    rc, err = signalled(SIGNALLED + ["--run-dir", run, "--resume", "auto"], signal.SIGTERM, torchrun=2, rank=1,
                        torchrun_args=("--max-restarts", str(restarts)))  # as sweeps run it: a restart trains on
    step = ckpt_step(run)
    assert step in (50, 75, 100) and f"train.py: SIGTERM: checkpoint at step {step} saved" in err, err[-3000:]
    # no restart: without --max-restarts torchrun reports both ranks stopped (143); with it, rank 0 told the agent
    # to stop too; either way the run is where the signal left it
    assert rc == 1 and "will restart" not in err, err[-3000:]
    assert ("got signal: 15" in err) if restarts else (err.count("exitcode  : 143") == 2), err[-3000:]
    assert not os.path.exists(os.path.join(run, "done")) and ckpt_step(run) == step
    run_train(SIGNALLED + ["--run-dir", run, "--resume", "auto"], torchrun=2)
    same_run(run, ref)


def test_after_the_first_signal_a_sigterm_is_ignored_and_a_sigint_interrupts_at_once():
    """SLURM and torchrun each send one SIGTERM (repeats change nothing); a second Ctrl-C is the user insisting."""
    from train import STOP
    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    STOP.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert STOP.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # not a handler: the interpreter's exit resets those
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert STOP.signum == signal.SIGTERM
    finally:
        STOP.signum = 0
        STOP.restore()
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == before


@pytest.mark.parametrize("as_script", [False, True])
def test_after_a_stop_in_process_the_callers_handlers_come_back_and_as_a_script_sigterm_stays_ignored(as_script):
    """train.main called by a process that goes on (a test, a benchmark) stopped by a signal: it left SIGTERM
    ignored in its caller for good. Now only train.py run as a script (the process ends with the run) keeps it
    ignored, against torchrun's repeated SIGTERM."""
    from stop import STOP
    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    STOP.install()
    STOP.until_exit = as_script
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        STOP.restore()
        after = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
        assert after == ([signal.SIG_IGN, signal.default_int_handler] if as_script else before)
        assert STOP.signum == (signal.SIGTERM if as_script else 0)  # forgotten: the next train.main starts afresh
    finally:
        STOP.until_exit, STOP.signum = False, 0
        STOP.restore()
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == before
