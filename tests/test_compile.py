"""--compile off|on|auto: auto's choice from timings the tests stub (both ways, the 1.1x margin at its boundary, each
image size weighted by its steps), on the run's own step and undone, what a run records of it, a resume that keeps
it (and its compile_dynamic) without measuring, --print-compile for sweeps at the runs' world size, launch.sh's
refusals where it would measure on the wrong machine, ranks that disagree, bad input in one line, every image size
compiled in start-up, the benchmarks' alternating order, calibrate's recompile limit; and one real compilation of a
tiny model, whose run agrees with the eager run's. Round 3: a sweep's choice per method set as its first run trains,
the measurement's minimum wall time, seeds differing only in compile named, the start-up compiling on train_step's
views, compile_dynamic from the checkpoint and out of one-size cost keys, hook-free benchmark steps, and auto that
trains exactly as the choice given by name."""
import csv
import json
import os
import shutil

import pytest
import torch

from conftest import TINY, run_train


def rows(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def config(run):
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


@pytest.fixture
def in_process(monkeypatch):
    """train.main in this process, single-process and on the CPU; torch.compile replaced by a wrapper that counts
    its forward calls (no compilation: the suite compiles one tiny model, below)."""
    import train
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "compiled_models", [], raising=False)

    def fake_compile(model, **kwargs):
        wrapper = Counted(model, kwargs)
        train.compiled_models.append(wrapper)
        return wrapper
    monkeypatch.setattr(torch, "compile", fake_compile)
    return train


class Counted(torch.nn.Module):
    def __init__(self, model, kwargs):
        super().__init__()
        self.model, self.kwargs, self.shapes, self.batches, self.inputs = model, kwargs, [], [], []

    def forward(self, x):
        self.shapes.append((tuple(x.shape[-2:]), torch.is_grad_enabled()))
        # what a graph's guards check of its input: shape, and whether it is a view (of a base of which shape)
        self.inputs.append((tuple(x.shape), x._base is not None and tuple(x._base.shape)))
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.batches.append((tuple(x.shape), dtype))  # the batch the step gave the model, its autocast precision
        return self.model(x)

    def __len__(self):  # as torch.compile's OptimizedModule: no truth value of its own
        raise TypeError(f"{type(self.model).__name__} does not support len()")


