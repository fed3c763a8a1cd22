"""Train one network and write one run directory (the run format: docs/run-format.md).

    python train.py                                   # small ResNet, Fashion-MNIST, cyclic, 3 cycles
    torchrun --nproc_per_node=8 train.py --data imagenet --data-dir /data/imagenet --model resnet50 ...

DDP comes from the torchrun environment (NCCL on CUDA, gloo on CPU); only rank 0 writes files.
The LR follows schedules.py and is stepped once per optimizer step; validation runs at every
curve point (cycle ends, budgets), at the end, and every --eval-every epochs; checkpoints are written
after every evaluation and every --checkpoint-every minutes between them. SIGTERM or SIGINT (scancel, a time limit,
Ctrl-C) ends the run at the next step boundary the ranks agree on, after a checkpoint there (exit 143 / 130).
"""
import contextlib
import copy
import itertools
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import compile_choice
import costs
import schedules
from data import DataError, build_data
from methods import ALIAS_KEYS, Context, MethodError, MethodList, weights_kept
from models import build_model, error_line, fixed_input_size
from options import (RESULT_KEYS, cpu_has_native_bf16, fail, micro_batch_size, parse_args, resolve,
                     result_options)
from plan import placement
from rundir import (MetricsLog, RunDirError, check_writable, checkpoint_files, holds_run, is_done, load_checkpoint,
                    lock_run_dir, mark_done, metrics_rows, record_request, recorded_options, remove_run,
                    save_checkpoint, write_config)
from runformat import ADDED_DEFAULTS, canonical_methods, is_legacy, method_options
from trackers import Trackers

NO_STEP = 2 ** 62  # "no non-finite step yet"


def device_history(setup, ckpt):
    """Every GPU or CPU model the run has trained on (more than one only through --allow-device-change)."""
    before = [] if ckpt is None else [ckpt["config"].get("device_name"),
                                      *(recorded_options(setup.run_dir) or {}).get("device_names", [])]
    return sorted({setup.device_name, *filter(None, before)})


def command_line(argv):
    """train.py's arguments, as config.json records them (argv: main's, or None for the process's own)."""
    return sys.argv[1:] if argv is None else list(argv)


