"""Calibrated cost: what one optimizer step and one evaluation pass of every training configuration under RUNS_DIR
cost on this device, written to RUNS_DIR/calibration.json (docs/time-axes.md).

    python -m benchmarks.calibrate RUNS_DIR [--device cpu|cuda[:N]] [--rounds 5] [--steps 20] [--data-dir DIR]
                                   [--out FILE]

Runs are grouped by what changes a step's cost (costs.COST_KEYS: model and its options, methods and theirs,
micro-batch, accumulation, precision, layout, optimizer, world size as each device sees it). Each configuration
is built once as train.py builds it (its options rebuilt from the config.json of one of its runs), and its steps
are train.py's own (train.Run.step, with the loader's augmented batches), at each image size its runs train at
(progressive resizing: each size of its schedule). The configurations are timed interleaved, A B C A B C ..., over
--rounds rounds, each timing synchronised on the device: --steps steps per size (after one untimed step, and
--warmup-steps untimed ones before the first round) and one evaluation pass (train.py's, over this device's share
of the validation set). Each cost is the median over rounds with a distribution-free interval
(analysis.stats.median_ci). The FLOPs of a training image at each size are counted too (flops.flops_per_image),
for runs made before train.py recorded them.
Nothing is written unless every configuration was measured; a configuration that cannot be rebuilt here stops the
calibration with train.py's one line about it.
"""
import argparse
import datetime
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

import compile_choice
import costs
import flops
import options
import train
from analysis.runs import RunError, find_run_dirs, read_config, warn
from analysis.stats import median_ci
from rundir import atomic_write
from trackers import Trackers

FORMAT = 1  # calibration.json's layout; analysis.axes refuses others


@dataclass
class Config:
    """One cost configuration: its key, its runs, and once built, what times it."""
    key: dict
    runs: list = field(default_factory=list)  # (path, config)
    run: object = None  # train.Run
    state: object = None
    batches: object = None
    contexts: dict = None  # {size name: the methods' Context of a step at that size}
    flops: dict = None
    steps: dict = field(default_factory=dict)  # {size name: [seconds per step, one per round]}
    evals: list = field(default_factory=list)
    shape: tuple = None
    loss_sum: object = None  # the loop's device tensors
    first_bad: object = None

    @property
    def label(self):
        k = self.key
        accum = f"/{k['grad_accum']}" if k["grad_accum"] > 1 else ""
        return (f"{k['model']} {k['amp']} batch {k['batch_size']}{accum}" + (f" x{k['world_size']}" if
                                                                             k["world_size"] > 1 else "")
                + f" {'+'.join(k['methods']) or 'baseline'}" + (" (schedule-free)" if k["schedule_free"] else ""))


def run_args(config, data_dir=None):
    """train.py's options of a run, rebuilt from its config.json: as it resolved them (its precision, its methods
    with every option as --method specs), for this process (no trackers, nothing written)."""
    c = {**costs.COST_DEFAULTS, **config}
    key = costs.cost_key(config)
    args = options.parse_args([])
    for dest in ("dataset", "subset", "augment", "decode", "image_size", "model", "schedule", "epochs",
                 "warmup_epochs", "eta_min", "cycle_decay", "cooldown_frac", "cooldown_shape", "sf_lr",
                 "sf_warmup_epochs", "batch_size", "grad_accum", "opt", "opt_betas", "opt_eps", "clip_grad", "lr",
                 "momentum", "nesterov", "weight_decay", "amp", "seed", "compile", "deterministic",
                 "skip_nonfinite"):
        if dest in c:
            setattr(args, dest, c[dest])
    args.compile = "on" if c["compile"] else "off"  # config.json's is the resolved choice, --compile takes a word
    args.t0, args.t_mult = c.get("family_t0", c.get("t0")), c.get("family_t_mult", c.get("t_mult"))
    if args.schedule == "constant":
        args.t_mult = None
    args.model_kwargs = ",".join(f"{k}={json.dumps(v)}" for k, v in key["model_kwargs"].items())
    args.decay_exclusions = "on" if key["decay_excluded"] else "off"
    args.method = costs.method_specs(key)
    args.plugin_files = list(c.get("plugin_files") or [])
    args.data_dir = data_dir or c.get("data_dir")
    args.eval_every, args.no_progress = 0.0, True
    return args