def timings(monkeypatch, eager, compiled):
    """compile_choice's timer stubbed for a run at one image size: its rounds time eager then compiled, then
    compiled then eager (A B B A)."""
    import compile_choice
    calls = []

    def timed(step, batch, steps, device):
        calls.append(1)
        n = len(calls) - 1
        return ((eager, compiled), (compiled, eager))[n // 2 % 2][n % 2]
    monkeypatch.setattr(compile_choice, "images_per_second", timed)
    return calls


def unit_step(model):
    """(step(m, ctx), kept) for compile_choice.measure: a plain SGD step of `model` on 8 images, which the steps
    change (lr 0.1), and a context that puts the weights back; the sizes each step was asked for, in `asked`."""
    from methods import weights_kept
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    asked = []

    def step(m, ctx):
        asked.append((ctx.size, m is not model))
        torch.nn.functional.cross_entropy(m(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step.asked = asked
    return step, lambda: weights_kept(model)


@pytest.mark.parametrize("compiled,chosen", [(110.0, True), (109.9, False), (150.0, True), (90.0, False)])
def test_auto_compiles_only_where_the_compiled_steps_train_at_least_the_margin_faster(in_process, monkeypatch,
                                                                                       compiled, chosen):
    """Eager at 100 img/s: compiled at 110 (exactly 1.1x) and 150 is taken, at 109.9 (a near tie keeps eager) and
    90 not; both figures recorded as measured, the weights left as they were."""
    from types import SimpleNamespace

    import compile_choice
    from models import build_model
    assert compile_choice.MARGIN == 1.1
    calls = timings(monkeypatch, 100.0, compiled)
    model = build_model("small_resnet", 10, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step, kept = unit_step(model)
    figures, _ = compile_choice.measure(model, step, {"28x28": (SimpleNamespace(size="28x28"), 16)}, 8, False, kept)
    assert figures["chosen"] is chosen and len(calls) == 2 * compile_choice.MEASURE_ROUNDS
    assert (figures["eager_images_per_s"], figures["compiled_images_per_s"]) == (100.0, compiled)
    assert figures["compile_s"] >= 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_auto_weighs_each_image_size_by_the_runs_steps_there_and_times_its_compilation(in_process, monkeypatch):
    """Progressive resizing: 30 steps at 14 px, where compiling gains nothing (400 img/s either way), 10 at 28 px,
    where it doubles the rate (100 -> 200): the run trains 1.4x faster compiled, not 2x (full size alone) nor 1x;
    rounds alternate eager-first and compiled-first. compile_s: each size's first compiled step beyond a steady
    one (the clock stubbed: 3 s, 2 s), measure_s all of it, the start-up the measurement costs."""
    from types import SimpleNamespace

    import compile_choice
    from models import build_model
    model = build_model("small_resnet", 10, 1)
    step, kept = unit_step(model)
    clock = SimpleNamespace(t=100.0)
    rates = {("14x14", False): 400.0, ("14x14", True): 400.0, ("28x28", False): 100.0, ("28x28", True): 200.0}
    first = {"14x14": 3.0, "28x28": 2.0}

    def stepped(m, ctx):  # a compiled size's first step compiles it: its seconds on the clock
        if m is not model and (ctx.size, True) not in step.asked:
            clock.t += first[ctx.size]
        step(m, ctx)

    def timed(run, batch, steps, device):
        run()
        clock.t += 1.0  # (the timed steps: in measure_s, not in compile_s)
        return rates[step.asked[-1]]
    monkeypatch.setattr(compile_choice, "images_per_second", timed)
    monkeypatch.setattr(compile_choice, "time", SimpleNamespace(perf_counter=lambda: clock.t))
    sides = {side: (SimpleNamespace(size=side), n) for side, n in (("14x14", 30), ("28x28", 10))}
    figures, _ = compile_choice.measure(model, stepped, sides, 8, True, kept)
    assert figures["eager_images_per_s"] == pytest.approx(40 / (30 / 400 + 10 / 100))
    assert figures["compiled_images_per_s"] == pytest.approx(40 / (30 / 400 + 10 / 200)) and figures["chosen"]
    assert figures["compiled_images_per_s"] / figures["eager_images_per_s"] == pytest.approx(1.4)
    assert figures["compile_s"] == pytest.approx(3.0 - 8 / 400 + 2.0 - 8 / 200)
    assert figures["measure_s"] == pytest.approx(3.0 + 2.0 + 2 * 2 * 2 * 1.0)
    assert figures["by_side"]["28x28"] == dict(steps=10, eager_images_per_s=100.0, compiled_images_per_s=200.0)
    timed_order = [compiled for _, compiled in step.asked[2:]]  # after the two compiling steps: A B A B, B A B A
    assert timed_order == [False, True, False, True, True, False, True, False]


def test_the_measurement_times_the_runs_own_step_and_leaves_no_trace(in_process, monkeypatch):
    """--compile auto times train.train_step with the run's optimizer, GradScaler, clipping and non-finite check
    (not a plain SGD step); the steps (which move weights, BatchNorm statistics, momentum, the EMA, the RNG) are
    all undone: model, optimizer state, methods' state and RNG as before."""
    import copy

    import compile_choice
    import options
    train = in_process
    args = options.parse_args(TINY + ["--method", "ema", "--method", "mixup", "--clip-grad", "1", "--skip-nonfinite",
                                      "2", "--momentum", "0.9", "--compile", "auto", "--warmup-epochs", "0"])
    device = torch.device("cpu")
    setup, methods = options.resolve(args, 1, device)
    data, model, loader = train.build_run(args, setup, methods, device, 0, 1)
    plan = train.make_plan(args, setup, loader.steps_per_epoch)
    optimizer, _, scaler, autocast = train.build_training(model, args, setup, plan, methods, False, device)
    def state():
        return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), methods=methods.state_dict(),
                    rng=train.rng_state())
    before = copy.deepcopy(state())
    seen, real = [], train.train_step

    def spied(*a, **kw):
        seen.append((a[1], a[2], kw["clip_grad"], kw["check_finite"], a[7]))
        return real(*a, **kw)
    monkeypatch.setattr(train, "train_step", spied)

    def timed(step, batch, steps, device):
        step()
        step()
        return 100.0
    monkeypatch.setattr(compile_choice, "images_per_second", timed)
    figures, _ = compile_choice.measure_run(args, model, optimizer, scaler, methods, autocast, loader, plan, data,
                                            train.train_step, train.steps_undone)
    assert figures["measure_s"] > 0 and len(seen) == 1 + 2 * 2 * compile_choice.MEASURE_ROUNDS
    assert all(s[0] is optimizer and s[1] is scaler and s[2:] == (1.0, True, 1) for s in seen)
    assert same(state(), before) and not optimizer.state_dict()["state"]
    assert all(p.grad is None for p in model.parameters())


def same(a, b):
    """Nested dicts, lists and tensors equal, tensors to the bit."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.mark.parametrize("chosen", [True, False])
def test_auto_records_its_choice_and_the_run_trains_as_it_chose(in_process, tmp_path, monkeypatch, chosen):
    """config.json: compile the choice (as --compile on/off record it), compile_auto the figures; the run trains
    through the compiled model only where auto chose it (the measurement's own, not compiled again), and the
    measurement counts as start-up (startup_s) whichever way it chose, never as training time."""
    import compile_choice
    figures = dict(eager_images_per_s=100.0, compiled_images_per_s=150.0 if chosen else 100.0, compile_s=400.0,
                   measure_s=1000.0, chosen=chosen)
    real = compile_choice.measure
    monkeypatch.setattr(compile_choice, "measure", lambda *a: (figures, real(*a)[1]))
    timings(monkeypatch, 1.0, 1.0)
    run = str(tmp_path / "run")
    in_process.main(TINY + ["--run-dir", run, "--compile", "auto", "--cycles", "1", "--eval-every", "0"])
    cfg = config(run)
    assert (cfg["compile"], cfg["compile_auto"]) == (chosen, figures)
    assert cfg["compile_dynamic"] == (False if chosen else None)  # one image size: a static graph
    (wrapper,) = in_process.compiled_models  # the measurement's: one compilation
    training = [s for s in wrapper.shapes if s[1]]
    assert len(training) == (1 + 1 + 16 if chosen else 1)  # measured, then start-up's pass and 16 steps
    startup = float(rows(run)[-1]["startup_s"])
    assert startup >= 1000.0 and float(rows(run)[-1]["train_time_s"]) < 1000.0


@pytest.mark.parametrize("chosen", [True, False])
def test_a_resume_keeps_the_recorded_choice_and_measures_nothing(in_process, tmp_path, monkeypatch, capsys, chosen):
    """Recorded on stays on (compiled again, as recorded), recorded off stays off (nothing compiled), whatever a
    measurement would say now."""
    import compile_choice
    timings(monkeypatch, 100.0, 200.0 if chosen else 100.0)
    args = TINY + ["--cycles", "1", "--eval-every", "1"]
    ref = str(tmp_path / "ref")
    in_process.main(args + ["--run-dir", ref, "--compile", "auto"])
    recorded = config(ref)["compile_auto"]
    assert config(ref)["compile"] is chosen and recorded["chosen"] is chosen
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    os.remove(os.path.join(run, "done"))
    os.remove(os.path.join(run, "checkpoints", "last.pt"))  # back to the first row's checkpoint
    monkeypatch.setattr(compile_choice, "measure", lambda *a: pytest.fail("measured again on resume"))
    in_process.compiled_models.clear()
    in_process.main(args + ["--run-dir", run, "--compile", "auto", "--resume"])
    assert (config(run)["compile"], config(run)["compile_auto"]) == (chosen, recorded)
    assert len(in_process.compiled_models) == chosen and all(m.shapes for m in in_process.compiled_models)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731
    assert strip(rows(run)) == strip(rows(ref))
    with pytest.raises(SystemExit) as e:  # finished: asked again with auto, not redone (as --amp auto)
        in_process.main(args + ["--run-dir", run, "--compile", "auto", "--resume"])
    assert e.value.code == 0 and "already finished" in capsys.readouterr().out
    os.remove(os.path.join(run, "done"))
    with pytest.raises(SystemExit) as e:  # asked by name, the choice must match (as any result option)
        in_process.main(args + ["--run-dir", run, "--compile", "off" if chosen else "on", "--resume"])
    assert e.value.code == 2 and f"compile: {chosen} -> {not chosen}" in capsys.readouterr().err


def test_print_compile_measures_writes_nothing_and_a_sweep_passes_the_choice_to_every_run(in_process, tmp_path,
                                                                                          monkeypatch, capsys):
    """train.py --print-compile prints on or off (its last line, what launch.sh reads); launch.sh keeps a study's
    choice in OUT/compile and asks every run for it by name."""
    from test_launch import launch
    timings(monkeypatch, 100.0, 200.0)
    run = tmp_path / "never"
    in_process.main(TINY + ["--run-dir", str(run), "--compile", "auto", "--print-compile"])
    out = capsys.readouterr()
    assert out.out.splitlines()[-1] == "on" and "--compile auto: on" in out.err and not run.exists()
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "compile").write_text("off\n")  # a study's choice, measured by its first sweep
    lines = launch("--seeds", "0", "--cycles", "1", "--dry-run", "--", "--data", "synthetic", "--compile=auto",
                   out=sweep).stdout.splitlines()
    runs = [line for line in lines if "train.py" in line]
    assert runs and all(" --compile off" in line and " --compile auto" not in line for line in runs), runs
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("compile: auto\n")  # a recipe's auto: the same study-wide choice, asked by name
    lines = launch("--seeds", "0", "--cycles", "1", "--config", str(recipe), "--dry-run", "--", "--data", "synthetic",
                   out=sweep).stdout.splitlines()
    runs = [line for line in lines if "train.py" in line]
    assert runs and all(" --compile off" in line and " --compile auto" not in line for line in runs), runs


def test_print_compile_times_one_ranks_micro_batches_at_the_runs_precision_and_sizes(in_process, tmp_path, monkeypatch,
                                                                                      capsys):
    """--print-compile 2 (launch.sh: the runs' world size) with --grad-accum 2, bf16 and progressive resizing: the
    compiled step the measurement ran gave the model rank 0's micro-batches (32 / (2 x 2) = 8 images) under bf16
    autocast, resized by the method, at every size the run trains at; nothing written."""
    import costs
    from methods import MethodList, build
    timings(monkeypatch, 100.0, 200.0)
    run = tmp_path / "never"
    flags = TINY + ["--amp", "bf16", "--grad-accum", "2", "--method", "progressive_resizing", "--cycles", "1"]
    in_process.main(flags + ["--run-dir", str(run), "--compile", "auto", "--print-compile", "2"])
    assert capsys.readouterr().out.splitlines()[-1] == "on" and not run.exists()
    (wrapper,) = in_process.compiled_models
    assert {(shape[0], dtype) for shape, dtype in wrapper.batches} == {(8, torch.bfloat16)}
    args = in_process.parse_args(flags)
    plan = in_process.make_plan(args, in_process.resolve(args, 2, torch.device("cpu"))[0], 8)  # 256 / 32 a epoch
    sides = set(costs.step_sides(plan, MethodList([build("progressive_resizing")]), (32, 32), 8))
    assert len(sides) > 1 and {costs.side_name(shape[-2:]) for shape, _ in wrapper.batches} == sides
    assert len(wrapper.batches) == 2 * len(sides)  # each size's compiling step: its two micro-batches


@pytest.fixture
def fake_venv(tmp_path):
    """(environment, the --print-compile calls) for launch.sh: its VENV's python fakes train.py's runs (test_plans'
    FAKE_TRAIN) and its --print-compile (answers off for a set with --blurpool, else on; logs TRAIN_CONCURRENT_RUNS,
    OMP_NUM_THREADS and its arguments),
    the real python for the rest. No GPU, no OMP_NUM_THREADS of the suite's own."""
    import sys

    from conftest import ENV
    from test_plans import FAKE_TRAIN
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    asked = tmp_path / "asked"
    python = tmp_path / "venv" / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\ncase " $* " in\n'
                      f'  *" --print-compile "*) echo "$TRAIN_CONCURRENT_RUNS $OMP_NUM_THREADS $*" >> {asked}\n'
                      '    case " $* " in *" --blurpool "*) echo off;; *) echo on;; esac;;\n'
                      f'  *" --run-dir "*) exec {sys.executable} {tmp_path / "fake_train.py"} "$@";;\n'
                      f'  *) exec {sys.executable} "$@";;\nesac\n')
    python.chmod(0o755)
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    env.update(VENV=str(tmp_path / "venv"), FAKE_LOG=str(tmp_path / "log"), SKIP_SETUP="1")
    return env, lambda: asked.read_text().splitlines() if asked.exists() else []


SWEEP = ["--seeds", "0", "--methods", "baseline", "--cycles", "1", "--no-report", "--no-standard"]
AUTO = ["--", "--data", "synthetic", "--subset", "256", "--batch-size", "32", "--amp", "none", "--compile", "auto"]


def test_a_sweep_measures_compile_as_one_of_its_runs_and_keeps_the_device_it_measured_on(tmp_path, fake_venv):
    """--parallel 2: --print-compile runs with one slot's environment (2 runs at once, the cores // 2 threads) at the
    runs' world size, as the set's first run trains; OUT/SET/compile keeps the choice and the device (cpu: its name);
    every run gets --compile on. A choice stored from another kind of device (the set's, or a study-wide OUT/compile)
    is refused in one line, not applied, nothing measured."""
    import options
    from test_plans import launch as sh
    env, asked = fake_venv
    out = tmp_path / "study"
    sh("sweep", "--out", str(out), "--parallel", "2", *SWEEP, *AUTO, env=env)
    (call,) = asked()
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert call.startswith(f"2 {threads} train.py --schedule cyclic --cycles 1 --seed 0 ") and call.endswith(
        " --print-compile 1"), call
    stored = out / "baseline" / "compile"
    assert stored.read_text().splitlines() == ["on", f"cpu: {options.hardware_name(torch.device('cpu'))}"]
    starts = [json.loads(line) for line in open(tmp_path / "log") if '"start"' in line]
    assert starts and all(" ".join(e["args"]).count("--compile on") == 1 for e in starts)
    for path in (stored, out / "compile"):  # the set's, then a study-wide one over it
        path.write_text("on\ncuda: NVIDIA H100 80GB HBM3\n")
        p = sh("sweep", "--out", str(out), *SWEEP, *AUTO, env=env, check=False)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and f"{path} holds --compile auto's choice measured on cuda: " \
            "NVIDIA H100 80GB HBM3, not the device" in err[0], p.stderr
    assert len(asked()) == 1


def test_a_sweep_chooses_compile_per_method_set_as_its_first_run_trains_and_its_runs_share_it(tmp_path, fake_venv):
    """Two method sets, two seeds, cyclic and standard runs: --print-compile once per set, with the set's methods
    and its first run's schedule (the cyclic run of the first seed), each choice kept in OUT/SET/compile and given
    to every run of its set, cyclic and standard alike (the schedule comparison stays clean); a second sweep into
    the folder measures nothing."""
    from test_plans import launch as sh
    env, asked = fake_venv
    out = tmp_path / "study"
    sweep = ["sweep", "--out", str(out), "--seeds", "0 1", "--methods", "baseline,bp", "--cycles", "1",
             "--no-report", *AUTO]
    sh(*sweep, env=env)
    calls = asked()
    assert len(calls) == 2 and all(" --schedule cyclic --cycles 1 --seed 0 " in c for c in calls), calls
    assert [" --blurpool " in c for c in calls] == [False, True]
    assert [(out / s / "compile").read_text().split()[0] for s in ("baseline", "bp")] == ["on", "off"]
    runs = {}
    for line in open(tmp_path / "log"):
        if '"start"' in line:
            e = json.loads(line)
            runs[os.path.relpath(e["run"], out)] = " ".join(e["args"])
    assert len(runs) == 2 * 2 * 2, runs  # 2 sets x 2 seeds x (cyclic + standard)
    for run, args in runs.items():
        want = "off" if run.startswith("bp/") else "on"
        assert args.count(f"--compile {want}") == 1 and "--compile auto" not in args, (run, args)
    sh(*sweep, env=env)
    assert len(asked()) == 2


def test_compile_auto_is_refused_where_it_would_be_measured_on_the_wrong_machine(tmp_path, fake_venv):
    """A plan for GPU runs written on a machine without one, and a multi-node sweep whose every node would measure,
    are refused in one line with nothing written; a stored choice measured on a CPU is refused for a plan of GPU runs,
    one measured on a GPU is written into its lines."""
    from test_plans import launch as sh
    env, asked = fake_venv
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"

    def refused(told, *args):
        p = sh("sweep", "--out", str(out), *args, *SWEEP, *AUTO, env=env, check=False)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and told in err[0], p.stderr
    refused("--plan: --compile auto would be decided here, on a machine without a GPU, for runs on GPUs; pass -- "
            "--compile on|off explicitly, or write the plan on a GPU node", "--plan", str(plan), "--gpus", "1")
    refused("--nnodes 2: --compile auto would be measured on every node, which could choose differently",
            "--nnodes", "2", "--gpus", "1", "--rdzv-endpoint", "head:29400")
    assert not out.exists() and asked() == []
    out.mkdir()
    (out / "compile").write_text("on\ncpu: Some CPU\n")
    refused("measured on cpu: Some CPU, not the device the runs train on", "--plan", str(plan), "--gpus", "1")
    assert not plan.exists()
    (out / "compile").write_text("off\ncuda: Some GPU\n")
    sh("sweep", "--out", str(out), "--plan", str(plan), "--gpus", "1", *SWEEP, *AUTO, env=env)
    lines = [json.loads(line) for line in plan.read_text().splitlines() if not line.startswith("#")]
    assert lines and all(" ".join(r["argv"]).count("--compile off") == 1 for r in lines) and asked() == []


@pytest.mark.parametrize("flags,told", [(["--compile", "maybe"], "--compile: unknown 'maybe'; choose off, on or auto"),
                                        (["--compile", "auto"], "--compile auto measures in one process"),
                                        (["--compile", "auto", "--print-compile", "0"],
                                         "--print-compile takes the runs' world size (1, 2, ...), got 0")])
def test_bad_compile_options_are_one_line_and_write_nothing(in_process, tmp_path, monkeypatch, capsys, flags, told):
    monkeypatch.setenv("RANK", "0")  # under torchrun (2 ranks): refused before any process group or file
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        in_process.main(TINY + ["--run-dir", str(run)] + flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and told in err[0] and not run.exists()


def test_ranks_given_different_compile_choices_fail_in_one_line_before_training(tmp_path):
    """Under DDP every rank must compile alike (a multi-node sweep's nodes each pass their own --compile): rank 1
    given on, rank 0 off, is one line and exit status non-zero before any step; no config.json or metrics.csv."""
    import subprocess
    import sys

    from conftest import ENV, ROOT
    script = tmp_path / "ranks.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport train\n"
                      "train.main(sys.argv[1:] + ['--compile', 'on' if os.environ['RANK'] == '1' else 'off'])\n")
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)] + TINY + ["--run-dir", str(run)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    told = [line for line in p.stderr.splitlines() if line.startswith("train.py: error:")]
    assert p.returncode != 0 and len(told) == 1, p.stderr[-2000:]
    assert "--compile: the ranks of this torchrun job were given different choices" in told[0]
    assert not (run / "config.json").exists() and not (run / "metrics.csv").exists()


def test_every_image_size_is_compiled_in_the_start_up(in_process, tmp_path):
    """Progressive resizing under --compile: the start-up's passes meet every size the run trains at before the
    first timed step (so no compilation lands on train_time_s), each as a graph of its own (dynamic shapes give no
    fewer graphs on this torch: compile_choice.DYNAMIC_SIZES), recorded so; and on the input train_step gives the
    model, a chunk (a view) of the batch of --grad-accum 2 micro-batches, not a copy of one (a graph compiled on a
    view fails its guard on a whole tensor: that size would compile twice)."""
    import compile_choice
    assert compile_choice.DYNAMIC_SIZES is False
    run = str(tmp_path / "run")
    in_process.main(TINY + ["--run-dir", run, "--compile", "on", "--method", "progressive_resizing", "--cycles", "1",
                            "--eval-every", "0", "--grad-accum", "2"])
    (wrapper,) = in_process.compiled_models
    training = [(shape, given) for (shape, grad), given in zip(wrapper.shapes, wrapper.inputs) if grad]
    steps = training[-2 * 16:]  # the run's 16 steps of 2 micro-batches, after the start-up's passes
    assert len({shape for shape, _ in steps}) > 1
    assert {given for _, given in steps} <= {given for _, given in training[:-2 * 16]}, training
    assert wrapper.kwargs == {"dynamic": False} and config(run)["compile_dynamic"] is False


def test_a_resume_compiles_as_the_run_recorded_not_as_todays_default(in_process, tmp_path, monkeypatch):
    """compile_dynamic is the run's, as its checkpoint records it: a run recorded with dynamic shapes resumes with
    them after the default changed (compile_choice.DYNAMIC_SIZES), also where its config.json says otherwise (the
    checkpoint decides, as for every option it records); a checkpoint from before the checkpoint kept the key reads
    config.json's; a run from before the key (neither has it) resumes with torch's default (None), as it was
    compiled."""
    import compile_choice
    args = TINY + ["--compile", "on", "--method", "progressive_resizing", "--cycles", "1", "--eval-every", "1"]
    ref = str(tmp_path / "ref")
    monkeypatch.setattr(compile_choice, "DYNAMIC_SIZES", True)
    in_process.main(args + ["--run-dir", ref])
    assert config(ref)["compile_dynamic"] is True
    monkeypatch.setattr(compile_choice, "DYNAMIC_SIZES", False)
    for recorded, name, edit in ((True, "run", ()), (True, "stray", ("config.json",)), (True, "older", ("ckpt",)),
                                 (None, "old", ("config.json", "ckpt"))):
        run = str(tmp_path / name)
        shutil.copytree(ref, run)
        os.remove(os.path.join(run, "done"))
        os.remove(os.path.join(run, "checkpoints", "last.pt"))  # back to the first row's checkpoint
        prev = os.path.join(run, "checkpoints", "prev.pt")
        ckpt = torch.load(prev, weights_only=True)
        assert ckpt["config"]["compile_dynamic"] is True
        if "ckpt" in edit:  # a checkpoint written before it kept the key
            del ckpt["config"]["compile_dynamic"]
            torch.save(ckpt, prev)
        if "config.json" in edit:
            cfg = config(run)
            if "ckpt" in edit:
                del cfg["compile_dynamic"]
            else:  # a config.json that says otherwise than the checkpoint
                cfg["compile_dynamic"] = False
            with open(os.path.join(run, "config.json"), "w") as f:
                json.dump(cfg, f)
        in_process.compiled_models.clear()
        in_process.main(args + ["--run-dir", run, "--resume"])
        (wrapper,) = in_process.compiled_models
        assert wrapper.kwargs == {"dynamic": recorded} and config(run)["compile_dynamic"] is recorded, name
        assert torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)["config"][
            "compile_dynamic"] is recorded


def test_a_compiled_run_agrees_with_the_eager_run(tmp_path):
    """One real compilation (inductor, fp32) of the small ResNet: the same rows within 0.005 in the losses and 1
    point of accuracy (10 of 1,024 images). Not to the bit: inductor orders fp32 sums (BatchNorm's statistics, the
    convolutions' backward) otherwise, and 32 steps grow those differences to ~2e-4 in the losses and 2 images at lr
    0.02 (at lr 0.1 this tiny run's validation loss is chaotic: 42 vs 53 at one row); a compiled model in eval mode,
    or not updated, misses by far more."""
    args = TINY + ["--lr", "0.02"]
    run_train(args + ["--run-dir", str(tmp_path / "eager")])
    run_train(args + ["--run-dir", str(tmp_path / "compiled"), "--compile"], fresh=True)
    assert (config(tmp_path / "compiled")["compile"], config(tmp_path / "compiled")["compile_dynamic"]) == (True,
                                                                                                      False)
    eager, compiled = rows(tmp_path / "eager"), rows(tmp_path / "compiled")
    assert [r["step"] for r in eager] == [r["step"] for r in compiled] and len(eager) == 4
    for e, c in zip(eager, compiled):
        for key, tolerance in (("train_loss", 0.005), ("val_loss", 0.005), ("val_acc1", 1.0)):
            assert abs(float(e[key]) - float(c[key])) <= tolerance, (key, e, c)


def test_the_benchmarks_alternate_which_variant_runs_first_and_start_each_from_the_same_weights(in_process,
                                                                                                 monkeypatch, tmp_path):
    """benchmarks.throughput --compile both: round 0 times eager (a) (c) then compiled, round 1 compiled first (A B,
    B A); each timed measurement, (c) included, starts from the model's initial weights (the timer is stubbed and
    moves them, as the steps it times would). benchmarks.overheads alternates its candidates alike (A B, B A)."""
    from benchmarks import overheads, throughput
    order, made, models = [], [], []
    real_prepare, real_make = throughput.prepare, throughput.make_step

    def prepare(p, a):
        out = real_prepare(p, a)
        models.append((out[3], {k: v.clone() for k, v in out[3].state_dict().items()}))
        return out

    def make_step(*a, **kw):  # tagged in the order made: throughput eager then compiled, overheads its candidates
        step = real_make(*a, **kw)
        step.tag = len(made)
        made.append(step)
        return step

    def timed(step, it, n, warm_up=5):
        model, initial = models[-1]
        assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items()), step.tag
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        order.append(step.tag)
        return 100.0, 0.1

    def fake_main(argv):  # (b): the rows train.py would write
        run = argv[argv.index("--run-dir") + 1]
        os.makedirs(run)
        with open(os.path.join(run, "config.json"), "w") as f:
            json.dump({"model": "small_resnet"}, f)
        with open(os.path.join(run, "metrics.csv"), "w") as f:
            f.write("step,images_per_s,startup_s,train_flops\n2,100.0,1.0,1e9\n")
    for module in (throughput, overheads):
        for name, value in (("prepare", prepare), ("make_step", make_step), ("timed", timed)):
            monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(in_process, "main", fake_main)
    common = ["--steps", "2", "--batch-size", "32", "--rounds", "2", "--amp", "none"]
    throughput.main(common + ["--compile", "both", "--json", str(tmp_path / "t.json")])
    assert order == [0, 0, 1, 1, 1, 1, 0, 0]  # (a) and (c) of eager (0) and compiled (1): A B, then B A
    order.clear()
    made.clear()
    overheads.main(common)
    tags = list(range(len(made)))
    assert len(tags) >= 2 and order == tags + tags[::-1]