def resume_decision(args, setup, master, argv=None):
    """Read run_dir and decide: (checkpoint to resume or None, whether to wipe the old run first).
    Exits 0 for a finished run of the same options under --resume (recording argv, the command line, as one that
    asked for it: config.json's argv_accepted), and fail()s on anything that would lose or mix results: other options,
    a damaged metrics.csv, a folder that is not provably an empty start of this run."""
    run_dir, options = setup.run_dir, result_options(args, setup)
    if not args.resume:
        if holds_run(run_dir) and not args.overwrite:
            fail(f"--run-dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                 f"or choose another --run-dir")
        return None, args.overwrite
    ckpt = load_checkpoint(run_dir, discard_corrupt=master) if os.path.isdir(run_dir) else None
    if ckpt is not None and ckpt.get("config") is None:
        fail(f"--resume: the checkpoint in {run_dir}/checkpoints does not record its options (written by "
             f"an older train.py); start the run again with --overwrite")
    # the checkpoint says what it was trained with (a stray config.json cannot mislead); config.json fills in the
    # keys an older checkpoint predates, and stands alone where there is no checkpoint
    from_config = api_names(recorded_options(run_dir))
    recorded = None if ckpt is None and from_config is None else {**ADDED_DEFAULTS, **(from_config or {}),
                                                                  **(api_names(ckpt["config"]) if ckpt is not None else {})}
    done = is_done(run_dir)
    if recorded is not None:
        # a finished run made elsewhere stays valid: the folder of a dataset that has one known content (not an
        # ImageFolder tree: there the folder is the dataset); --amp auto keeps the precision the run recorded
        # the hardware: tf32 follows it (CPU or GPU); each rank knows only its own GPU, so rank 0's decides
        hardware = ("device_name", "tf32")
        host = ((("data_dir",) * (args.dataset != "imagenet") + hardware if done else ())
                + ("amp",) * (args.amp == "auto") + ("compile",) * (args.compile == "auto")
                + hardware * args.allow_device_change
                + hardware * (not master))
        diffs = {k: f"{k}: {recorded[k]!r} -> {options[k]!r}" for k in RESULT_KEYS  # keys it predates: not compared
                 if k in recorded and k not in host and recorded[k] != options[k]}
        if diffs and set(diffs) <= set(hardware):  # this run's own problem: a sweep goes on with the others
            fail(f"--resume: {run_dir} was trained on other hardware ({'; '.join(diffs.values())}): its train_time_s "
                 f"would splice two speeds; start it again with --overwrite, or pass --allow-device-change to resume "
                 f"anyway (config.json then lists both)")
        if diffs:
            fail(f"--resume: these options differ from the {'finished ' * done}run in {run_dir}: "
                 f"{'; '.join(diffs.values())}; ask for the run's options, or use another --run-dir (a sweep: another "
                 f"--out)", options=True)
    if done:  # never redo a finished run (sweeps rely on this); --overwrite replaces it
        if recorded is None:
            fail(f"--resume: {run_dir} is marked done but records no options (no config.json or checkpoint), so it "
                 f"cannot be checked against this one; choose another --run-dir or --overwrite it")
        if master:
            if argv is not None:
                try:
                    record_request(run_dir, argv, args.recipe_sha256)
                except RunDirError as e:  # the run stays finished; only launch.sh's record of the request is lost
                    print(f"warning: {e}", file=sys.stderr)
            print(f"run {run_dir} is already finished (it has 'done'); nothing to do. Pass --overwrite "
                  f"instead of --resume to train it again")
        sys.exit(0)
    if ckpt is None:
        if args.resume == "must":
            fail(f"--resume: no readable checkpoint in {run_dir}/checkpoints; start it without --resume "
                 f"(or with --resume auto)")
        return None, fresh_start_allowed(run_dir, recorded, master)
    rows = metrics_rows(run_dir)
    if rows is None:
        fail(f"--resume: {run_dir}/metrics.csv is missing, so the curve before the checkpoint is lost; "
             f"restore the file or start again with --overwrite")
    if rows < ckpt["metrics_rows"]:
        fail(f"--resume: {run_dir}/metrics.csv has {rows} whole rows but the checkpoint recorded "
             f"{ckpt['metrics_rows']}; restore the file or start again with --overwrite")
    return ckpt, False


def build_run(args, setup, methods, device, rank, world_size, data=None):
    """(data, model, train loader): the data (or `data`, already built from these options), the model with the
    methods' surgery on its device, checked by the methods; seeded so that every rank builds the same initial model.
    fail()s in one line."""
    configure_device(device, args.deterministic)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    try:
        data = data or build_data(args.dataset, args.data_dir, device, args.subset, args.download, args.workers,
                                  augment=args.augment == "standard", decode=args.decode, image_size=args.image_size)
        model = build_model(args.model, data.num_classes, data.in_chans,
                            {**setup.model_kwargs, **methods.model_kwargs()}).to(device)
        model = methods.apply_model(model)  # surgery (BlurPool, channels-last, an EMA copy), before DDP
        loader = data.train_loader(args.batch_size, rank, world_size, args.seed)
        methods.check(SimpleNamespace(model=model, model_name=args.model, schedule=args.schedule,
                                      micro_batch=micro_batch_size(args, world_size), world_size=world_size,
                                      num_classes=data.num_classes,
                                      image_shape=(data.in_chans, data.image_size, data.image_size)))
        check_model_runs(model, data, methods, args)
    except (DataError, ValueError) as e:  # MethodError too
        fail(str(e), options=True)
    if loader.steps_per_epoch < 1:
        fail(f"--batch-size {args.batch_size} is larger than the training set; lower it or drop --subset", options=True)
    return data, model, loader


def check_model_runs(model, data, methods, args):
    """ValueError unless the model takes the data's images: its fixed input size (a ViT's img_size) against theirs,
    then one forward pass in training mode on two blank images, undone (weights, BatchNorm statistics, RNG), so that
    whatever the model makes of its options (a word where a number belongs) is one line before anything is written,
    not a traceback mid-run."""
    size = (data.image_size, data.image_size)
    fixed = fixed_input_size(model)
    if fixed is not None and fixed != size:
        raise ValueError(f"--model-kwargs img_size: {args.model} takes {fixed[0]}x{fixed[1]} images, but --data "
                         f"{args.dataset} has {size[0]}x{size[1]}; give --model-kwargs img_size={size[0]} (or data of "
                         f"its size)")
    x = torch.zeros(2, data.in_chans, *size, device=data.device)
    rng = rng_state()
    try:
        with weights_kept(model), torch.no_grad():
            model.train()
            model(methods.transform_eval_batch(x))
    except Exception as e:  # whatever the model makes of its options; not the GPU's own trouble (memory, driver)
        if isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA" in str(e) or "cuDNN" in str(e):
            raise
        raise ValueError(f"--model {args.model} --model-kwargs '{args.model_kwargs}': a forward pass on "
                         f"{data.in_chans}x{size[0]}x{size[1]} images fails ({error_line(e)}); fix the model's "
                         f"options") from None
    finally:
        restore_rng(rng)


def measures_precision(args, device, world_size):
    """--amp auto measures on a CPU with native bf16, in one process (ranks could pick differently); elsewhere its
    choice is fixed: bf16 on GPUs that have it (else fp16), fp32 on CPUs without native bf16 (emulated: ~10x slower)."""
    return args.amp == "auto" and device.type == "cpu" and world_size == 1 and cpu_has_native_bf16()


def measure_precision(model, loader, methods, args, steps=3):
    """--amp auto on a CPU: which of fp32 and bf16 trains this model faster, and the images/s of each, from a few
    steps (one untimed first) on the run's first batch. bf16's speed on a CPU depends on the model (on one Xeon
    with AMX a small ViT ran 1.6x slower in bf16, our small ResNet 1.6x faster), so the CPU's features cannot decide.
    Leaves no trace in the weights, BatchNorm statistics and RNG (put back); a method's own Python state is not
    touched (the steps run without the methods' hooks, on the model after their surgery)."""
    x, y = next(loader.epoch(0, 0))
    micro = micro_batch_size(args, 1)
    x, y = methods.transform_eval_batch(x[:micro]), y[:micro]  # the layout of training, no augmentation drawn
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = Context(step=0, epoch=0.0, rank=0, world_size=1, seed=args.seed, run_progress=0.0, cycle_progress=0.0,
                  num_classes=int(y.max()) + 1)
    rng, rounds = rng_state(), {"none": [], "bf16": []}
    with weights_kept(model):
        for _ in range(2):  # interleaved, the better of two rounds each: this VM's speed drifts
            for amp in rounds:
                autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")
                rounds[amp].append(images_per_second(lambda: train_step(
                    model, optimizer, scaler, MethodList([]), autocast, x, y, 1, False, ctx), len(x), steps))
        optimizer.zero_grad(set_to_none=True)
    restore_rng(rng)
    figures = {amp: max(r) for amp, r in rounds.items()}
    # bf16 only when clearly faster: near a tie fp32, whose result does not depend on the timing's noise
    return ("bf16" if figures["bf16"] > AMP_MARGIN * figures["none"] else "none"), figures


def measure_compile(args, model, optimizer, scaler, methods, autocast, loader, plan, data):
    """--compile auto's measurement (compile_choice.measure) on this run's own optimizer step: train_step with its
    optimizer, GradScaler, clipping and methods' hooks, over --grad-accum micro-batches of the first batch of this
    rank's loader (--print-compile: rank 0 of the runs' world size), at every image size the run trains at, each
    with the run's steps there; every step undone after (steps_undone)."""
    x, y = next(loader.epoch(0, 0))
    spe, size = loader.steps_per_epoch, (data.image_size, data.image_size)
    sides = costs.step_sides(plan, methods, size, spe)
    counts = costs.StepCounts(plan, sides, costs.side_name(size)).run(plan.run_steps)

    def step(m, ctx):  # a fresh copy of the batch each step: a method may transform it in place
        train_step(m, optimizer, scaler, methods, autocast, x.clone(), y.clone(), args.grad_accum, False, ctx,
                   check_finite=args.skip_nonfinite > 0, clip_grad=args.clip_grad, raw_model=model)
    return compile_choice.measure(
        model, step, {side: (ctx, counts.get(side, 0)) for side, ctx in side_contexts(plan, sides, spe, data).items()},
        len(x), compile_choice.dynamic(True, methods), lambda: steps_undone(model, optimizer, scaler, methods))


def same_compile_on_every_rank(compiled, device):
    """Under DDP: fail in one line where the ranks of this job were asked to compile differently (each node of a
    multi-node sweep passes its own --compile)."""
    flags = torch.tensor([int(compiled), -int(compiled)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # (min, -max) over the ranks
    if flags[0].item() != -flags[1].item():
        fail("--compile: the ranks of this torchrun job were given different choices (on and off: each node of a "
             "multi-node sweep resolved --compile auto itself); pass --compile on or off, the same on every node",
             options=True)


AMP_MARGIN = 1.1  # --amp auto takes bf16 on a CPU only when it trains at least this much faster than fp32


def images_per_second(step, batch, steps):
    """Images per second of `step` over `steps` calls, after one untimed call."""
    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def api_names(options):
    """Recorded options with `methods` as the method API names them; each source (config.json, a checkpoint) is read
    on its own, since one may predate the API and the other not (a resume rewrites config.json first)."""
    if options is None or "methods" not in options:
        return options
    named = {**options, "methods": canonical_methods(options)}
    if "method_options" in options or is_legacy(options):  # (a checkpoint of 2026-12-01 morning has none)
        named["method_options"] = method_options(options)
    return named


def fresh_start_allowed(run_dir, recorded, master):
    """--resume auto without a checkpoint: start again only where nothing can be lost, i.e. the folder holds no
    run, or the start of this very run (its config.json, with the options already compared) that died before its
    first checkpoint: no checkpoint file of any kind and at most the one row written just before it. Anything else
    is refused, and nothing is removed."""
    if not holds_run(run_dir):
        return False
    files, rows = checkpoint_files(run_dir), metrics_rows(run_dir)
    ours = recorded is not None and all(k in recorded for k in ("schedule", "seed", "epochs", "lr"))
    bare = recorded is None and rows == 0 and not os.path.exists(os.path.join(run_dir, "done"))  # a header only
    if (ours or bare) and not files and (rows or 0) <= 1:
        if master:
            print(f"--resume auto: {run_dir} has no checkpoint (the run stopped before its first); starting it "
                  f"again, removing its " + " and ".join(["config.json"] * ours + [f"metrics.csv ({rows} row(s))"]
                                                         * (rows is not None)))
        return True
    held = ", ".join(([f"checkpoints/{', '.join(files)}"] if files else []) +
                     ([f"metrics.csv ({rows} rows)"] if rows is not None else []) +
                     (["config.json"] if os.path.exists(os.path.join(run_dir, "config.json")) else []))
    why = "no readable checkpoint" if ours else "no config.json of a train.py run"
    fail(f"--resume auto: {run_dir} holds {held or 'run files'} but {why}, so it cannot be resumed and nothing was "
         f"removed; start it again with --overwrite (deletes them), or use another --run-dir (a sweep: delete that "
         f"folder or use another --out)")


# ---- the run ---------------------------------------------------------------------------------

def main(argv=None):
    """train.py's entry point: a run-directory problem (unusable folder, lock held, full disk) or a damaged image
    anywhere in the run is one line and exit 2, like a bad flag; the last checkpoint is kept."""
    try:
        run_main(argv)
    except RunDirError as e:
        fail(str(e))
    except DataError as e:  # mid-run: a damaged image, named by the loader of whichever rank read it; every run
        fail(str(e), every_rank=True, options=True)  # of a sweep on this data would meet it: the sweep stops
    finally:  # the run directory's lock ends with the run, also where train.main is called in a process that goes on
        while HELD_LOCKS:
            HELD_LOCKS.pop().close()
        STOP.restore()


HELD_LOCKS = []  # the lock files run_main holds


class StopRequest:
    """SIGTERM or SIGINT once training has started: noted, and Run.train stops at its next step boundary that the
    ranks agree on, after a checkpoint there (a signal before that kills at once: start-up writes each file whole).
    After the first, a SIGINT raises KeyboardInterrupt at once (the user insists) and a SIGTERM is ignored (SLURM
    signals every process of the job, torchrun its workers, each once)."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def install(self):
        self.signum = 0
        if threading.current_thread() is threading.main_thread():  # (signal.signal works there only)
            self.previous = {s: signal.signal(s, self.note) for s in (signal.SIGTERM, signal.SIGINT)}

    def note(self, signum, frame):
        if not self.signum:
            self.signum = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # not a handler: the interpreter's exit resets those

    def restore(self):
        """The handlers as before (train.main in a process that goes on), unless stopping: repeats stay ignored to
        the exit (torchrun sends the ranks still ending a SIGTERM once one has exited)."""
        if self.signum:
            return
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self.previous = {}


STOP = StopRequest()


def run_main(argv=None):
    args = parse_args(argv)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if args.print_compile:  # --print-compile WORLD_SIZE: measured in one process as rank 0 of the runs' ranks
        world_size = args.print_compile
    local_rank, master = int(os.environ.get("LOCAL_RANK", 0)), rank == 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # before any CUDA question: otherwise every rank makes a context on GPU 0
        torch.cuda.set_device(device)
    setup, methods = resolve(args, world_size, device)
    if args.print_amp:  # what --amp auto picks here, for a sweep to pass to all its runs: nothing is written
        amp, figures = setup.amp, None
        if measures_precision(args, device, world_size):
            model, loader = build_run(args, setup, methods, device, rank, world_size)[1:3]
            make_plan(args, setup, loader.steps_per_epoch)  # the schedule's checks first: they are quick
            amp, figures = measure_precision(model, loader, methods, args)
        print(f"--amp auto: {amp}" + (f" ({', '.join(f'{k} {v:.0f}' for k, v in figures.items())} img/s)" if figures
                                      else " (fixed by the device)"), file=sys.stderr)
        print(amp)
        return
    if args.print_compile:  # what --compile auto picks here, for a sweep to give a method set's runs: nothing written
        data, model, loader = build_run(args, setup, methods, device, rank, world_size)  # world: the runs' (below)
        plan = make_plan(args, setup, loader.steps_per_epoch)  # the schedule's checks first: they are quick
        if measures_precision(args, device, world_size):  # (a sweep resolves --amp auto first)
            setup = replace(setup, amp=measure_precision(model, loader, methods, args)[0])
        optimizer, _, scaler, autocast = build_training(model, args, setup, plan, methods,
                                                        decay_exclusions(args, model), device)
        print(compile_choice.printed(args, setup, lambda: measure_compile(
            args, model, optimizer, scaler, methods, autocast, loader, plan, data)))
        return
    check_writable(setup.run_dir)  # before anything slow is loaded
    # One writer per run directory: rank 0 holds its lock from before it reads the folder to the end of the
    # run (a folder that does not exist yet holds nothing to read, and is created only once the flags pass).
    locking = master and not args.no_lock
    if locking and os.path.isdir(setup.run_dir):
        HELD_LOCKS.append(lock_run_dir(setup.run_dir))
    # every rank decides alike: they all read the same files
    ckpt, wipe = resume_decision(args, setup, master, command_line(argv))
    data, model, loader = build_run(args, setup, methods, device, rank, world_size)
    recorded = (recorded_options(setup.run_dir) or {}) if ckpt is not None else {}  # config.json of the resumed run
    stored = recorded.get("data_storage")  # None: not imagenet, or a run from before the key
    if stored is not None and stored != getattr(data, "storage", None):
        fail(f"--resume: the images in --data-dir {args.data_dir} are not stored as when {setup.run_dir} started "
             f"({stored} -> {data.storage}); resume with the data it started on, or start again with --overwrite",
             options=True)
    own = methods.config()  # what the methods record of themselves: never over an option of the run
    reserved = set(RESULT_KEYS) | set(asdict(setup)) | set(vars(args)) | {"argv"}
    clash = sorted(k for m in methods.all for k in set(m.config()) & reserved
                   - ALIAS_KEYS.get(m.name, set()))  # (the paper's methods record their own old flags' options)
    if clash:
        fail(f"--method: a method's config() returns '{clash[0]}', an option of the run; rename it", options=True)
    spe = loader.steps_per_epoch
    plan = make_plan(args, setup, spe)
    amp_measured = None  # measured after every check of the options: a bad one fails fast
    if args.amp == "auto" and ckpt is not None:  # a resume keeps the precision the run recorded
        setup = replace(setup, amp=ckpt["config"]["amp"])
        if setup.amp == "fp16" and device.type == "cpu":
            fail(f"--resume: {setup.run_dir} trained in fp16 on a GPU; a CPU has no fp16 training: resume it on a "
                 f"GPU, or start it again with --overwrite")
    elif measures_precision(args, device, world_size):
        amp, amp_measured = measure_precision(model, loader, methods, args)
        setup = replace(setup, amp=amp)
        if master:
            print(f"--amp auto: {amp} ({', '.join(f'{k} {v:.0f}' for k, v in amp_measured.items())} img/s over a few "
                  f"training steps of this model)")
    without_effect = methods.without_effect()
    if master:  # as Composer's NoEffectWarning: the set is run, and says what it is
        for m in methods.all:
            if m.no_effect:
                print(f"warning: method {m.spec} changed nothing in {args.model} ({m.no_effect}); recorded in "
                      f"config.json as methods_without_effect")
        for line in methods.warnings():  # e.g. a gradient edit that a later hook's recomputed gradient replaces
            print(f"warning: {line}")
    raw_model = model
    exclusions = decay_exclusions(args, model)
    if ckpt is not None and "decay_exclusions" not in ckpt["config"] and exclusions:
        fail(f"--resume: {setup.run_dir} predates --decay-exclusions and decayed every parameter, which auto no "
             f"longer does for {args.model}; resume it with --decay-exclusions off")
    if master and args.opt != "sgdw" and args.weight_decay / args.lr > 1:  # AdamW's usual 0.05 means 0.05 x lr here
        print(f"warning: --weight-decay {args.weight_decay:g} is the decay per step at the peak LR: {args.opt} will "
              f"shrink the weights by {args.weight_decay:.0%} a step (torch's AdamW weight_decay w is --weight-decay "
              f"w x --lr here)")
    optimizer, scheduler, scaler, autocast = build_training(model, args, setup, plan, methods, exclusions, device)
    setup, compile_auto, compiled = compile_choice.choose(  # after the precision, on the run's own step
        args, setup, ckpt, recorded, lambda: measure_compile(args, model, optimizer, scaler, methods, autocast, loader,
                                                             plan, data), sys.stdout if master else None)
    if locking and not HELD_LOCKS:
        HELD_LOCKS.append(lock_run_dir(setup.run_dir))
    if master and not locking:
        os.makedirs(setup.run_dir, exist_ok=True)
    flops = count_flops(raw_model, methods, autocast, data, plan, micro_batch_size(args, world_size), spe)
    # --compile auto's measurement is start-up, whichever way it chose
    state = TrainState(startup_time=compile_auto["measure_s"] if compile_auto and ckpt is None else 0.0)
    # a resume compiles as the run recorded: its checkpoint says (config.json for a checkpoint that predates the key,
    # as resume_decision reads options; runs from before the key: torch's default, as they were compiled)
    dynamic = ({**recorded, **ckpt["config"]}.get("compile_dynamic") if ckpt is not None
               else compile_choice.dynamic(setup.compile, methods))
    if ckpt is not None:
        try:
            state = restore_checkpoint(ckpt, raw_model, optimizer, scheduler, scaler, methods, rank)
        except MethodError as e:
            fail(str(e))
    else:  # the model-side RNG (dropout, drop-path) differs per rank; rank 0 keeps the seed
        torch.manual_seed(args.seed if rank == 0 else hash((args.seed, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
    if ddp:
        init_distributed(device, rank, world_size)
        same_compile_on_every_rank(setup.compile, device)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                          else None)
    if setup.compile:  # the DDP-wrapped model, as PyTorch advises: the compiler then overlaps all-reduce and backward
        model = compiled if compiled is not None else compile_choice.compile_model(model, dynamic,
                                                                                   len(flops.per_image))

    config = {**vars(args), **asdict(setup), "steps_per_epoch": spe, "total_steps": plan.total_steps,
              "run_steps": plan.run_steps, "cycle_end_epochs": [s / spe for s in plan.cycle_end_steps()],
              "speedup_ratio_eq1": schedules.eq1_ratio(schedules.cycle_end_epochs(
                  args.warmup_epochs, setup.family_t0, setup.family_t_mult, setup.cycles)),
              **own, "device": device.type, "torch_version": torch.__version__,
              "cuda_version": torch.version.cuda if device.type == "cuda" else None, "decay_excluded": exclusions,
              "methods_without_effect": without_effect, "data_storage": getattr(data, "storage", None),
              "amp_measured": amp_measured if ckpt is None else recorded.get("amp_measured"),
              "compile_auto": compile_auto, "compile_dynamic": dynamic if setup.compile else None,
              "train_flops_per_image": flops.per_image.get(costs.side_name((data.image_size,) * 2)),
              "train_flops_per_image_by_side": flops.per_image,
              "device_names": device_history(setup, ckpt),
              **placement(device.type, torch.get_num_threads(), torch.cuda.device_count() if device.type == "cuda"
                          else 0),
              "argv": command_line(argv)}
    log = None
    if master:
        if wipe:
            remove_run(setup.run_dir)
        if ckpt is None:  # config.json first: the folder says whose it is before anything else is in it
            write_config(setup.run_dir, config)
        log = MetricsLog(setup.run_dir, keep_rows=state.metrics_rows if ckpt is not None else None)  # may refuse
        if ckpt is not None:  # after MetricsLog has checked the rows it keeps
            write_config(setup.run_dir, config)
        tracked = Trackers(args.log, setup.run_dir, config, resumed_at=state.step if ckpt is not None else 0)
        print(f"run {setup.run_dir}: {args.schedule}, {setup.epochs:g} epochs = {plan.run_steps} steps, curve points "
              f"at epochs {', '.join(f'{e:g}' for e in config['cycle_end_epochs'])}; methods "
              f"{', '.join(setup.methods) or 'none'}; {device.type} x{world_size}, "
              f"amp {setup.amp}" + (f"; resumed at step {state.step}" if ckpt is not None else ""))
        for m in methods.all:
            for key, value in m.config().items():
                if isinstance(value, list) and value:  # what a method changed, e.g. the layers BlurPool replaced
                    print(f"{m.spec}: {key}: {', '.join(map(str, value))}")

    run = Run(args, setup, plan, data, loader, model, raw_model, optimizer, scheduler, scaler, methods, autocast,
              rank, world_size, ddp, device, log, tracked if master else Trackers([], None, None), flops,
              config["compile_dynamic"])
    steps_here = run.train(state)
    run.tracked.close()
    if hasattr(data, "close"):  # the validation workers
        data.close()
    if master and run.stopped:
        print(f"train.py: {signal.Signals(run.stopped).name}: checkpoint at step {state.step} saved; resume with "
              f"--resume auto", file=sys.stderr)
    elif master:
        mark_done(setup.run_dir)
        print(f"done: {setup.run_dir}, {state.cost_time:.1f}s of training, {steps_here} optimizer steps in this "
              f"process")
    if ddp:  # (after a stop too: no rank leaves while rank 0 writes the checkpoint)
        dist.barrier()
        dist.destroy_process_group()
    if run.stopped:
        sys.exit(128 + run.stopped)


@dataclass
class TrainState:
    """Everything the loop advances, and a checkpoint restores."""
    step: int = 0  # optimizer steps the run has taken (wsd: trunk and branches)
    path_time: float = 0.0  # training seconds along the current model's own path: the row's train_time_s
    cost_time: float = 0.0  # training seconds the whole run has spent: the row's curve_cost_s
    startup_time: float = 0.0  # seconds of start-up (Run.warm_up) over the run's processes: the row's startup_s
    metrics_rows: int = 0
    skipped: int = 0
    loss_sum: float = 0.0  # this rank's sum of step losses since the last row
    loss_steps: int = 0
    # this rank's loss at each of the path's last steps_per_epoch steps, slot = path step mod steps_per_epoch (NaN:
    # no loss there, a skipped step or none yet): train_loss_epoch. None: empty (a checkpoint from before it)
    loss_window: list = None
    images: int = 0  # images trained since the last row, and the seconds they took
    row_time: float = 0.0
    trunk: dict = None  # wsd, inside a branch: the trunk's state at the branch point, restored after it


class Run:
    """The training loop and what it needs; one object so the loop reads without a dozen arguments."""

    def __init__(self, args, setup, plan, data, loader, model, raw_model, optimizer, scheduler, scaler, methods,
                 autocast, rank, world_size, ddp, device, log, tracked, flops, compile_dynamic=None):
        self.args, self.setup, self.plan, self.data, self.loader = args, setup, plan, data, loader
        self.flops, self.compile_dynamic = flops, compile_dynamic  # (config.json's, kept in the checkpoint too)
        self.model, self.raw_model, self.optimizer, self.scheduler, self.scaler = (model, raw_model, optimizer,
                                                                                   scheduler, scaler)
        self.methods, self.autocast, self.log, self.tracked = methods, autocast, log, tracked
        self.rank, self.world_size, self.ddp, self.device, self.master = rank, world_size, ddp, device, rank == 0
        spe = loader.steps_per_epoch
        every = round(setup.eval_every * spe) if setup.eval_every else 0
        self.curve_points = set(plan.cycle_end_steps())
        # evaluations on the trunk (every run but wsd: the whole run); a wsd branch is evaluated at its end
        trunk_evals = set(range(every, plan.total_steps, every)) if every else set()
        if plan.schedule != "wsd":
            trunk_evals |= self.curve_points | {plan.total_steps}
        self.trunk_evals = trunk_evals
        self.sf = plan.schedule == "schedule-free"
        self.stopped = 0  # the signal train() stopped on at a checkpoint (STOP), 0 where it ran to the end

    def context(self, path_step):
        """What the methods' hooks are told about this step (methods/api.py: Context)."""
        return costs.step_context(self.plan, path_step, self.loader.steps_per_epoch, self.args.seed, self.rank,
                                  self.world_size, self.data.num_classes)

    def train(self, state):
        """Run the plan from state.step to the end; returns the optimizer steps taken by this process."""
        a, plan, spe = self.args, self.plan, self.loader.steps_per_epoch
        first_step = state.step
        first_bad = torch.full((), NO_STEP, dtype=torch.long, device=self.device)  # earliest non-finite step
        loss_sum = torch.full((), state.loss_sum, device=self.device)  # summed on the device: no sync per step
        loss_window = self.window_tensor(state)
        started = time.perf_counter()
        stream = self.warm_up(state) if state.step < plan.run_steps else None
        state.startup_time += time.perf_counter() - started  # start-up: its own column, off the training clock
        STOP.install()  # from here a signal stops at a checkpoint: killed before, the process had nothing to save
        clock = Clock(self.device)
        last_save = time.monotonic()
        bar = tqdm(total=plan.run_steps, initial=state.step, disable=not self.master or a.no_progress, unit="step",
                   dynamic_ncols=True, leave=False)
        while state.step < plan.run_steps:
            seg, at = plan.segment_at(state.step)
            if seg.kind == "branch" and state.trunk is None:  # wsd: keep the trunk, train a copy down to 0
                clock.pause(state)  # the trunk's time so far belongs to the snapshot
                state.loss_window = loss_window.tolist()
                state.trunk = self.snapshot(state, loss_sum)
                clock.start()
            for path_step, x, y in itertools.islice(stream, seg.end - at):  # this segment's steps
                lr, first_bad = self.step(state, x, y, self.context(path_step), loss_sum, first_bad, loss_window)
                bar.update(1)
                # -- 3. evaluate and log at the curve points; checkpoint after that or every few minutes
                done = path_step + 1
                row_due = done == seg.end if seg.kind == "branch" else done in self.trunk_evals
                due, stop = self.save_or_stop(last_save, state.step)
                if row_due or due or stop:
                    clock.pause(state)
                    state.loss_sum = self.check_finite(first_bad, loss_sum)
                    state.loss_window = loss_window.tolist()
                    if row_due:
                        self.evaluate_and_log(state, seg, done, lr)
                        loss_sum.zero_()
                    if seg.kind == "branch" and done == seg.end and state.step < plan.run_steps:  # back to the trunk
                        # (after the last branch the run is over: last.pt keeps the model of the last row)
                        state.loss_sum = self.restore_snapshot(state)
                        loss_sum.fill_(state.loss_sum)
                        loss_window = self.window_tensor(state)
                    self.save(state)
                    self.tracked.flush()
                    last_save = time.monotonic()
                    clock.start()
                    if stop and state.step < plan.run_steps:  # (at the last step the run is over: done)
                        bar.close()
                        STOP.note(stop, None)  # every rank now stops as if signalled (another rank may have been)
                        self.stopped = stop
                        return state.step - first_step
                # -- 4. progress
                if self.master and not a.no_progress and (state.step % 25 == 0 or row_due):
                    bar.set_postfix(epoch=f"{done / spe:.2f}", lr=f"{lr:.4f}",
                                    loss=f"{loss_sum.item() / max(state.loss_steps, 1):.4f}",
                                    img_s=f"{state.images / max(state.row_time + clock.elapsed(), 1e-9):.0f}")
        bar.close()
        return state.step - first_step

    def step(self, state, x, y, ctx, loss_sum, first_bad, loss_window=None):
        """One optimizer step of the loop (benchmarks.calibrate times this very step): its LR, the forward, backward
        and update with the methods' hooks, the loss summed on the device (and kept in the epoch's loss_window, NaN
        for a skipped step), the scheduler stepped. Returns the step's LR and the earliest non-finite step so far (a
        device tensor)."""
        a = self.args
        # -- 1. learning rate: the scheduler set it for this step (schedule-free: the optimizer does)
        lr = self.optimizer.param_groups[0]["lr"]
        # -- 2. forward, backward, update
        loss = train_step(self.model, self.optimizer, self.scaler, self.methods, self.autocast, x, y, a.grad_accum,
                          self.ddp, ctx, check_finite=state.skipped < a.skip_nonfinite, clip_grad=a.clip_grad,
                          raw_model=self.raw_model)
        if self.sf:
            lr = self.optimizer.param_groups[0]["scheduled_lr"]
        self.tracked.lr(state.step + 1, lr)
        if loss_window is not None:
            loss_window[ctx.step % self.loader.steps_per_epoch] = math.nan if loss is None else loss
        if loss is None:  # non-finite and --skip-nonfinite allows it: no update, the schedule goes on
            state.skipped += 1
            if self.master:
                tqdm.write(f"skipped step {state.step + 1}: non-finite loss "
                           f"({state.skipped}/{a.skip_nonfinite} allowed)")
        else:
            loss_sum += loss
            state.loss_steps += 1
            first_bad = torch.where((first_bad == NO_STEP) & ~torch.isfinite(loss), state.step, first_bad)
        if self.scheduler is not None:
            self.scheduler.step()
        state.step += 1
        state.images += a.batch_size
        return lr, first_bad

    def warm_up(self, state):
        """This process's start-up, timed apart into startup_s: the data pipeline's first batch, then one forward
        and backward pass on it (torch.compile, cudnn autotuning, allocator growth), undone (weights, BatchNorm
        statistics, gradients, RNG), so that train_time_s counts training only, each standard run and the cyclic
        run alike, and a resumed process's compilation too. Returns the batches of the rest of the run."""
        stream = run_batches(self.loader, self.plan, state.step)
        path_step, x, y = first = next(stream)
        trial_pass(self.model, self.raw_model, self.methods, self.autocast, x, y, self.context(path_step),
                   self.scaler, self.ddp, self.args.grad_accum)
        if self.setup.compile and self.methods.resizes:  # every image size the run trains at compiled now, in start-up
            sides = costs.step_sides(self.plan, self.methods, (self.data.image_size,) * 2, self.loader.steps_per_epoch)
            for ctx in side_contexts(self.plan, sides, self.loader.steps_per_epoch, self.data).values():
                trial_pass(self.model, self.raw_model, self.methods, self.autocast, x, y, ctx, self.scaler, self.ddp,
                           self.args.grad_accum)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)  # peak_mem_gb: training's, not the start-up's
        return itertools.chain([first], stream)

    def window_tensor(self, state):
        """state.loss_window on the device, as float32 like the losses it holds (all NaN where empty)."""
        values = state.loss_window or [math.nan] * self.loader.steps_per_epoch
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def save_or_stop(self, last_save, step):
        """(checkpoint due, signal to stop on or 0) after `step`: --checkpoint-every by rank 0's clock, a signal on any
        rank (STOP). Without DDP at every step; under DDP every 25 steps, decided together (MAX over the ranks) so
        that all save and stop at the same step: a signal is acted on within 25 steps (plus an evaluation due in
        between, and the checkpoint's write)."""
        every = self.args.checkpoint_every
        due = bool(every) and time.monotonic() - last_save >= 60 * every
        if not self.ddp:
            return due, STOP.signum
        if step % 25:
            return False, 0
        votes = torch.tensor([float(due and self.master), float(STOP.signum)], device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return bool(votes[0].item()), int(votes[1].item())

    def check_finite(self, first_bad, loss_sum):
        """Stop with the earliest non-finite step over all ranks; returns this rank's loss sum as a float."""
        bad = reduced_min(first_bad, self.ddp)
        if bad < NO_STEP:
            lr = schedules.lr_at(self.plan, bad, self.setup.sf_lr if self.sf else self.args.lr, self.args.eta_min)
            fail(f"non-finite training loss at step {bad + 1} (lr {lr:.6g}); the last good checkpoint is kept; "
                 f"lower --lr, use --amp bf16/none, or allow a few with --skip-nonfinite N", code=3)
        return loss_sum.item()

    def evaluate_and_log(self, state, seg, done, lr):
        """Validate, append the metrics row (rank 0), reset the row's accumulators."""
        t_eval, a = time.perf_counter(), self.args
        window = [v for v in state.loss_window or () if math.isfinite(v)]
        sums = torch.tensor([state.loss_sum, state.loss_steps, sum(window), len(window)], dtype=torch.float64,
                            device=self.device)
        if self.ddp:
            dist.all_reduce(sums)
        val = self.evaluate_point(done)
        spe, plan = self.loader.steps_per_epoch, self.plan
        curve_point = done in self.curve_points and (seg.kind == "branch" or plan.schedule != "wsd")
        row = dict(epoch=f"{done / spe:.6g}", step=done, lr=f"{lr:.8g}",
                   train_loss=f"{sums[0] / sums[1]:.6f}" if sums[1] else None,  # no mean over zero steps
                   val_loss=f"{val['loss']:.6f}", val_acc1=f"{val['acc1']:.4f}",
                   val_acc5=f"{val['acc5']:.4f}" if val["acc5"] is not None else None,
                   train_time_s=f"{state.path_time:.3f}", curve_cost_s=f"{state.cost_time:.3f}",
                   startup_s=f"{state.startup_time:.3f}",
                   train_flops=f"{self.flops.of(self.flops.counts.path(done), a.batch_size):.10g}",
                   curve_cost_flops=f"{self.flops.of(self.flops.counts.run(state.step), a.batch_size):.10g}",
                   cycle=seg.branch if seg.kind == "branch" else plan.cycle_of_step(done - 1),
                   cycle_end=int(curve_point or (done == plan.total_steps and plan.schedule != "wsd")),
                   images_per_s=f"{state.images / max(state.row_time, 1e-9):.1f}", skipped_steps=state.skipped,
                   eval_time_s=f"{time.perf_counter() - t_eval:.3f}",
                   train_loss_epoch=f"{sums[2] / sums[3]:.6f}" if sums[3] else None)
        if self.device.type == "cuda":
            row["peak_mem_gb"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f}"
        if self.master:
            self.log.append(row)
            self.tracked.row(state.step, row)
            tqdm.write(f"epoch {row['epoch']:>6} step {done:>6} cycle {row['cycle']:>2} lr {lr:.4f} | train loss "
                       f"{row['train_loss']} | val loss {row['val_loss']} acc1 {row['val_acc1']}% | "
                       f"{row['images_per_s']} img/s, {state.path_time:.1f}s"
                       + (f", peak {row['peak_mem_gb']} GiB" if "peak_mem_gb" in row else "")
                       + (" | curve point" if row["cycle_end"] else ""))
        state.metrics_rows += 1
        state.loss_sum, state.loss_steps, state.images, state.row_time = 0.0, 0, 0, 0.0
        if not math.isfinite(val["loss"]):
            fail(f"non-finite validation loss at step {done} (the row is logged, no checkpoint is written, the last "
                 f"good one is kept); lower --lr or use --amp none", code=3)

    def evaluate_point(self, done):
        """Validation of the model at this point; schedule-free evaluates its averaged weights with BatchNorm
        statistics recomputed on a few training batches, as its authors prescribe, then puts the training weights
        and statistics back bit for bit (its own eval/train switch is not exact): evaluations leave no trace."""
        if not self.sf:
            with self.methods.eval_weights(self.raw_model):  # e.g. EMA's averaged weights, put back after
                return evaluate(self.raw_model, self.data, self.rank, self.world_size, self.micro_batch(),
                                self.autocast, self.methods, self.ddp)
        with weights_kept(self.raw_model):
            self.optimizer.eval()
            recompute_bn(self.raw_model, self.loader, done, self.methods, self.autocast, self.ddp)
            with self.methods.eval_weights(self.raw_model):
                val = evaluate(self.raw_model, self.data, self.rank, self.world_size, self.micro_batch(),
                               self.autocast, self.methods, self.ddp)
            self.optimizer.train()
        return val

    def micro_batch(self):
        return micro_batch_size(self.args, self.world_size)

    # ---- checkpoints and wsd snapshots: one path state, saved and restored side by side ----------

    def path_state(self, state):
        """The current model's path: model (BN buffers too), optimizer, scaler, the methods' state (an EMA), RNG
        and the open row's sums. A wsd branch point keeps a copy (the trunk); a checkpoint saves it, PER_RANK parts
        gathered."""
        return dict(model=self.raw_model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict(), methods=self.methods.state_dict(), rng=rng_state(),
                    **{k: getattr(state, k) for k in ROW_FIELDS})

    def snapshot(self, state, loss_sum):
        """The trunk at a branch point (a deep copy: the branch trains the live model on)."""
        state.loss_sum = float(loss_sum)
        return copy.deepcopy(self.path_state(state))

    def restore_snapshot(self, state):
        """Put the trunk back after its branch; returns its row's loss sum."""
        t, state.trunk = state.trunk, None
        for k, v in load_path(t, self.raw_model, self.optimizer, self.scaler, self.methods).items():
            setattr(state, k, v)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the snapshot's LR was the branch's first; the trunk continues on the schedule's
        return state.loss_sum

    def save(self, state):
        """Checkpoint (rank 0 writes; every rank contributes its RNG and row sums: a collective)."""
        path = self.path_state(state)
        mine = {k: path.pop(k) for k in PER_RANK}
        mine["trunk"] = state.trunk and {k: state.trunk[k] for k in PER_RANK}
        ranks = gather(mine, self.ddp)
        if not self.master:
            return
        path["train_time_s"] = path.pop("path_time")  # the checkpoint's name for it, as in metrics.csv
        trunk = state.trunk and {k: v for k, v in state.trunk.items() if k not in PER_RANK}
        save_checkpoint(self.setup.run_dir, dict(
            path, scheduler=self.scheduler.state_dict() if self.scheduler is not None else None, step=state.step,
            curve_cost_s=state.cost_time, startup_s=state.startup_time, metrics_rows=state.metrics_rows,
            skipped_steps=state.skipped, ranks=ranks, trunk=trunk, config=dict(result_options(self.args, self.setup),
                                                                               compile_dynamic=self.compile_dynamic)))


# TrainState fields a path carries
ROW_FIELDS = ("loss_sum", "loss_steps", "images", "row_time", "path_time", "loss_window")
PER_RANK = ("rng", "loss_sum", "loss_steps", "loss_window")  # path parts that differ between DDP ranks
ADDED_PER_RANK = {"loss_window": None}  # what checkpoints from before a per-rank part read as


def load_path(path, raw_model, optimizer, scaler, methods):
    """Put back what Run.path_state captured: model, optimizer, scaler, methods, RNG; returns its ROW_FIELDS."""
    raw_model.load_state_dict(path["model"])
    optimizer.load_state_dict(path["optimizer"])
    scaler.load_state_dict(path["scaler"])
    methods.load_state_dict(path.get("methods"))  # checkpoints before the method API: methods without state
    restore_rng(path["rng"])
    return {k: path[k] for k in ROW_FIELDS}


def restore_checkpoint(ckpt, raw_model, optimizer, scheduler, scaler, methods, rank):
    """Load what Run.save wrote; returns the TrainState to continue from."""
    mine = dict(ADDED_PER_RANK, **(ckpt["ranks"][rank] if rank < len(ckpt["ranks"]) else ckpt["ranks"][0]))
    path = dict(ckpt, path_time=ckpt["train_time_s"], **{k: mine[k] for k in PER_RANK})
    row = load_path(path, raw_model, optimizer, scaler, methods)
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    trunk = None if ckpt["trunk"] is None else dict(ckpt["trunk"], **dict(ADDED_PER_RANK, **mine["trunk"]))
    return TrainState(step=ckpt["step"], cost_time=ckpt["curve_cost_s"], startup_time=ckpt.get("startup_s", 0.0),
                      metrics_rows=ckpt["metrics_rows"], skipped=ckpt["skipped_steps"], trunk=trunk, **row)


class Clock:
    """Training seconds, paused around evaluation and checkpoints: the one timer behind train_time_s,
    curve_cost_s and images_per_s (eval_time_s is timed where the evaluation runs)."""

    def __init__(self, device):
        self.device = device
        self.start()

    def start(self):
        self.t0 = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.t0

    def pause(self, state):
        """Add the seconds since start() to the run's path, cost and row times."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = self.elapsed()
        state.path_time += dt
        state.cost_time += dt
        state.row_time += dt


def run_batches(loader, plan, run_step):
    """(path step, x, y) for every run step from `run_step` to the end, in run order (wsd: trunk, branch 0, trunk,
    branch 1, ...); data depend on the path step alone. One stream for the run: a folder dataset keeps one
    DataLoader, prefetching across epochs and segments."""
    path = [p for seg in plan.segments() for p in range(seg.start, seg.end)][run_step:]
    return ((p, x, y) for p, (x, y) in zip(path, loader.steps(path)))


def make_plan(args, setup, spe):
    """The schedule in optimizer steps; fail() where it cannot be trained at this number of steps per epoch."""
    plan = schedules.make_plan(args.schedule, setup.epochs, args.warmup_epochs, setup.family_t0, setup.family_t_mult,
                               spe, args.cycle_decay, args.cooldown_frac, args.cooldown_shape)
    if args.schedule == "schedule-free":
        plan = replace(plan, warmup_steps=round(setup.sf_warmup_epochs * spe))
    if args.schedule != "standard" and plan.t0_steps < 1:
        fail(f"--t0 {args.t0:g} epochs is under one optimizer step ({spe} steps per epoch); raise --t0", options=True)
    for seg in plan.segments():
        if seg.kind == "branch" and (seg.end == seg.start or seg.start < plan.warmup_steps):
            fail(f"--cooldown-frac {args.cooldown_frac:g}: the budget at {seg.end / spe:g} epochs ({seg.end} steps) is "
                 f"too short for a cooldown after the warmup; raise --cooldown-frac or --t0, or lower --warmup-epochs",
                 options=True)
    return plan


def build_training(model, args, setup, plan, methods, exclusions, device):
    """(optimizer, scheduler, GradScaler, autocast) of a run: the optimizer wrapped by the methods, the schedule's
    scheduler, the precision's scaler and autocast context (benchmarks.calibrate builds each study's this way)."""
    optimizer = methods.wrap_optimizer(build_optimizer(model, args, setup, plan, exclusions), model)
    scheduler = schedules.build_scheduler(optimizer, plan, args.eta_min)
    scaler = torch.amp.GradScaler(device.type, enabled=setup.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setup.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    return optimizer, scheduler, scaler, autocast


@dataclass
class Flops:
    """A run's training FLOPs: per image at each size it trains at ({'28x28': FLOPs}), and its steps per size."""
    per_image: dict
    counts: costs.StepCounts

    def of(self, counts, batch_size):
        """FLOPs of the steps counted ({size: steps}), batch_size images each."""
        return costs.priced(counts, self.per_image) * batch_size


def count_flops(model, methods, autocast, data, plan, micro, spe):
    """The run's Flops, off the clock: flops_per_image at each image size it trains at (the methods'
    train_image_size over the plan), and its steps per size."""
    sides = costs.step_sides(plan, methods, (data.image_size, data.image_size), spe)
    per_image = flops_per_image(model, methods, autocast, data, micro, side_contexts(plan, sides, spe, data))
    return Flops(per_image, costs.StepCounts(plan, sides, next(iter(per_image))))


def side_contexts(plan, sides, spe, data):
    """{size name: the Context of the first path step that trains at that size} (sides: costs.step_sides)."""
    first = {costs.side_name((data.image_size, data.image_size)): 0} if sides is None else {}
    for p, side in enumerate(sides or []):
        first.setdefault(side, p)
    return {side: costs.step_context(plan, p, spe, num_classes=data.num_classes) for side, p in first.items()}


def flops_per_image(model, methods, autocast, data, micro, contexts):
    """{size name: FLOPs of one training image}: torch's flop counter over one forward and backward pass of a blank
    micro-batch of the data's shape through the methods' transform_batch (which resizes it at that Context) and
    loss, undone (trial_pass), per image, times the passes a step makes (SAM: 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    out = {}
    for side, ctx in sorted(contexts.items()):
        x = torch.zeros(micro, data.in_chans, data.image_size, data.image_size, device=data.device)
        y = torch.zeros(micro, dtype=torch.long, device=data.device)
        with FlopCounterMode(display=False) as counter:
            trial_pass(model, model, methods, autocast, x, y, ctx)
        out[side] = counter.get_total_flops() * methods.passes / micro
    return out


def trial_pass(model, raw_model, methods, autocast, x, y, ctx, scaler=None, ddp=False, grad_accum=1):
    """One training forward and backward pass of `model` (raw_model: under its DDP and compile wrappers) on the
    first of the `grad_accum` micro-batches of (x, y) through the methods' transform_batch and loss, undone:
    weights, BatchNorm statistics, gradients, RNG and the methods' own state (state_dict: a plug-in counting its
    calls counts this one not) as before. The micro-batch is a chunk of a copy of the batch, as train_step's are
    chunks of it: a compiled model given a whole tensor here would fail a guard of the graph compiled on a view
    (dynamic shapes) and compile that size again."""
    rng, kept = rng_state(), copy.deepcopy(methods.state_dict())
    with weights_kept(raw_model):
        model.train()
        # a copy: a batch transform may change it in place
        xm, ym = methods.transform_batch(x.clone().chunk(grad_accum)[0], y.clone().chunk(grad_accum)[0], ctx)
        with (model.no_sync() if ddp else contextlib.nullcontext()), autocast:
            loss = methods.loss(model(xm), ym, ctx)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        raw_model.zero_grad(set_to_none=True)
    methods.load_state_dict(kept)
    restore_rng(rng)


@contextlib.contextmanager
def steps_undone(raw_model, optimizer, scaler, methods):
    """Optimizer steps taken inside leave no trace: the weights and buffers (BatchNorm statistics), the optimizer's
    state, the GradScaler, the methods' state and the RNG as before (load_path), no gradients."""
    kept = copy.deepcopy(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                              scaler=scaler.state_dict(), methods=methods.state_dict(), rng=rng_state(),
                              **dict.fromkeys(ROW_FIELDS)))
    try:
        yield
    finally:
        load_path(kept, raw_model, optimizer, scaler, methods)
        optimizer.zero_grad(set_to_none=True)


