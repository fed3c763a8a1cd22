"""What a run records about itself is what it did: the precision it computes in, its training time (to the
second, under a clock the test drives), the options a resume must match, and exact resume with dropout and
drop-path drawing from the global RNG."""
import csv
import json
import os
import shutil

import pytest
import torch

import options
import precision
import schedules
from conftest import TINY, run_train


def rows(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def in_process(monkeypatch):
    """train.main in this process (so that its functions can be watched), as a single-process run."""
    import train
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, on a GPU host too
    return train


# ---- precision -------------------------------------------------------------------------------

def cpu_has_native_bf16():
    """From the kernel's CPU flags: x86's AVX512-BF16 or AMX-BF16, Arm's bf16 (not AVX-512 alone: emulated)."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = set(open("/proc/cpuinfo").read().split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@pytest.mark.parametrize("amp", ["none", "bf16", "auto"])
def test_the_recorded_precision_is_the_one_the_model_computes_in(in_process, tmp_path, amp, monkeypatch):
    monkeypatch.setattr(precision, "measure_precision", lambda *a: ("bf16", {}))  # what auto measures: below
    monkeypatch.setattr(in_process, "check_model_runs", lambda *a: None)  # its fp32 trial pass trains nothing
    seen = set()

    def hook(module, inputs, output):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            seen.add((module.training, output.dtype))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        run = str(tmp_path / "run")
        in_process.main(TINY + ["--run-dir", run, "--amp", amp, "--eval-every", "0", "--cycles", "1"])
    finally:
        handle.remove()
    recorded = json.load(open(os.path.join(run, "config.json")))["amp"]
    if amp == "auto":  # measured where the CPU has bf16 natively, else fp32 (emulated bf16 is ~10x slower)
        assert recorded == ("bf16" if cpu_has_native_bf16() else "none")
    else:
        assert recorded == amp
    dtype = torch.bfloat16 if recorded == "bf16" else torch.float32
    assert seen == {(True, dtype), (False, dtype)}  # training and evaluation, every conv and linear layer


@pytest.mark.parametrize("faster", ["none", "bf16"])
def test_amp_auto_on_a_cpu_takes_the_precision_measured_faster_and_leaves_no_trace(in_process, tmp_path,
                                                                                 monkeypatch, faster):
    """The measurement runs real steps (the timing stubbed: the calls alternate fp32, bf16); the run records the
    faster and both figures, and trains exactly as a run asked for that precision."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    real, calls = precision.images_per_second, []

    def timed(step, batch, steps):
        real(step, batch, 1)
        calls.append(1)
        return 100.0 if ("none", "bf16")[(len(calls) - 1) % 2] == faster else 50.0
    monkeypatch.setattr(precision, "images_per_second", timed)
    args = TINY + ["--eval-every", "1", "--cycles", "1"]
    in_process.main(args + ["--run-dir", str(tmp_path / "auto"), "--amp", "auto"])
    cfg = json.load(open(tmp_path / "auto" / "config.json"))
    assert cfg["amp"] == faster and cfg["amp_measured"] == {faster: 100.0, ({"none", "bf16"} - {faster}).pop(): 50.0}
    in_process.main(args + ["--run-dir", str(tmp_path / "asked"), "--amp", faster])
    strip = lambda run: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows(run)]  # noqa: E731
    assert strip(str(tmp_path / "auto")) == strip(str(tmp_path / "asked"))
    assert len(calls) == 4  # two interleaved rounds; the second run asked explicitly: nothing measured


@pytest.mark.parametrize("bf16,expected", [(105.0, "none"), (95.0, "none"), (120.0, "bf16")])
def test_amp_auto_takes_bf16_only_where_it_trains_at_least_the_margin_faster(in_process, monkeypatch, bf16,
                                                                            expected):
    """fp32 measured at 100 img/s: bf16 is taken at 120 (over the 1.1x margin), not at 105 (a near tie keeps fp32,
    whose result does not depend on the timing's noise) nor at 95."""
    from types import SimpleNamespace

    from methods import MethodList
    from models import build_model
    assert precision.AMP_MARGIN == 1.1
    calls = []

    def timed(step, batch, steps):
        calls.append(1)
        return (100.0, bf16)[(len(calls) - 1) % 2]  # the rounds alternate fp32, bf16
    monkeypatch.setattr(precision, "images_per_second", timed)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    loader = SimpleNamespace(epoch=lambda epoch, rank: iter([(x, y)]))
    amp, figures = precision.measure_precision(build_model("small_resnet", 10, 1), loader, MethodList([]),
                                               SimpleNamespace(batch_size=8, grad_accum=1, seed=0),
                                               in_process.train_step)
    assert amp == expected and figures == {"none": 100.0, "bf16": bf16} and len(calls) == 4