def test_calibrate_times_a_compiled_runs_steps_compiled_and_an_eager_runs_eager(in_process, tmp_path, monkeypatch):
    """benchmarks.calibrate prices a configuration as it trained: a --compile on run's steps go through the compiled
    model (its untimed first step and every timed one), at one image size as one static graph (as the run, or a run
    from before compile_dynamic, compiled it in its own process), at several sizes with the run's recorded
    compile_dynamic (dynamic shapes, the default until now), an eager run's through the plain model. Four
    configurations, three compiled, in one process: torch's recompile limit is raised for all their graphs and a
    fallback to eager past it made an error (by default torch would time them eager without a word)."""
    import compile_choice
    resized = ["on", "--method", "progressive_resizing"]
    for name, flags in (("eager", ["off"]), ("compiled", ["on"]), ("resized", resized)):
        in_process.main(TINY + ["--run-dir", str(tmp_path / name), "--compile", *flags, "--cycles", "1",
                                "--eval-every", "0"])
    shutil.copytree(tmp_path / "compiled", tmp_path / "old")
    cfg = config(tmp_path / "old")
    del cfg["compile_dynamic"]  # a run from before the key (and, to be a configuration of its own, clipped)
    with open(tmp_path / "old" / "config.json", "w") as f:
        json.dump(dict(cfg, clip_grad=1.0), f)
    cfg = config(tmp_path / "resized")  # progressive resizing compiled with dynamic shapes (the default until now)
    with open(tmp_path / "resized" / "config.json", "w") as f:
        json.dump(dict(cfg, compile_dynamic=True), f)
    in_process.compiled_models.clear()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # torch's defaults, whatever ran before
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False)
    from benchmarks import calibrate
    calibrate.main([str(tmp_path), "--device", "cpu", "--rounds", "1", "--steps", "2", "--warmup-steps", "0"])
    # one image size: one static graph each, as each run's own process compiled it; several: as the run recorded
    assert sorted(m.kwargs["dynamic"] for m in in_process.compiled_models) == [False, False, True]
    for m in in_process.compiled_models:  # at each size its first step and 2 timed ones
        assert sum(grad for _, grad in m.shapes) == (1 + 2) * len({s for s, _ in m.shapes}) > 0
    assert torch._dynamo.config.fail_on_recompile_limit_hit is True
    graphs = sum(len({s for s, _ in m.shapes}) for m in in_process.compiled_models)  # every configuration's sizes
    assert graphs > 3 and torch._dynamo.config.recompile_limit >= graphs + compile_choice.SPARE_GRAPHS
    with open(tmp_path / "calibration.json") as f:
        keys = [c["key"] for c in json.load(f)["configs"]]
    assert sorted((k["compile"], str(k["compile_dynamic"]), k["clip_grad"]) for k in keys) == [
        (False, "None", 0.0), (True, "None", 0.0), (True, "None", 1.0), (True, "True", 0.0)]