def decay_exclusions(args, model):
    """--decay-exclusions resolved: auto is on iff the model has no BatchNorm (ViTs, but also ConvNeXt or NFNets),
    off for BatchNorm models, as every run before the flag."""
    if args.decay_exclusions != "auto":
        return args.decay_exclusions == "on"
    return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def build_optimizer(model, args, setup, plan, exclusions):
    """timm's --opt. Weight decay is decoupled and scaled by the LR in all four (lamb told to decouple it), so
    wd / peak lr makes --weight-decay the decay per step at the peak LR, wd x lr / peak lr at any other: a cyclic
    and a standard run decay alike at the same LR (torch's AdamW weight_decay = --weight-decay / --lr). With
    exclusions, biases, normalisation weights and the model's no_weight_decay() names are not decayed (timm's
    param_groups_weight_decay). Schedule-free: SGDScheduleFree (weight decay its L2 term, unscaled, as the study
    ran it) or AdamWScheduleFree (the convention above, at its own peak LR); their own warmup."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    betas = dict(betas=tuple(args.opt_betas)) if args.opt_betas else {}
    betas.update(eps=args.opt_eps) if args.opt_eps else None
    if args.schedule != "schedule-free":
        extra = dict(momentum=args.momentum, nesterov=args.nesterov) if args.opt == "sgdw" else betas
        if args.opt == "lamb":  # timm's Lamb clips gradients to 1.0, couples its decay to the trust ratio and takes
            # the ratio only where decayed (plain Adam elsewhere) unless told: --clip-grad, one decay convention and
            # the ratio on every parameter (options.LAMB_VERSION 2) instead
            extra.update(max_grad_norm=None, decoupled_decay=True, always_adapt=True)
        return create_optimizer_v2(model if exclusions else model.parameters(), opt=args.opt, lr=args.lr,
                                   weight_decay=args.weight_decay / args.lr, filter_bias_and_bn=exclusions, **extra)
    import schedulefree  # resolve() checked it is installed
    no_decay = getattr(model, "no_weight_decay", set)()  # a ViT's position embedding, as the factory spares it
    # AdamW decays by lr x wd per step: wd / its peak LR, as for every --opt; SGD's L2 term as the study ran it
    wd = args.weight_decay / setup.sf_lr if args.opt == "adamw" else args.weight_decay
    params = (param_groups_weight_decay(model, wd, no_weight_decay_list=no_decay) if exclusions
              else model.parameters())
    if args.opt == "adamw":
        optimizer = schedulefree.AdamWScheduleFree(params, lr=setup.sf_lr, weight_decay=wd,
                                                   warmup_steps=plan.warmup_steps, **betas)
    else:
        optimizer = schedulefree.SGDScheduleFree(params, lr=setup.sf_lr, momentum=args.momentum, weight_decay=wd,
                                                 warmup_steps=plan.warmup_steps)
    optimizer.train()
    return optimizer


def configure_device(device, deterministic=False):
    """CUDA: TF32 matmuls and cudnn autotuning (fast, not bitwise reproducible), or with --deterministic neither,
    deterministic cudnn and cuBLAS, and torch's deterministic algorithms (a warning names any op without one).
    CPU: the threads this rank may use."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # either way: train.main may run again
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, cores // local_world)
        torch.set_num_threads(threads)  # ranks on one machine share its cores; OMP_NUM_THREADS overrides


