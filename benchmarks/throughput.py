"""Training throughput: our loop against the model's compute limit and a conventional pipeline.

    python -m benchmarks.throughput [--batch-size 256] [--channels-last] [--amp auto] [--steps 60] [--rounds 5]
                                    [--compile off|on|both] [--compile-sizes dynamic|per-size] [--clip-grad N]
                                    [--json FILE]
                                    [--data-dir FASHION_MNIST_DIR] [--model NAME --model-kwargs K=V,...] [--opt adamw]
                                    [--method SPEC ... --plugins FILE.py]   # e.g. --method sam, progressive_resizing

In one process, on the same device (the GPU where there is one), with the same model, batch, precision and memory
format:
  (a) compute limit: forward + backward + optimizer step on one fixed resident batch of real images;
  (b) train.py's own loop on Fashion-MNIST (resident data, batched augmentation, logging), read
      from the images_per_s of its metrics.csv;
  (c) a conventional pipeline: torchvision's FashionMNIST with per-sample RandomCrop / Flip /
      ToTensor / Normalize through a DataLoader, feeding the same training step.
The three are interleaved, (a) (b) (c) (a) (b) (c) ..., over --rounds rounds, so that a machine whose speed drifts
slows all three alike; each figure is the median over rounds with a distribution-free interval (analysis.stats.
median_ci), and b/a, b/c are taken round by round (paired) before their median. Prints images/s, b/a and b/c, and
achieved model FLOP/s for (a) and (b) (train.py's count of the FLOPs of a training image: its config.json). Methods
(train.py's --method and its aliases) run in all three; a duration-dependent one (progressive resizing) sweeps its
whole budget over the timed steps of (a) and (c), and over the one-epoch run of (b), so each figure is its average
over a budget.

--compile both measures each of (a) (b) (c) eager and compiled (train.py's compile_choice.compile_model; (b):
train.py --compile on) in the same rounds, eager (a) (b) (c) then compiled (a) (b) (c) in even rounds and compiled
first in odd ones (A B, B A: neither always follows the other), and gives compiled/eager round by round; --compile
on only the compiled ones. (a) and (c) start each round from the same weights: no variant trains the other's.
Compilation is never in images/s: it happens in (a)'s untimed warm-up steps (all the budget's image sizes where a
method resizes) and in (b)'s start-up, and is reported apart as start_s: (a)'s first-round warm-up seconds beyond
its steady-state step time (the compile time), and (b)'s startup_s (in this one process (b)'s models reuse the code
compiled for (a) where their graphs are the same). What each measurement ran (`ran`) is watched in the eager ones
only (a forward hook would change the compiled graph).
"""
import argparse
import contextlib
import csv
import gzip
import json
import os
import shutil
import tempfile
import time
import types

import torch

import compile_choice
import methods as method_registry
import optim
import options
import precision
import train
from analysis.stats import median_ci
from data import FASHION_MNIST_SYSTEM_DIR, STATS, build_data
from methods import Context, weights_kept
from models import build_model, parse_model_kwargs


def make_step(model, methods, amp, device, optimizer_flags, steps, call=None, clip_grad=0.0):
    """One training step of train.py (its optimizer from train.py's own flags: --opt, --lr, --weight-decay), with
    the methods' hooks, through `call` (the model compiled) where given; the budget's progress goes round once every
    `steps` calls."""
    flags = options.parse_args(optimizer_flags)
    opt = methods.wrap_optimizer(optim.build_optimizer(model, flags, None, None, optim.decay_exclusions(flags, model)),
                                 model)
    scaler, autocast = precision.amp_context(amp, device)
    calls = iter(range(10 ** 12))

    def step(x, y):
        i = next(calls)
        ctx = Context(step=i, epoch=0.0, rank=0, world_size=1, seed=0, run_progress=(i % steps) / steps,
                      cycle_progress=(i % steps) / steps, num_classes=10)
        return train.train_step(model if call is None else call, opt, scaler, methods, autocast, x, y, 1, False, ctx,
                                clip_grad=clip_grad, raw_model=model)
    step.optimizer = opt  # (benchmarks.overheads switches its implementation)
    return step