def test_each_variant_is_timed_for_a_minimum_wall_time_not_a_few_steps(monkeypatch):
    """compile_choice.images_per_second counts steps over at least MEASURE_S (1.5) seconds and MEASURE_STEPS steps,
    after its untimed one: 5 steps alone measured one configuration eager 116 vs compiled 254 img/s, then 1081 vs
    621 (seeds of one study chose differently). At 0.125 s a step: 12 timed steps; at 0.5 s: 5 (the steps bound)."""
    from types import SimpleNamespace

    import compile_choice
    assert (compile_choice.MEASURE_S, compile_choice.MEASURE_STEPS) == (1.5, 5)
    clock = SimpleNamespace(t=0.0)
    monkeypatch.setattr(compile_choice, "time", SimpleNamespace(perf_counter=lambda: clock.t))
    for seconds, timed_steps in ((0.125, 12), (0.5, 5)):
        calls = []

        def step():
            calls.append(1)
            clock.t += seconds
        rate = compile_choice.images_per_second(step, 8, compile_choice.MEASURE_STEPS, torch.device("cpu"))
        assert len(calls) == 1 + timed_steps and rate == pytest.approx(8 / seconds)


def test_seeds_that_differ_only_in_compile_are_kept_apart_with_a_line_naming_them(tmp_path, capsys):
    """Standalone --compile auto runs of one study can choose differently per seed; compile is result-defining
    (docs/run-format.md: compiled and eager runs agree to float tolerance only), so those seeds stay groups apart, and
    compare and report say so in one line naming the runs and the fix. Seeds that differ in another option too
    (another model) are another matter: no line."""
    from analysis import compare, report
    from test_analysis import seeded
    seeded(tmp_path / "a", [], [80, 85, 90], [79, 86, 89], 0, compile=True)
    seeded(tmp_path / "b", [], [82, 87, 92], [81, 88, 91], 1, compile=False)
    seeded(tmp_path / "c", [], [82, 87, 92], [81, 88, 91], 2, compile=True, model="vit_tiny")
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "differ only in compile" in line]
    assert len(lines) == 2, lines  # the cyclic curve's and the standard curve's
    cyclic = next(line for line in lines if "baseline cyclic:" in line)
    assert cyclic.startswith("warning: ") and "groups apart, not averaged" in cyclic
    assert "--compile on or off, or run them with launch.sh sweep" in cyclic
    assert f"compiled: {tmp_path / 'a' / 'cyc_base_s0'}; eager: {tmp_path / 'b' / 'cyc_base_s1'})" in cyclic
    assert str(tmp_path / "c") not in cyclic
    report.main([str(tmp_path), "--out", str(out), "--metric", "final"])
    assert (out / "report.md").read_text().count("differ only in compile") == 2