def init_distributed(device, rank, world_size):
    """Process group from the torchrun environment, its keys prefixed by the restart count: torchrun's
    agent store outlives a worker restart, and without the prefix restarted gloo workers read the dead
    workers' addresses and fail to connect."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_store)
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size,
                            device_id=device if device.type == "cuda" else None)


def train_step(model, optimizer, scaler, methods, autocast, x, y, grad_accum, ddp, ctx, check_finite=False,
               clip_grad=0.0, raw_model=None):
    """One optimizer step over this rank's batch in `grad_accum` micro-steps, the methods' hooks at their points
    (methods/api.py); returns the mean loss (a device tensor: reading it would sync). DDP all-reduces gradients on
    the last micro-step only. With check_finite, a non-finite loss on any rank (or, after a method's second pass,
    a non-finite gradient) skips the update on all ranks, puts back the BatchNorm statistics the forward passes
    moved, and returns None: the step leaves no trace. raw_model: the model under the DDP and compile wrappers."""
    model.train()
    buffers = [b.clone() for b in model.buffers()] if check_finite else None

    def forward_backward():
        total = torch.zeros((), device=x.device)
        for micro, (xm, ym) in enumerate(zip(x.chunk(grad_accum), y.chunk(grad_accum))):
            mctx = ctx.for_micro(micro)
            xm, ym = methods.transform_batch(xm, ym, mctx)
            sync = not ddp or micro == grad_accum - 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                loss = methods.loss(model(xm), ym, mctx) / grad_accum
            scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def skipped_if_not_finite(value):
        """check_finite: True, and the step undone, when `value` is not finite on some rank."""
        finite = torch.isfinite(value).float()
        if ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item():
            return False
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        return True

    total = forward_backward()
    if check_finite and skipped_if_not_finite(total):
        return None
    if methods.reruns:  # e.g. SAM: the gradient again, at other weights, over the same micro-batches
        methods.before_step(model, optimizer, replace(ctx, grad_scale=scaler.scale(torch.ones((), device=x.device)),
                                                     forward_backward=forward_backward))
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # (fp16: the GradScaler skips an overflow)
        if check_finite and not scaler.is_enabled() and skipped_if_not_finite(
                torch.stack([g.float().norm() for g in grads]).sum()):
            return None
    if clip_grad:  # the whole step's gradient (DDP: all-reduced on the last micro-step), fp16's scale taken out
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    methods.after_step(model if raw_model is None else raw_model, optimizer, ctx)
    return total


@torch.no_grad()
def recompute_bn(model, loader, path_step, methods, autocast, ddp=False, batches_used=8):
    """BatchNorm running statistics recomputed from scratch on the first few training batches of the current
    epoch (cropped and flipped as the loader yields them, never mixed): schedule-free's averaged weights never
    ran forward during training, so the statistics gathered on the other weights do not fit them. Under DDP each
    rank computes them on its slice of those global batches, as training's forward pass normalises, and the
    ranks' statistics are averaged: the same images (batches_used global batches) whatever the world size."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches below
    model.train()
    first = (path_step - 1) // loader.steps_per_epoch * loader.steps_per_epoch
    for x, _ in loader.steps(range(first, first + min(batches_used, loader.steps_per_epoch))):  # only these
        x = methods.transform_eval_batch(x)  # the layout of training (channels-last), never its augmentation
        with autocast:
            model(x)
    for bn, m in zip(bns, momenta):
        bn.momentum = m
        if ddp and bn.track_running_stats:
            for stat in (bn.running_mean, bn.running_var):
                dist.all_reduce(stat)
                stat /= dist.get_world_size()


