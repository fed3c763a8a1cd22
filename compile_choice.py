"""--compile off|on|auto for train.py: what auto measures and picks, how the model is compiled, what is recorded.

auto works as --amp auto does on a CPU: once per run, on the run's model, precision and first batch, it times a few
eager and compiled training steps (interleaved, the better of two rounds each: this VM's speed drifts) and compiles
only where the compiled steps train at least MARGIN x faster in steady state. The compilation is start-up: it is
timed apart (compile_s, recorded with both figures in config.json's compile_auto) and added to startup_s, never to
train_time_s. A resume keeps the choice the run recorded and measures nothing. Under torchrun auto is refused (ranks
could pick differently); launch.sh sweep asks train.py --print-compile once per study and passes on or off."""
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from methods import weights_kept
from options import micro_batch_size

MARGIN = 1.1  # compile only where the compiled steps train at least this much faster: near a tie, eager
# Several image sizes (progressive resizing): one graph with dynamic shapes (True), or one static graph per size
# (False: more compilations, each size's own kernels). Either way train.py compiles every size during its start-up.
DYNAMIC_SIZES = True
MEASURE_STEPS, MEASURE_ROUNDS = 5, 2


def dynamic(compiled, methods):
    """config.json's compile_dynamic: whether the compiled model takes its image sizes with dynamic shapes (null:
    not compiled)."""
    return (bool(methods.resizes) and DYNAMIC_SIZES) if compiled else None


def compile_model(model, methods):
    """torch.compile for a run whose methods may train at several image sizes (one graph, or one per size)."""
    if methods.resizes and not DYNAMIC_SIZES:  # one graph per size: torch falls back to eager past its limit (8)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model, dynamic=dynamic(True, methods))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, batch, steps, device):
    """Images per second of `step` over `steps` calls, after one untimed call (a GPU waited for)."""
    step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - started)


def measure(model, loader, methods, args, amp):
    """({eager_images_per_s, compiled_images_per_s, compile_s, chosen}, the compiled model): plain training steps
    (cross-entropy, SGD at lr 0, no methods' hooks: as --amp auto times) on the run's first micro-batch in the
    layout of training, at the run's precision. Leaves no trace in the weights, BatchNorm statistics and RNG."""
    x, y = next(loader.epoch(0, 0))
    micro = micro_batch_size(args, 1)
    x, y = methods.transform_eval_batch(x[:micro]), y[:micro]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    compiled = compile_model(model, methods)

    def step(m):
        with autocast:
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rates = {"eager": [], "compiled": []}
    with weights_kept(model), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        model.train()
        started = time.perf_counter()
        step(compiled)  # the compilation, and one step
        sync(x.device)
        first = time.perf_counter() - started
        for _ in range(MEASURE_ROUNDS):
            for name, m in (("eager", model), ("compiled", compiled)):
                rates[name].append(images_per_second(lambda: step(m), len(x), MEASURE_STEPS, x.device))
    eager, fast = max(rates["eager"]), max(rates["compiled"])
    return dict(eager_images_per_s=eager, compiled_images_per_s=fast, compile_s=max(first - len(x) / fast, 0.0),
                chosen=fast / eager >= MARGIN), compiled


def choose(args, setup, ckpt, recorded, model, loader, methods, out=None):
    """(setup with --compile resolved, config.json's compile_auto, the model the measurement compiled where auto
    chose to compile, else None). A resume keeps what the run recorded (auto: its choice), measuring nothing; a
    fresh run under auto measures (printing the figures to `out`)."""
    if ckpt is not None:
        if args.compile == "auto":
            setup = replace(setup, compile=bool(ckpt["config"].get("compile")))
        return setup, recorded.get("compile_auto"), None
    if args.compile != "auto":
        return setup, None, None
    figures, compiled = measure(model, loader, methods, args, setup.amp)
    if out is not None:
        print(f"--compile auto: {'on' if figures['chosen'] else 'off'} (eager {figures['eager_images_per_s']:.0f}, "
              f"compiled {figures['compiled_images_per_s']:.0f} img/s over a few training steps of this model; "
              f"compiling took {figures['compile_s']:.1f} s of start-up)", file=out)
    if not figures["chosen"]:
        torch._dynamo.reset()  # the measurement's graphs: not used
    return replace(setup, compile=figures["chosen"]), figures, compiled if figures["chosen"] else None


def printed(args, setup, model, loader, methods):
    """train.py --print-compile: 'on' or 'off', what --compile would do here (auto: measured, the figures on
    stderr)."""
    return "on" if choose(args, setup, None, {}, model, loader, methods, sys.stderr)[0].compile else "off"