# ---- time accounting under a clock the test drives ------------------------------------------

class FakeTime:
    """train.py's time module: the clock moves only when the test says (1 s per training step, 100 s per
    evaluation, 1,000 s per checkpoint, 10,000 s per BatchNorm recalibration)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    monotonic = perf_counter


def driven(train, monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(train, "time", clock)
    for owner, name, cost in ((train, "train_step", 1.0), (train, "evaluate", 100.0),
                              (train, "save_checkpoint", 1000.0), (train, "recompute_bn", 10000.0),
                              (train.Checkpoints, "snapshot", 1e5), (train.Checkpoints, "restore_snapshot", 1e6),
                              (train.Run, "warm_up", 1e7)):
        def timed(*args, _real=getattr(owner, name), _cost=cost, **kwargs):
            clock.now += _cost
            return _real(*args, **kwargs)
        monkeypatch.setattr(owner, name, timed)
    return clock


@pytest.mark.parametrize("schedule", ["cyclic", "wsd", "schedule-free"])
def test_training_time_counts_training_steps_only(in_process, monkeypatch, tmp_path, schedule):
    """train_time_s = the steps on the row's own path; curve_cost_s = every step the run took so far (a wsd branch
    once); evaluation, checkpoints, schedule-free's BatchNorm recalibration, wsd's copies of the trunk and the
    process's start-up are not training time."""
    driven(in_process, monkeypatch)
    run = str(tmp_path / "run")
    in_process.main(TINY + ["--run-dir", run, "--schedule", schedule, "--eval-every", "0.5", "--amp", "none"])
    config = json.load(open(os.path.join(run, "config.json")))
    plan = schedules.make_plan(schedule, config["epochs"], 1, 1, 2, 8, config["cycle_decay"],
                               config["cooldown_frac"], config["cooldown_shape"])
    segments = plan.segments()

    def steps_taken(row):  # by the run when it reached this row: its segment's start in the run, plus the way in
        step, branch = int(row["step"]), schedule == "wsd" and row["cycle_end"] == "1"
        seg = next(s for s in segments if (s.kind == "branch") == branch and s.start < step <= s.end)
        return seg.run_start + step - seg.start
    got = rows(run)
    assert sum(r["cycle_end"] == "1" for r in got) == 2 and len(got) >= 8  # curve points at 2 and 4 epochs
    for r in got:
        assert float(r["train_time_s"]) == int(r["step"]) and float(r["curve_cost_s"]) == steps_taken(r)
        assert float(r["eval_time_s"]) == (10100 if schedule == "schedule-free" else 100)
        assert float(r["images_per_s"]) == 32  # one batch of 32 a second
        assert float(r["startup_s"]) == 1e7  # this process's start-up (compile, autotuning, first batch): apart


# ---- resume refuses every result-defining option ---------------------------------------------

# Written out here, not read from options.py: a key dropped from options.RESULT_KEYS must fail this test. The
# methods' options are in `methods` (canonical specs, e.g. label_smoothing:eps=0.2); `plugins` hashes plug-in files.
RESULT_KEYS = ("dataset", "data_dir", "subset", "model", "model_kwargs", "schedule", "epochs", "warmup_epochs", "t0",
               "t_mult", "eta_min", "batch_size", "grad_accum", "world_size", "lr", "momentum", "nesterov",
               "weight_decay", "amp", "methods", "method_options", "plugins", "seed", "compile", "cycle_decay",
               "cooldown_frac", "cooldown_shape", "sf_lr", "sf_warmup_epochs", "family_t0",
               "family_t_mult", "eval_every", "tf32", "deterministic", "device_name", "cooldown_version", "opt",
               "opt_betas", "opt_eps", "decay_exclusions", "clip_grad", "lamb_version")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("finished") / "run")
    run_train(TINY + ["--run-dir", run, "--cycles", "1", "--eval-every", "0"])
    return run


@pytest.mark.parametrize("key", RESULT_KEYS)
def test_resume_refuses_a_checkpoint_that_differs_in_any_result_option(in_process, finished, tmp_path, capsys,
                                                                       key):
    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    os.remove(os.path.join(run, "done"))
    last = os.path.join(run, "checkpoints", "last.pt")
    ckpt = torch.load(last, weights_only=True)
    assert key in ckpt["config"]
    ckpt["config"][key] = "another value"
    torch.save(ckpt, last)
    with pytest.raises(SystemExit) as e:  # (--amp auto asked again keeps the recorded choice: ask one here)
        decide(in_process, run, *["--amp", "none"] * (key == "amp"))
    assert e.value.code == 2 and f"{key}: 'another value' -> " in capsys.readouterr().err