@torch.no_grad()
def evaluate(model, data, rank, world_size, batch_size, autocast, methods, ddp):
    """Plain cross-entropy and top-1/top-5 over this rank's shard, summed over ranks: exact on the whole set.
    Batches of the training micro-batch size: known to fit, and on CPU 2-3x faster than batches of
    thousands, whose activations spill out of the caches. Same memory format as training (the methods'
    transform_eval_batch)."""
    model.eval()
    if ddp:  # BN running stats drift per rank during training: evaluate rank 0's, the model that is saved
        for buf in model.buffers():
            dist.broadcast(buf, 0)
    device = data.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    for x, y in data.val_batches(rank, world_size, batch_size):
        x = methods.transform_eval_batch(x)
        with autocast:
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, :1].sum().double(),
                             hit.sum().double(), torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    if ddp:
        dist.all_reduce(sums)
    loss, c1, c5, n = sums.tolist()
    return dict(loss=loss / n, acc1=100 * c1 / n, acc5=100 * c5 / n if data.num_classes >= 5 else None)


def reduced_min(t, ddp):
    """The smallest value of a 0-d tensor over all ranks (all ranks must call this when ddp)."""
    if ddp:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.item()


def gather(obj, ddp):
    """Every rank's `obj`, in rank order (all ranks must call this when ddp)."""
    if not ddp:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state():
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                numpy=torch.from_numpy(np_state[1].astype(np.int64)), numpy_pos=int(np_state[2]),
                python=list(random.getstate()[1]))


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate((3, tuple(state["python"]), None))


if __name__ == "__main__":
    main()
