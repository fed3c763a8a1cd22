"""--compile off|on|auto for train.py: what auto measures and picks, how the model is compiled, what is recorded.

auto works as --amp auto does on a CPU: once per run, on the run's model, precision and first batch, it times some
of the run's own optimizer steps (train.py's train_step: its optimizer, GradScaler, clipping and methods' hooks, its
--grad-accum micro-batches of one rank's share of the batch) eager and compiled, interleaved, each for at least
MEASURE_S seconds, the better of two rounds each (this VM's speed drifts; odd rounds compiled first), and compiles
only where the compiled steps train at least MARGIN x faster in steady state. A run that trains at several image
sizes (progressive resizing) is timed at every size it trains at, each size weighted by the run's steps there. The
measurement is start-up, all of it: its seconds (measure_s) go to startup_s, never to train_time_s, whichever way it
chose; the compilation in it is timed apart (compile_s). Both figures, the choice and those seconds are recorded in
config.json's compile_auto. A resume keeps the choice the run recorded and measures nothing. Under torchrun auto is
refused (ranks could pick differently); launch.sh sweep asks train.py --print-compile WORLD_SIZE once per method set
(as the set's first run trains) and passes on or off to the set's runs."""
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

import costs
from flops import side_contexts
from options import fail

MARGIN = 1.1  # compile only where the compiled steps train at least this much faster: near a tie, eager
# A fresh run's graphs for several image sizes (progressive resizing): one with dynamic shapes (True) or one static
# graph per size (False). Recorded as compile_dynamic: a resume and benchmarks.calibrate compile as the run recorded.
# Per size: on torch 2.14 dynamic shapes give no fewer graphs. Inductor's backward compile pins the image size
# (guard Eq(s**2, 256) at 16 px), so every other size compiles a graph of its own all the same, each slower to
# compile than a static one (small_resnet, 16 then 20 px: two graphs either way).
DYNAMIC_SIZES = False
# each variant's timing in each round: at least MEASURE_STEPS steps and MEASURE_S seconds (5 steps alone measured
# one configuration 116 vs 254 img/s, then 1081 vs 621: a choice that flipped between seeds of one study)
MEASURE_STEPS, MEASURE_S, MEASURE_ROUNDS = 5, 1.5, 2
SPARE_GRAPHS = 8  # torch's own recompile_limit: room for guards beyond the graphs a process expects


def dynamic(compiled, methods):
    """A fresh run's compile_dynamic: whether the compiled model takes its image sizes with dynamic shapes (null: not
    compiled)."""
    return (bool(methods.resizes) and DYNAMIC_SIZES) if compiled else None


def expect_graphs(graphs):
    """Dynamo compiles a function's code again for each new guard failure up to recompile_limit (8) times, then runs
    it eager without a word: a 'compiled' run or timing would be silently eager. Room for the `graphs` this process
    expects (image sizes, calibrate's configurations) and a spare, and a fallback past it an error."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, graphs + SPARE_GRAPHS)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, graphs + SPARE_GRAPHS)
    config.fail_on_recompile_limit_hit = True


def compile_model(model, dynamic, graphs=1):
    """torch.compile of a run's model with its compile_dynamic (True: one graph for all image sizes, False: one per
    size, None: torch's default, as runs before the key were compiled); `graphs`: the image sizes it trains at."""
    expect_graphs(graphs)
    return torch.compile(model, dynamic=dynamic)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, batch, steps, device):
    """Images per second of `step` over at least `steps` calls and MEASURE_S seconds, after one untimed call (a GPU
    waited for). The clock is read between calls without waiting for the GPU (which a sync per step would slow):
    it runs a queue ahead at most, and the last sync closes the count."""
    step()
    sync(device)
    started, calls = time.perf_counter(), 0
    while calls < steps or time.perf_counter() - started < MEASURE_S:
        step()
        calls += 1
    sync(device)
    return calls * batch / (time.perf_counter() - started)