# ---- exact resume with dropout and drop-path ---------------------------------------------------

def test_resume_with_dropout_and_drop_path_is_exact(tmp_path):
    """Dropout and drop-path draw from the global RNG during training: a resume must put it back exactly."""
    args = TINY + ["--model", "resnet10t", "--model-kwargs", "drop_rate=0.3,drop_path_rate=0.2", "--amp", "none",
                   "--cycles", "1", "--eval-every", "0.5"]
    ref = str(tmp_path / "ref")
    run_train(args + ["--run-dir", ref])
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    os.remove(os.path.join(run, "done"))
    os.remove(os.path.join(run, "checkpoints", "last.pt"))  # resume from the previous row's checkpoint
    run_train(args + ["--run-dir", run, "--resume"])
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731
    assert strip(rows(run)) == strip(rows(ref))
    w, w_ref = (torch.load(os.path.join(d, "checkpoints", "last.pt"), weights_only=True)["model"] for d in (run, ref))
    assert all(torch.equal(w[k], w_ref[k]) for k in w_ref)


def edited_copy(finished, tmp_path, edit):
    """The finished run, copied, with edit(config) applied to its checkpoint's recorded options."""
    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    last = os.path.join(run, "checkpoints", "last.pt")
    ckpt = torch.load(last, weights_only=True)
    edit(ckpt["config"])
    torch.save(ckpt, last)
    return run


def decide(train, run, *flags):
    args = options.parse_args(TINY + ["--run-dir", run, "--cycles", "1", "--eval-every", "0", "--resume", *flags])
    return train.resume_decision(args, options.resolve(args, 1, torch.device("cpu"))[0], True)


def test_a_finished_run_made_on_another_host_is_not_refused(in_process, finished, tmp_path, capsys):
    """Another data folder, another GPU (TF32 on), or another precision where --amp auto chose it there: the same
    finished run."""
    run = edited_copy(finished, tmp_path, lambda c: c.update(amp="fp16", data_dir="/elsewhere/fashion-mnist",
                                                             device_name="NVIDIA H200", tf32=True))
    with pytest.raises(SystemExit) as e:
        decide(in_process, run, "--amp", "auto")  # asked for with --amp auto
    assert e.value.code == 0 and "already finished" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        decide(in_process, run, "--amp", "none")  # a precision asked for by name must match
    assert e.value.code == 2 and "amp: 'fp16' -> 'none'" in capsys.readouterr().err
    config = json.load(open(os.path.join(run, "config.json")))
    json.dump(dict(config, argv=config["argv"] + ["--amp", "fp16"]), open(os.path.join(run, "config.json"), "w"))
    with pytest.raises(SystemExit) as e:  # asked by name (as a sweep asks): auto keeps whatever the run recorded
        decide(in_process, run, "--amp", "auto")
    assert e.value.code == 0 and "already finished" in capsys.readouterr().out
    os.remove(os.path.join(run, "done"))  # unfinished: a resume continues here, so everything must match
    with pytest.raises(SystemExit) as e:
        decide(in_process, run, "--amp", "auto")
    assert e.value.code == 2 and "data_dir: '/elsewhere/fashion-mnist' -> None" in capsys.readouterr().err


def test_a_run_from_before_model_kwargs_resumes_only_without_them(in_process, finished, tmp_path, capsys):
    """Runs predating --model-kwargs ran with none: {} (as the analysis reads them), not 'anything goes'."""
    run = edited_copy(finished, tmp_path, lambda c: c.pop("model_kwargs"))
    config = json.load(open(os.path.join(run, "config.json")))
    del config["model_kwargs"]
    json.dump(config, open(os.path.join(run, "config.json"), "w"))
    os.remove(os.path.join(run, "done"))
    with pytest.raises(SystemExit) as e:
        decide(in_process, run, "--model-kwargs", "drop_rate=0.5")
    assert e.value.code == 2 and "model_kwargs: {} -> {'drop_rate': 0.5}" in capsys.readouterr().err
    assert decide(in_process, run)[0] is not None  # without them: resumed


def test_keys_an_older_checkpoint_lacks_are_compared_with_config_json(in_process, finished, tmp_path, capsys):
    run = edited_copy(finished, tmp_path, lambda c: c.pop("eval_every"))
    os.remove(os.path.join(run, "done"))
    with pytest.raises(SystemExit) as e:
        decide(in_process, run, "--eval-every", "0.5")
    assert e.value.code == 2 and "eval_every: 0.0 -> 0.5" in capsys.readouterr().err