def build(cfg, device, data_cache, data_dir, graphs=0):
    """Build cfg's model, optimizer and loader as train.py does, from the options of its first run, and the Context
    of one step at each image size any of its runs trains at. graphs: the compiled graphs the configurations built
    before it expect (torch must not run this one eager past its recompile limit)."""
    config = cfg.runs[0][1]
    args = run_args(config, data_dir)
    world_size = cfg.key["world_size"]
    setup, methods = options.resolve(args, world_size, device)
    data_key = (args.dataset, args.data_dir, args.subset, args.augment, args.decode, args.image_size)
    data, model, loader = train.build_run(args, setup, methods, device, 0, world_size, data_cache.get(data_key))
    data_cache[data_key] = data
    spe = loader.steps_per_epoch
    plan = train.make_plan(args, setup, spe)
    optimizer, scheduler, scaler, autocast = train.build_training(model, args, setup, plan, methods,
                                                                  cfg.key["decay_excluded"], device)
    contexts, size = {}, (data.image_size, data.image_size)
    for _, other in cfg.runs:  # every size some run of the configuration trains at (the same data: the same spe)
        try:
            their = costs.plan_of(dict(other, steps_per_epoch=spe))
        except (KeyError, TypeError, ValueError):
            continue
        sides = costs.step_sides(their, methods, size, spe)
        for side, ctx in flops.side_contexts(their, sides, spe, data).items():
            contexts.setdefault(side, ctx)
    contexts = contexts or flops.side_contexts(plan, costs.step_sides(plan, methods, size, spe), spe, data)
    micro = options.micro_batch_size(args, world_size)
    cfg.flops = flops.flops_per_image(model, methods, autocast, data, micro, contexts)
    cfg.contexts, cfg.shape = contexts, (data.in_chans, data.image_size, data.image_size)
    # a compiled run's steps are timed compiled as it was compiled (each image size compiles in its side's untimed
    # first step); at one image size (compile_dynamic None in the key) one static graph, as its own process compiled
    # it (torch's default would make a size dynamic here, met again in another configuration of this process)
    dynamic = False if cfg.key["compile_dynamic"] is None and len(contexts) == 1 else cfg.key["compile_dynamic"]
    stepped = compile_choice.compile_model(model, dynamic, graphs + len(contexts)) if setup.compile else model
    cfg.run = train.Run(args, setup, plan, data, loader, stepped, model, optimizer, scheduler, scaler, methods,
                        autocast, 0, world_size, False, device, None, Trackers([], None, None), None)
    cfg.state = train.TrainState()
    cfg.batches = loader.steps(itertools.count())  # path steps 0, 1, 2, ... for as long as the rounds need
    cfg.loss_sum = torch.zeros((), device=device)
    cfg.first_bad = torch.full((), train.NO_STEP, dtype=torch.long, device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(cfg, side, n, device, untimed=1):
    """Seconds per optimizer step over n of train.py's steps at this image size (train.Run.step), after `untimed`
    steps: the configuration before this one left its own weights in the caches, a run's steps follow each other."""
    ctx = cfg.contexts[side]

    def step():
        x, y = next(cfg.batches)
        _, cfg.first_bad = cfg.run.step(cfg.state, x, y, ctx, cfg.loss_sum, cfg.first_bad)
    for _ in range(untimed):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - started) / n


def time_eval(cfg, device):
    """Seconds of one evaluation pass (train.Evaluator.evaluate_point: schedule-free's BatchNorm recomputation too)."""
    sync(device)
    started = time.perf_counter()
    cfg.run.evaluator.evaluate_point(cfg.run.loader.steps_per_epoch)
    sync(device)
    return time.perf_counter() - started


def summary(values, name="step_s"):
    median, lo, hi, coverage = median_ci(values)
    return {name: median, f"{name}_lo": lo, f"{name}_hi": hi, "coverage": coverage, "rounds": list(values)}


def scan(runs_dir):
    """{key text: Config} of every readable run below runs_dir (finished or not); damaged ones warned of."""
    configs = {}
    for d in find_run_dirs([runs_dir]):
        try:
            config = read_config(d)
            key = costs.cost_key(config)
        except (RunError, KeyError, TypeError) as e:
            warn(f"skipped: {e}")
            continue
        configs.setdefault(costs.key_text(key), Config(key)).runs.append((d, config))
    return configs