class Watch(contextlib.AbstractContextManager):
    """What a measurement really ran, read from its training forward passes: the batch size and image shape the
    model is given, the dtype its convolutions compute in, and the memory format of the input of the first
    convolution with several input channels (a one-channel image looks contiguous in both formats). Its global hook
    stays through the timed steps (tens of microseconds a step; compiled variants run without it)."""

    def __enter__(self):
        self.seen = {}

        def hook(module, inputs, output):
            if not module.training or not torch.is_grad_enabled():  # train.py's start-up check of the model: no grad
                return
            x = inputs[0] if inputs and torch.is_tensor(inputs[0]) else None
            if x is not None and x.dim() == 4 and "batch_size" not in self.seen:  # the outermost module: the model
                self.seen.update(batch_size=x.shape[0], shape=list(x.shape[1:]), device=x.device.type)
            if isinstance(module, torch.nn.Conv2d) and module.in_channels > 1 and "amp" not in self.seen:
                self.seen.update(amp={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(output.dtype, "none"),
                                 channels_last=x.is_contiguous(memory_format=torch.channels_last)
                                 and not x.is_contiguous())
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def timed(step, it, n, warm_up=5):
    """(images/s over n steps after `warm_up` untimed ones, the seconds of those); `it` yields (x, y)."""
    loss, started = None, time.perf_counter()
    for _ in range(warm_up):
        loss = step(*next(it))
    if loss is not None:
        loss.item()  # warm-up finished before the clock starts
    t, images = time.perf_counter(), 0
    for _ in range(n):
        x, y = next(it)
        loss = step(x, y)  # not read per step: train.py's loop does not wait for the GPU either
        images += len(x)
    loss.item()  # the last step finished: so did every step before it
    return images / (time.perf_counter() - t), t - started


def watched(variant):
    """Watch() for an eager measurement; for a compiled one nothing (a global forward hook changes its graph)."""
    return Watch() if variant == "eager" else contextlib.nullcontext(types.SimpleNamespace(seen=None))


def torchvision_root(tmp, data_dir):
    """torchvision's FashionMNIST layout (raw, uncompressed IDX files) from --data-dir or the Debian package."""
    src = data_dir or FASHION_MNIST_SYSTEM_DIR
    raw = os.path.join(tmp, "FashionMNIST", "raw")
    os.makedirs(raw)
    for name in os.listdir(src):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(os.path.join(src, name), "rb") as f, open(os.path.join(raw, name.removesuffix(".gz")), "wb") as out:
            shutil.copyfileobj(f, out)
    return tmp


def summary(values):
    """{median, lo, hi, coverage, rounds} of one figure's rounds (analysis.stats.median_ci)."""
    median, lo, hi, coverage = median_ci(values)
    return dict(median=median, lo=lo, hi=hi, coverage=coverage, rounds=list(values))


def ci_text(s, spec=".0f"):
    return f"{s['median']:{spec}}" + ("" if s["lo"] is None else f" [{s['lo']:{spec}}, {s['hi']:{spec}}]")


def parser(description):
    """The options of this benchmark and benchmarks.overheads: model, optimizer, precision, methods, rounds."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--model", default="small_resnet")
    p.add_argument("--model-kwargs", default="", help="as train.py's, e.g. img_size=28,patch_size=4,depth=6 for a ViT")
    p.add_argument("--opt", default="sgdw", help="as train.py's: sgdw | adamw | lamb | lion")
    p.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"))
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST's IDX files (default: Debian's package)")
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps of each measurement in each round")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the measurements, interleaved")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--clip-grad", type=float, default=0.0, help="as train.py's (the ViT recipe clips at 1)")
    method_registry.add_flags(p)  # train.py's --method, --plugins and the aliases (--channels-last, ...)
    return p


def prepare(p, a):
    """(methods, device, precision, model, train.py's optimizer flags, one fixed batch (x, y)) of the options."""
    if a.rounds < 1 or a.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    methods, _ = method_registry.selected(a)
    # all measurements on the device train.py would use: the GPU where there is one
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        train.configure_device(device)
    amp = a.amp
    if amp == "auto":
        amp = precision.auto_precision(device)
    if amp == "fp16" and device.type == "cpu":
        p.error("--amp fp16 needs a CUDA device")
    torch.manual_seed(0)
    model = build_model(a.model, 10, 1, {**parse_model_kwargs(a.model_kwargs), **methods.model_kwargs()}).to(device)
    model = methods.apply_model(model)
    # the optimizer as train.py builds it; a small LR (AdamW, Lion: 1e-3) so that no run diverges mid-measurement
    optimizer_flags = ["--opt", a.opt, "--lr", "0.01" if a.opt == "sgdw" else "1e-3", "--weight-decay", "5e-5"]
    # one fixed batch of real, augmented images: on this CPU the same step runs about 1.4x faster
    # on Fashion-MNIST than on randn inputs, so a random batch would understate the limit
    x, y = next(build_data("fashion-mnist", a.data_dir, device, subset=a.batch_size)
                .train_loader(a.batch_size, 0, 1, 0).epoch(0))
    return methods, device, amp, model, optimizer_flags, x, y


def main(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for (c)")
    p.add_argument("--compile", default="off", choices=("off", "on", "both"),
                   help="eager, compiled, or both in the same rounds (compiled/eager paired by round)")
    p.add_argument("--compile-sizes", choices=("dynamic", "per-size"), default=None,
                   help="where a method resizes: dynamic shapes or a static graph per size (default: train.py's, "
                        "compile_choice.DYNAMIC_SIZES: per size; on torch 2.14 dynamic also compiles a graph per "
                        "size, its backward pins the size)")
    a = p.parse_args(argv)
    methods, device, amp, model, optimizer_flags, x, y = prepare(p, a)  # (a)'s batch
    if a.compile_sizes:  # train.py's choice for this process: (a) and (c) here, and (b)'s train.main
        compile_choice.DYNAMIC_SIZES = a.compile_sizes == "dynamic"
    variants = {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[a.compile]
    # the graphs this process may compile: (a) and (c)'s, and (b)'s model in each round, each one per image size at
    # most (a resizing method's sizes: fewer than the steps of a budget)
    compile_choice.expect_graphs((a.rounds + 1) * (a.steps if methods.resizes else 1))
    steps = {v: make_step(model, methods, amp, device, optimizer_flags, a.steps, clip_grad=a.clip_grad,
                          call=compile_choice.compile_model(model, compile_choice.dynamic(True, methods))
                          if v == "compiled" else None)
             for v in variants}
    # (b) train.py's loop, end to end, on as many images as the timed steps need
    args = ["--data", "fashion-mnist", "--subset", str(a.batch_size * (a.steps + 5)), "--batch-size",
            str(a.batch_size), "--schedule", "standard", "--epochs", "1", "--warmup-epochs", "0.1", "--amp", amp,
            "--model", a.model, "--model-kwargs", a.model_kwargs, "--no-progress", "--clip-grad", str(a.clip_grad)
            ] + optimizer_flags + [
            f"--method={spec}" for spec in methods.specs] + [f"--plugins={f}" for f in a.plugin_files] + (
            ["--data-dir", a.data_dir] if a.data_dir else [])
    # (c) torchvision dataset + per-sample transforms + DataLoader, one iterator over every round
    with tempfile.TemporaryDirectory() as tmp_c:
        c_batches, c_steps = conventional_batches(a, device, tmp_c)
        figures, seen, last, b_cfg = interleaved_rounds(a, variants, methods, model, steps, (x, y), args, c_batches,
                                                        c_steps)
    # train.py's own count: the FLOPs of its training images, averaged over the run (progressive resizing's sizes)
    flops = float(last["train_flops"]) / (int(last["step"]) * a.batch_size)
    out = summarised(a, figures, seen, b_cfg["model"], flops, variants, methods, amp, device)
    report(a, out, figures, variants, methods, amp, device, flops)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


def conventional_batches(a, device, tmp):
    """(c)'s batches on the device, endless (epochs as long as the rounds need), and its timed steps per round:
    torchvision's FashionMNIST (its files copied under `tmp`) with per-sample transforms through a DataLoader."""
    import torchvision.transforms as T
    from torchvision.datasets import FashionMNIST
    mean, std = STATS["fashion-mnist"]
    ds = FashionMNIST(torchvision_root(tmp, a.data_dir), train=True, transform=T.Compose([
        T.RandomCrop(28, padding=2), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=a.workers,
                                         drop_last=True, persistent_workers=a.workers > 0,
                                         pin_memory=device.type == "cuda")

    def on_device():
        while True:  # epochs, as long as the rounds need
            for xb, yb in loader:
                yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    return on_device(), min(a.steps, len(loader) - 5)


def interleaved_rounds(a, variants, methods, model, steps, batch, args, c_batches, c_steps):
    """({variant: {a, b, c, a_start_s, b_start_s: each round's}}, what each part ran in the first round, (b)'s last
    metrics row and its config.json): each variant's (a), (b), (c) in turn, --rounds times."""
    figures = {v: {"a": [], "b": [], "c": [], "a_start_s": [], "b_start_s": []} for v in variants}
    seen = {}
    for r in range(a.rounds):  # interleaved: a drifting machine slows each round's measurements alike
        for v in variants[::1 if r % 2 == 0 else -1]:  # A B, B A, ...
            # the first compiled round's warm-up runs the whole budget: every image size compiled before the clock
            warm = a.steps if v == "compiled" and r == 0 and methods.resizes else 5
            with watched(v) as ran_a, weights_kept(model):  # each round from the same weights: no batch overfitted
                rate, warm_s = timed(steps[v], iter(lambda: batch, None), a.steps, warm)
            figures[v]["a"].append(rate)
            figures[v]["a_start_s"].append(max(warm_s - warm * a.batch_size / rate, 0.0))  # beyond steady steps
            with tempfile.TemporaryDirectory() as tmp:
                with contextlib.redirect_stdout(open(os.devnull, "w")), watched(v) as ran_b:
                    train.main(args + ["--compile", "on" if v == "compiled" else "off", "--run-dir",
                                       os.path.join(tmp, "run")])
                with open(os.path.join(tmp, "run", "metrics.csv")) as f:
                    last = list(csv.DictReader(f))[-1]
                with open(os.path.join(tmp, "run", "config.json")) as f:
                    b_cfg = json.load(f)
            figures[v]["b"].append(float(last["images_per_s"]))
            figures[v]["b_start_s"].append(float(last["startup_s"]))
            with watched(v) as ran_c, weights_kept(model):
                figures[v]["c"].append(timed(steps[v], c_batches, c_steps, warm_up=5 if r == 0 else 1)[0])
            for part, watch in (("a", ran_a), ("b", ran_b), ("c", ran_c)):
                seen.setdefault(v, {}).setdefault(part, watch.seen)  # the first round's
    return figures, seen, last, b_cfg


def variant_results(a, fig, seen, b_model, flops, compiled):
    """One variant's figures: medians with intervals, b/a and b/c per round, FLOP/s, what each part ran."""
    # what each measurement really ran (seen in its forward passes, not the options asked for), so that a reader and
    # the tests can check that they are comparable (eager only: None where compiled)
    ran = None if compiled else dict(a=dict(seen["a"], model=a.model), b=dict(seen["b"], model=b_model),
                                     c=dict(seen["c"], model=a.model))
    rounds = {k: summary(fig[k]) for k in ("a", "b", "c", "a_start_s", "b_start_s")}
    ratios = {k: summary([b / o for b, o in zip(fig["b"], fig[o])]) for k, o in (("b_over_a", "a"), ("b_over_c", "c"))}
    a_img_s, b_img_s, c_img_s = (rounds[k]["median"] for k in "abc")
    return dict(a_img_s=a_img_s, b_img_s=b_img_s, c_img_s=c_img_s, b_over_a=ratios["b_over_a"]["median"],
                b_over_c=ratios["b_over_c"]["median"], a_start_s=fig["a_start_s"][0],
                b_start_s=fig["b_start_s"][0], figures=dict(rounds, **ratios), flops_per_image=flops,
                a_flop_s=a_img_s * flops, b_flop_s=b_img_s * flops, ran=ran)


def summarised(a, figures, seen, b_model, flops, variants, methods, amp, device):
    """--json's object: the first variant's results at the top, every variant's under `variants`, compiled/eager
    round by round where both ran, and the options and machine."""
    results = {v: variant_results(a, figures[v], seen[v], b_model, flops, v == "compiled") for v in variants}
    out = dict(results[variants[0]], rounds=a.rounds, steps=a.steps,
               ci_method="median over rounds, distribution-free interval between order statistics (analysis.stats."
               "median_ci); b/a, b/c and compiled/eager per round", batch_size=a.batch_size,
               model=a.model, model_kwargs=a.model_kwargs, opt=a.opt, amp=amp, methods=methods.specs,
               channels_last="channels_last" in methods.specs, clip_grad=a.clip_grad, compile=a.compile,
               compile_dynamic=compile_choice.dynamic(True, methods) if "compiled" in variants else None,
               threads=torch.get_num_threads(), device=options.hardware_name(device), device_type=device.type,
               dataloader_workers=a.workers, variants=results)
    if a.compile == "both":  # compiled/eager, round by round (the same rounds: the same drift)
        out["compiled_over_eager"] = {k: summary([c / e for c, e in zip(figures["compiled"][k], figures["eager"][k])])
                                      for k in "abc"}
    return out


def report(a, out, figures, variants, methods, amp, device, flops):
    """Print the figures: medians over rounds with intervals, b/a, b/c (and compiled/eager) per variant."""
    print(f"{options.hardware_name(device)} ({device.type}): model {a.model}, batch {a.batch_size}, amp {amp}, "
          f"methods {', '.join(methods.specs) or 'none'}, "
          f"{torch.get_num_threads()} threads; {flops / 1e6:.1f} MFLOP per training image; medians over {a.rounds} "
          f"interleaved rounds" + (f" [{100 * summary(figures[variants[0]]['a'])['coverage']:.0f} % interval]"
                                   if a.rounds > 1 else ""))
    for v in variants:
        res, fig = out["variants"][v], out["variants"][v]["figures"]
        if a.compile != "off":
            print(f"-- {v}" + (f" ({'dynamic shapes' if out['compile_dynamic'] else 'a graph per size'})"
                               if v == "compiled" and methods.resizes else ""))
        print(f"(a) compute limit, fixed resident batch: {ci_text(fig['a']):>20} img/s  "
              f"{res['a_flop_s'] / 1e9:6.1f} GFLOP/s   start-up {res['a_start_s']:.1f} s")
        print(f"(b) train.py loop on Fashion-MNIST:      {ci_text(fig['b']):>20} img/s  "
              f"{res['b_flop_s'] / 1e9:6.1f} GFLOP/s   startup_s {res['b_start_s']:.1f} s")
        print(f"(c) torchvision dataset + DataLoader:    {ci_text(fig['c']):>20} img/s  ({a.workers} workers)")
        print(f"b/a = {ci_text(fig['b_over_a'], '.3f')}   b/c = {ci_text(fig['b_over_c'], '.2f')}")
    if a.compile == "both":
        ratio = out["compiled_over_eager"]
        print("compiled/eager: " + "   ".join(f"({k}) {ci_text(ratio[k], '.3f')}" for k in "abc"))


if __name__ == "__main__":
    main()