def test_a_compiled_run_at_one_image_size_shares_its_cost_key_with_runs_from_before_compile_dynamic(tmp_path):
    """costs.cost_key: compile_dynamic splits only runs compiled at several image sizes. A compiled run at one size
    records false (a static graph), one from before the key none: one static graph either way, one calibration
    entry (also one a calibration.json keyed false before this rule reads as); eager runs none; progressive
    resizing's recorded value kept (a graph per size, or dynamic shapes)."""
    import costs
    from analysis import axes
    base = dict(schedule="cyclic", compile=True, train_flops_per_image_by_side={"28x28": 1e6})
    key = costs.key_text(costs.cost_key(base))
    assert costs.key_text(costs.cost_key(dict(base, compile_dynamic=False))) == key
    assert costs.cost_key(dict(base, compile=False))["compile_dynamic"] is None
    sides = {"14x14": 1e5, "28x28": 1e6}
    for dynamic in (False, True):
        resized = dict(base, compile_dynamic=dynamic, train_flops_per_image_by_side=sides)
        assert costs.cost_key(resized)["compile_dynamic"] is dynamic
    side = dict(step_s=0.5, rounds=[0.5], train_flops_per_image=1e6)
    written = dict(costs.cost_key(base), compile_dynamic=False)  # calibrate's key for such a run until now
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(dict(format=axes.FORMAT, rounds=1, configs=[dict(key=written, sides={"28x28": side})])))
    assert list(axes.read_calibration(str(path)).entries) == [key]