def measure(model, step, sides, batch, dynamic, kept):
    """({eager_images_per_s, compiled_images_per_s, compile_s, measure_s, chosen[, by_side]}, the compiled model).
    step(m, ctx): one of the run's optimizer steps through m (the model, or it compiled) at the Context ctx, on
    `batch` images; sides: {size name: (the Context of a step at that size, the run's steps at that size)}; kept():
    a context that puts back everything the steps change (train.py: weights, BatchNorm statistics, optimizer state,
    GradScaler, the methods' state, RNG). The figures are images/s over the run's steps, each size weighted by its
    steps (by_side: each size's, where there are several); compile_s the first compiled step at each size beyond a
    steady one; measure_s all of it, the start-up it costs."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    compiled = compile_model(model, dynamic, graphs=len(sides))
    first, rates = {}, {side: {"eager": [], "compiled": []} for side in sides}
    with kept():
        for side, (ctx, _) in sides.items():  # each size's compilation, and one step
            t = time.perf_counter()
            step(compiled, ctx)
            sync(device)
            first[side] = time.perf_counter() - t
        for r in range(MEASURE_ROUNDS):  # interleaved, A B then B A: neither always runs after the other
            for side, (ctx, _) in sides.items():
                for name in ("eager", "compiled")[::1 if r % 2 == 0 else -1]:
                    m = model if name == "eager" else compiled
                    rates[side][name].append(images_per_second(lambda: step(m, ctx), batch, MEASURE_STEPS, device))
    best = {side: {name: max(r) for name, r in by.items()} for side, by in rates.items()}
    steps = {side: max(n, 1) for side, (_, n) in sides.items()}

    def rate(name):  # images over seconds, summed over the run's steps at each size
        return sum(steps.values()) / sum(n / best[side][name] for side, n in steps.items())
    eager, fast = rate("eager"), rate("compiled")
    figures = dict(eager_images_per_s=eager, compiled_images_per_s=fast,
                   compile_s=sum(max(first[s] - batch / best[s]["compiled"], 0.0) for s in sides),
                   measure_s=time.perf_counter() - started, chosen=fast / eager >= MARGIN)
    if len(sides) > 1:
        figures["by_side"] = {s: dict(steps=n, eager_images_per_s=best[s]["eager"],
                                      compiled_images_per_s=best[s]["compiled"]) for s, (_, n) in sides.items()}
    return figures, compiled


def measure_run(args, model, optimizer, scaler, methods, autocast, loader, plan, data, train_step, undone):
    """--compile auto's measurement (measure) on the run's own optimizer step: train_step (train.py's) with its
    optimizer, GradScaler, clipping and methods' hooks, over --grad-accum micro-batches of the first batch of this
    rank's loader (--print-compile: rank 0 of the runs' world size), at every image size the run trains at, each
    with the run's steps there; every step undone after (undone: train.steps_undone)."""
    x, y = next(loader.epoch(0, 0))
    spe, size = loader.steps_per_epoch, (data.image_size, data.image_size)
    sides = costs.step_sides(plan, methods, size, spe)
    counts = costs.StepCounts(plan, sides, costs.side_name(size)).run(plan.run_steps)

    def step(m, ctx):  # a fresh copy of the batch each step: a method may transform it in place
        train_step(m, optimizer, scaler, methods, autocast, x.clone(), y.clone(), args.grad_accum, False, ctx,
                   check_finite=args.skip_nonfinite > 0, clip_grad=args.clip_grad, raw_model=model)
    return measure(model, step, {side: (ctx, counts.get(side, 0)) for side, ctx in
                                 side_contexts(plan, sides, spe, data).items()},
                   len(x), dynamic(True, methods), lambda: undone(model, optimizer, scaler, methods))


def same_on_every_rank(compiled, device):
    """Under DDP: fail in one line where the ranks of this job were asked to compile differently (each node of a
    multi-node sweep passes its own --compile)."""
    flags = torch.tensor([int(compiled), -int(compiled)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # (min, -max) over the ranks
    if flags[0].item() != -flags[1].item():
        fail("--compile: the ranks of this torchrun job were given different choices (on and off: each node of a "
             "multi-node sweep resolved --compile auto itself); pass --compile on or off, the same on every node",
             options=True)


def choose(args, setup, ckpt, recorded, measured, out=None):
    """(setup with --compile resolved, config.json's compile_auto, the model the measurement compiled where auto
    chose to compile, else None). A resume keeps what the run recorded (auto: its choice), measuring nothing; a
    fresh run under auto calls measured() (measure_run: measure on the run's own step),
    printing the figures to `out`."""
    if ckpt is not None:
        if args.compile == "auto":
            setup = replace(setup, compile=bool(ckpt["config"].get("compile")))
        return setup, recorded.get("compile_auto"), None
    if args.compile != "auto":
        return setup, None, None
    figures, compiled = measured()
    if out is not None:
        print(f"--compile auto: {'on' if figures['chosen'] else 'off'} (eager {figures['eager_images_per_s']:.0f}, "
              f"compiled {figures['compiled_images_per_s']:.0f} img/s over a few training steps of this run; "
              f"compiling took {figures['compile_s']:.1f} s, measuring {figures['measure_s']:.1f} s of start-up)",
              file=out)
    if not figures["chosen"]:
        torch._dynamo.reset()  # the measurement's graphs: not used
    return replace(setup, compile=figures["chosen"]), figures, compiled if figures["chosen"] else None


def printed(args, setup, measured):
    """train.py --print-compile: 'on' or 'off', what --compile would do here (auto: measured, the figures on
    stderr)."""
    return "on" if choose(args, setup, None, {}, measured, sys.stderr)[0].compile else "off"