def refuse(message):
    """Bad input: one line, exit 2, nothing written."""
    print(f"benchmarks.calibrate: error: {message}", file=sys.stderr)
    sys.exit(2)


def device_of(name):
    """The device --device names (default: the GPU where there is one), made current; refuse()s one that is not a
    device, not one train.py trains on, or a GPU this machine lacks."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        refuse(f"--device {name}: not a device; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        refuse(f"--device {name}: train.py trains on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            refuse("--device cuda: no CUDA device here; use --device cpu")
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    return device


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", help="a folder of runs (a study): every configuration below it is calibrated")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU where there is one)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (A B C A B C ...)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration and size per round")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before the first round")
    p.add_argument("--data-dir", default=None, help="the data's folder, where the runs' recorded one is elsewhere")
    p.add_argument("--out", default=None, help="default: RUNS_DIR/calibration.json")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.steps < 1 or a.warmup_steps < 0:
        refuse("--rounds and --steps must be >= 1, --warmup-steps >= 0")
    if not os.path.isdir(a.runs_dir):
        refuse(f"{a.runs_dir} is not a folder of runs")
    out = a.out or os.path.join(a.runs_dir, "calibration.json")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        refuse(f"--out {out}: no such folder")
    device = device_of(a.device)
    configs = list(scan(a.runs_dir).values())
    if not configs:
        refuse(f"no runs (config.json) below {a.runs_dir}")
    started, data_cache, graphs = time.perf_counter(), {}, 0
    print(f"{len(configs)} configurations of {sum(len(c.runs) for c in configs)} runs; building them on "
          f"{options.hardware_name(device)}")
    for i, cfg in enumerate(configs, 1):
        t = time.perf_counter()
        print(f"  {i}/{len(configs)} {cfg.label}: {len(cfg.runs)} runs, e.g. {cfg.runs[0][0]}", flush=True)
        build(cfg, device, data_cache, a.data_dir, graphs)
        graphs += len(cfg.contexts) if cfg.key["compile"] else 0  # one model class's code: graphs of them all
        for side in cfg.contexts if a.warmup_steps else ():  # untimed: allocator growth, autotuning, first draws
            time_steps(cfg, side, a.warmup_steps, device, untimed=0)
        print(f"     built in {time.perf_counter() - t:.1f} s", flush=True)
    for r in range(a.rounds):
        t = time.perf_counter()
        for cfg in configs:  # interleaved: every configuration once per round
            for side in cfg.contexts:
                cfg.steps.setdefault(side, []).append(time_steps(cfg, side, a.steps, device))
            cfg.evals.append(time_eval(cfg, device))
        print(f"round {r + 1}/{a.rounds}: {time.perf_counter() - t:.1f} s", flush=True)
    result = dict(
        format=FORMAT, device=device.type, device_name=options.hardware_name(device), torch_version=torch.__version__,
        cuda_version=torch.version.cuda if device.type == "cuda" else None, threads=torch.get_num_threads(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), rounds=a.rounds,
        steps=a.steps, warmup_steps=a.warmup_steps, runs_dir=a.runs_dir, command=sys.argv[1:] if argv is None
        else list(argv), interval="median over rounds; distribution-free interval between order statistics "
        "(analysis.stats.median_ci), coverage as given",
        configs=[dict(key=c.key, label=c.label, runs=len(c.runs), example_run=c.runs[0][0], image_shape=list(c.shape),
                      sides={side: dict(summary(c.steps[side]), train_flops_per_image=c.flops[side])
                             for side in sorted(c.contexts)},
                      eval=summary(c.evals, "eval_s")) for c in configs])
    atomic_write(out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    for c in result["configs"]:
        for side, s in c["sides"].items():
            ci = "" if s["step_s_lo"] is None else f" [{1e3 * s['step_s_lo']:.1f}, {1e3 * s['step_s_hi']:.1f}]"
            print(f"{c['label']} {side}: {1e3 * s['step_s']:.1f} ms/step{ci}, "
                  f"{1e6 * s['step_s'] / c['key']['batch_size']:.0f} us/image, "
                  f"{s['train_flops_per_image'] / 1e6:.1f} MFLOP/image; evaluation {c['eval']['eval_s']:.2f} s")
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
