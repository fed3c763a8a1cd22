"""train.py end to end: the run-format contract, torchrun, gradient accumulation, bad flags."""
import copy
import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run_train

CONTRACT_COLUMNS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "train_time_s", "cycle",
                    "cycle_end"]
CONTRACT_KEYS = ["schedule", "methods", "seed", "epochs", "warmup_epochs", "t0", "t_mult", "model", "dataset",
                 "batch_size", "grad_accum", "world_size", "lr", "momentum", "weight_decay", "amp"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_cyclic_run_follows_the_contract(tmp_path):
    run = tmp_path / "run"
    run_train(TINY + ["--run-dir", str(run), "--eval-every", "1"])
    cfg = json.loads((run / "config.json").read_text())
    assert all(k in cfg for k in CONTRACT_KEYS)
    assert cfg["schedule"] == "cyclic" and cfg["methods"] == [] and cfg["epochs"] == 4 and cfg["world_size"] == 1
    assert (run / "done").exists() and (run / "checkpoints" / "last.pt").exists()
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    rows = read_metrics(run)
    # 8 steps per epoch; evaluations every epoch; cycle ends at epochs 2 and 4
    assert [int(r["step"]) for r in rows] == [8, 16, 24, 32]
    assert [float(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["cycle"]) for r in rows] == [-1, 0, 1, 1]
    assert [int(r["cycle_end"]) for r in rows] == [0, 1, 0, 1]
    assert float(rows[0]["lr"]) == pytest.approx(0.1)  # last warmup step is at the peak
    assert float(rows[1]["lr"]) < 0.01 and float(rows[3]["lr"]) < 0.01  # cycle ends at the LR minimum
    times = [float(r["train_time_s"]) for r in rows]
    assert all(b > a for a, b in zip(times, times[1:]))
    for r in rows:
        assert 0 <= float(r["val_acc1"]) <= float(r["val_acc5"]) <= 100


def test_standard_run_and_default_run_dir(tmp_path):
    run_train(["--data", "synthetic", "--subset", "128", "--batch-size", "32", "--schedule", "standard",
                   "--epochs", "3", "--warmup-epochs", "1", "--no-progress", "--seed", "3"], env={"PWD": str(tmp_path)})
    run = os.path.join(os.path.dirname(os.path.dirname(__file__)), "runs",
                       "synthetic_small_resnet_standard-e3_baseline_s3")
    try:
        rows = read_metrics(run)
        assert [int(r["cycle_end"]) for r in rows] == [0, 0, 1] and [int(r["cycle"]) for r in rows] == [-1, 0, 0]
        cfg = json.load(open(os.path.join(run, "config.json")))
        assert cfg["t0"] == 2 and cfg["t_mult"] == 1
    finally:
        import shutil
        shutil.rmtree(run, ignore_errors=True)


def test_torchrun_two_processes_match_single_process_evaluation(tmp_path):
    run = tmp_path / "ddp"
    args = TINY + ["--run-dir", str(run), "--amp", "none"]
    run_train(args, torchrun=2)
    rows = read_metrics(run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2 and (run / "done").exists()
    assert [int(r["cycle_end"]) for r in rows if int(r["cycle_end"])] == [1, 1]
    # evaluate the saved weights in this single process: the sharded, reduced accuracy is exact
    from data import build_data
    from models import build_model
    from methods import MethodList
    from train import evaluate
    data = build_data("synthetic", None, torch.device("cpu"), subset=256)
    model = build_model("small_resnet", data.num_classes, data.in_chans)
    model.load_state_dict(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"])
    val = evaluate(model, data, 0, 1, 100, torch.autocast("cpu", enabled=False), MethodList([]), False)
    assert float(rows[-1]["val_acc1"]) == pytest.approx(val["acc1"], abs=1e-4)
    assert float(rows[-1]["val_loss"]) == pytest.approx(val["loss"], rel=1e-4)


def test_gradient_accumulation_equals_full_batch():
    from conftest import step_context
    from methods import MethodList
    from train import train_step
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 10))
    x, y = torch.randn(24, 3, 8, 8), torch.randint(0, 10, (24,))
    results = []
    for k in (1, 4):
        model = copy.deepcopy(net)
        from timm.optim import SGDW
        opt = SGDW(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for _ in range(2):
            loss = train_step(model, opt, scaler, MethodList([]), torch.autocast("cpu", enabled=False), x, y, k,
                              False, step_context(0))
        results.append((loss.item(), [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0][1][0], net[0].weight)  # the step did change the weights


BAD = [
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--batch-size", "30", "--grad-accum", "4"], "--batch-size"),
    (["--epochs", "5"], "--epochs 5 does not end a cycle"),
    (["--cycles", "2", "--epochs", "4"], "--cycles"),
    (["--data", "mnist-ish"], "--data"),
    (["--data-dir", "/nonexistent/fmnist"], "--data-dir"),
    (["--data", "imagenet"], "--data-dir"),
    (["--data", "cifar10"], "--data-dir"),
    (["--schedule", "linear"], "--schedule"),
    (["--amp", "fp16"], "--amp"),
    (["--amp", "int8"], "--amp"),
    (["--momentum", "1.5"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--schedule", "standard", "--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--t0", "0"], "--t0"),
    (["--schedule", "constant", "--t-mult", "2"], "--t-mult"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--mixup", "0.2", "--batch-size", "6", "--grad-accum", "2"], "mixup needs an even micro-batch"),
    # the method API: names, options, values, combinations, plug-in files
    (["--method", "mixupp"], "unknown method 'mixupp'"),
    (["--method", "sam:rhoo=0.1"], "--method sam: unknown option 'rhoo'"),
    (["--method", "sam:rho=abc"], "--method sam: rho=abc must be a finite number"),
    (["--method", "sam:rho=-1"], "--method sam: rho must be > 0"),
    (["--method", "ema:warmup=maybe"], "--method ema: warmup=maybe must be true or false"),
    (["--method", "mixup", "--method", "cutmix"], "cannot be combined"),
    (["--mixup", "0.4", "--method", "mixup"], "--method mixup is given twice"),
    (["--method", "stochastic_depth", "--model-kwargs", "drop_path_rate=0.2"], "--model-kwargs drop_path_rate"),
    (["--method", "ema", "--schedule", "schedule-free"], "--method ema: schedule-free"),
    (["--plugins", "/nonexistent/plugin.py"], "--plugins: no file"),
    (["--method", "progressive_resizing", "--model", "vit_tiny_patch16_224", "--model-kwargs",
      "img_size=32,patch_size=8,depth=1,embed_dim=32,num_heads=2"], "--method progressive_resizing"),
    (["--model", "no_such_net"], "--model"),
    (["--resume"], "--resume"),
    (["--resume", "--overwrite"], "--resume"),
    (["--subset", "-3"], "--subset"),
    (["--batch-size", "512", "--subset", "100"], "--batch-size"),
    (["--schedule", "wsd", "--cooldown-frac", "1.5"], "--cooldown-frac"),
    (["--schedule", "wsd", "--cooldown-frac", "0"], "--cooldown-frac"),
    (["--schedule", "wsd", "--cooldown-shape", "cubic"], "--cooldown-shape"),
    (["--schedule", "wsd", "--warmup-epochs", "1", "--t0", "0.25", "--cooldown-frac", "0.5"], "--cooldown-frac"),
    (["--schedule", "cyclic-decay", "--cycle-decay", "0"], "--cycle-decay"),
    (["--schedule", "cyclic-decay", "--cycle-decay", "1.2"], "--cycle-decay"),
    (["--blurpool", "--blurpool-mode", "sideways"], "--blurpool-mode"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    # non-finite values pass every bound; each is refused before anything is written
    (["--lr", "inf"], "--lr"),
    (["--eval-every", "inf"], "--eval-every"),
    (["--t0", "inf"], "--t0"),
    (["--schedule", "schedule-free", "--sf-warmup-epochs", "inf"], "--sf-warmup-epochs"),
    (["--schedule", "schedule-free", "--sf-lr", "inf"], "--sf-lr"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--mixup", "inf"], "--mixup"),
    (["--label-smoothing", "nan"], "--label-smoothing"),
    (["--epochs", "nan", "--schedule", "standard"], "--epochs"),
    # a warmup as long as the run never reaches the peak LR, for every schedule
    (["--schedule", "schedule-free", "--cycles", "2", "--sf-warmup-epochs", "4"], "--sf-warmup-epochs"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_fail_with_one_line_and_write_nothing(argv, flag, tmp_path, capsys, monkeypatch):
    import train
    monkeypatch.delenv("RANK", raising=False)
    run = tmp_path / "r"
    base = [] if "--data" in argv or "--data-dir" in argv else ["--data", "synthetic"]
    with pytest.raises(SystemExit) as e:
        train.main(base + argv + ["--run-dir", str(run), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:") and flag in err, err
    assert not run.exists()


# ---- guards found by the mutation audit (tests/README.md) ------------------------------------------

def test_a_resumed_process_continues_instead_of_restarting(tmp_path):
    from test_resume import ARGS, kill_after
    run = str(tmp_path / "run")
    kill_after(ARGS + ["--run-dir", run], 3, 0.0)
    p = run_train(ARGS + ["--run-dir", run, "--resume"])
    resumed = int(p.stdout.split("resumed at step ")[1].split()[0])
    taken = int(p.stdout.split("s of training, ")[1].split()[0])
    assert resumed >= 4 and taken == 32 - resumed  # 8 steps per epoch, 4 epochs; checkpoints every 4 steps


def test_two_ranks_with_accumulation_equal_one_process(tmp_path):
    """2 gloo ranks x --grad-accum 2 see the same four micro-batches as one process with --grad-accum 4:
    equal weights after the run only if DDP all-reduces on the last micro-step."""
    args = ["--data", "synthetic", "--subset", "128", "--batch-size", "32", "--schedule", "standard", "--epochs", "2",
            "--warmup-epochs", "1", "--lr", "0.2", "--amp", "none", "--no-progress", "--eval-every", "0"]
    run_train(args + ["--run-dir", str(tmp_path / "one"), "--grad-accum", "4"])
    run_train(args + ["--run-dir", str(tmp_path / "two"), "--grad-accum", "2"], torchrun=2)
    one, two = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["model"]
                for r in ("one", "two"))
    params = [k for k in one if "running" not in k and "num_batches" not in k]  # BN buffers are rank 0's own
    # equal up to the all-reduce's summation order (measured: < 7e-4 after 8 steps at lr 0.2); a sync on the
    # wrong micro-step, or other micro-batches, differs by about 0.1
    for k in params:
        torch.testing.assert_close(one[k], two[k], rtol=1e-2, atol=3e-3, msg=k)


def test_bare_method_flags_take_their_documented_values(tmp_path):
    run = tmp_path / "run"
    p = run_train(TINY + ["--run-dir", str(run), "--label-smoothing", "--mixup", "--cycles", "1"])
    assert "methods label_smoothing, mixup;" in p.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["label_smoothing"] == 0.1 and cfg["mixup"] == 0.2 and cfg["methods"] == ["label_smoothing", "mixup"]


@pytest.mark.parametrize("opt", ["sgdw", "adamw", "lamb", "lion"])
def test_sgdw_decays_by_wd_times_lr_over_peak(opt):
    """Decoupled weight decay, the same for every --opt: with zero gradient one step at LR l scales weights by
    1 - wd * l / peak (torch's AdamW weight_decay = --weight-decay / --lr)."""
    import options
    import train
    args = options.parse_args(["--lr", "0.4", "--weight-decay", "0.05", "--opt", opt])
    model = torch.nn.Module()
    model.p = p = torch.nn.Parameter(torch.full((3,), 2.0))
    opt = train.build_optimizer(model, args, None, None, exclusions=False)
    for lr in (0.4, 0.1):
        opt.param_groups[0]["lr"] = lr
        before = p.detach().clone()
        p.grad = torch.zeros(3)
        opt.step()
        torch.testing.assert_close(p.detach(), before * (1 - 0.05 * lr / 0.4))


def test_baseline_and_channels_last_run_different_kernels(tmp_path):
    """The baseline trains NCHW, --channels-last NHWC: same arithmetic, other kernels, so their losses agree
    closely but not to the last bit (they did when the baseline's batches were channels-last by accident)."""
    losses = {}
    for name, flags in (("nchw", []), ("cl", ["--channels-last"])):
        run = tmp_path / name
        run_train(TINY + ["--run-dir", str(run), "--amp", "none", "--eval-every", "1"] + flags)
        losses[name] = [float(r["train_loss"]) for r in read_metrics(run)]
    assert losses["nchw"] != losses["cl"]
    assert losses["nchw"] == pytest.approx(losses["cl"], rel=0.05)


def test_checkpoints_between_evaluations_resume_exactly(tmp_path):
    """--checkpoint-every writes checkpoints between the evaluations (here after nearly every step) without a
    metrics row; killed after one, the run resumes to the same rows and weights."""
    from test_resume import ARGS, ENV, metrics_without_time, train_cmd
    args = ARGS + ["--eval-every", "0"]
    ref = str(tmp_path / "ref")
    run_train(args + ["--run-dir", ref])
    run = str(tmp_path / "run")
    # killed once a checkpoint after the first evaluation (step 16), before the second (32), is on disk: polled, not timed, so that a
    # loaded machine cannot kill it before its first checkpoint (the flake this replaced: a fixed 0.15 s delay)
    p = subprocess.Popen(train_cmd(args + ["--run-dir", run, "--checkpoint-every", "1e-6"]), cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, step = time.time() + 300, 0
    while not 16 < step < 32 and time.time() < deadline and p.poll() is None:
        try:
            step = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)["step"]
        except (OSError, RuntimeError, EOFError):  # not written yet (saves are renamed into place: never half)
            time.sleep(0.005)
    p.kill()
    p.wait()
    assert 16 < step < 32  # after the first row, not an evaluation's checkpoint
    assert len(read_metrics(run)) == 1
    run_train(args + ["--run-dir", run, "--checkpoint-every", "1e-6", "--resume"])
    assert metrics_without_time(run) == metrics_without_time(ref)
    a, b = (torch.load(os.path.join(r, "checkpoints", "last.pt"), weights_only=True)["model"] for r in (ref, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_standard_takes_t_mult_and_ends_on_the_cyclic_step(tmp_path):
    run = tmp_path / "run"
    run_train(["--data", "synthetic", "--subset", "117", "--batch-size", "1", "--schedule", "standard", "--cycles", "2",
               "--t-mult", "3", "--warmup-epochs", "0.5", "--t0", "0.5", "--eval-every", "0", "--amp", "none",
               "--run-dir", str(run), "--no-progress", "--lr", "0.01"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 2.5  # warmup 0.5 + 0.5 + 1.5: t_mult 3, not a hard-coded 2
    assert read_metrics(run)[-1]["step"] == str(58 + 58 * 4)  # the cyclic run's second cycle ends at step 290


@pytest.mark.parametrize("ranks", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_train_loss_epoch_is_the_last_epochs_mean_loss_whatever_the_evaluation_cadence(tmp_path, ranks):
    """8 steps per epoch, a row every 4 (--eval-every 0.5): each row's train_loss_epoch is the mean of its own and
    the previous row's train_loss (4 steps each), the first row's its own (the run has taken half an epoch); under
    DDP the mean over ranks, as train_loss. A standard run evaluated only at its end (one row, whose train_loss is the
    whole run's mean) reports the same train_loss_epoch as one evaluated every half epoch."""
    run = tmp_path / "run"
    run_train(TINY + ["--run-dir", str(run), "--eval-every", "0.5"], torchrun=ranks)
    rows = read_metrics(run)
    loss, epoch = ([float(r[c]) for r in rows] for c in ("train_loss", "train_loss_epoch"))
    assert len(rows) == 8 and epoch[0] == loss[0]
    assert epoch[1:] == pytest.approx([(a + b) / 2 for a, b in zip(loss, loss[1:])], abs=2e-6)
    assert min(abs(e - v) for e, v in zip(epoch[1:], loss[1:])) > 1e-3  # not train_loss again
    if ranks:
        return
    standard = TINY + ["--schedule", "standard", "--epochs", "2"]
    run_train(standard + ["--run-dir", str(tmp_path / "one"), "--eval-every", "0"])
    run_train(standard + ["--run-dir", str(tmp_path / "every"), "--eval-every", "0.5"])
    (one,), every = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "every")
    assert float(one["train_loss"]) == pytest.approx(sum(float(r["train_loss"]) for r in every) / 4, abs=2e-6)
    assert float(one["train_loss_epoch"]) == pytest.approx(float(every[-1]["train_loss_epoch"]), abs=2e-6)
    assert float(one["train_loss_epoch"]) < float(one["train_loss"]) - 1e-3


def test_training_imports_nothing_from_analysis():
    """Layers run one way: train.py and every module it loads sit below analysis (what both need, how old runs
    read, lives in runformat); and analysis reads runs without torch."""
    code = ("import sys, train; print(sorted(m for m in sys.modules if m.split('.')[0] == 'analysis'))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
    code = "import sys, analysis.compare, analysis.report; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stdout + p.stderr