GLOBAL_RNG = '''
import random

import numpy as np
import torch
from methods import Method


class GlobalJitter(Method):
    """Scales each micro-batch by draws of Python's, NumPy's and torch's global generators, as a user's augmentation
    may: the run's result and its RNG states depend on every draw before."""
    name = "global_jitter"

    def transform_batch(self, x, y, ctx):
        return x * (1 + 0.01 * (random.random() + float(np.random.rand()) + torch.rand(()).item())), y
'''


@pytest.mark.parametrize("chosen", [False, True])
def test_auto_trains_exactly_as_the_choice_given_by_name(in_process, tmp_path, tmp_path_factory, monkeypatch,
                                                         chosen):
    """At run level: --compile auto that chose off trains exactly as --compile off, and auto that chose on exactly as
    --compile on (the fake compile: the same arithmetic). The measurement really steps the run (each timing runs two
    steps of a plug-in drawing from Python's, NumPy's and torch's global RNG, SGD momentum, EMA); afterwards the same
    metrics.csv rows but their times, the same last.pt but times: weights, optimizer, scaler, methods' state and every
    rank's RNG states (a leak that the fresh run's torch.manual_seed would mask in torch's RNG shows in the others)."""
    import compile_choice
    plugin = tmp_path_factory.getbasetemp() / "global_jitter.py"  # one file per process: a method is registered once
    plugin.write_text(GLOBAL_RNG)
    calls = []

    def timed(step, batch, steps, device):  # rounds A B, B A: eager 100 img/s, compiled 200 (chosen) or 100
        step()
        step()
        n = len(calls)
        calls.append(n)
        compiled = n % 2 == (0 if n // 2 % 2 else 1)
        return 200.0 if compiled and chosen else 100.0
    monkeypatch.setattr(compile_choice, "images_per_second", timed)
    args = TINY + ["--cycles", "1", "--eval-every", "1", "--momentum", "0.9", "--plugins", str(plugin),
                   "--method", "global_jitter", "--method", "ema"]
    runs = {name: tmp_path / name for name in ("auto", "named")}
    in_process.main(args + ["--run-dir", str(runs["auto"]), "--compile", "auto"])
    in_process.main(args + ["--run-dir", str(runs["named"]), "--compile", "on" if chosen else "off"])
    assert calls and config(runs["auto"])["compile"] is chosen is config(runs["named"])["compile"]
    timing = ("_s", "images_per_s", "peak_mem_gb")
    untimed = [[{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows(run)] for run in runs.values()]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2
    ckpts = [torch.load(run / "checkpoints" / "last.pt", weights_only=True) for run in runs.values()]
    times = {"train_time_s", "curve_cost_s", "startup_s", "row_time"}
    assert ckpts[0].keys() == ckpts[1].keys() and "ranks" in ckpts[0]
    for key in set(ckpts[0]) - times:
        assert same(ckpts[0][key], ckpts[1][key]), key
    assert ckpts[0]["ranks"][0]["rng"]["python"] and same(ckpts[0]["ranks"], ckpts[1]["ranks"])


def test_print_compile_help_says_what_a_sweep_does_with_it():
    """--print-compile's help: launch.sh asks it once per method set and passes the answer to that set's runs (not
    'to all their runs', --print-amp's wording)."""
    import options
    (action,) = [a for a in options.build_parser()._actions if "--print-compile" in a.option_strings]
    assert "once per method set" in action.help and "all their runs" not in action.help
