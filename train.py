"""Train one network and write one run directory (the run format: docs/run-format.md).

    python train.py                                   # small ResNet, Fashion-MNIST, cyclic, 3 cycles
    torchrun --nproc_per_node=8 train.py --data imagenet --data-dir /data/imagenet --model resnet50 ...

DDP comes from the torchrun environment (NCCL on CUDA, gloo on CPU); only rank 0 writes files.
The LR follows schedules.py and is stepped once per optimizer step; validation runs at every
curve point (cycle ends, budgets), at the end, and every --eval-every epochs; checkpoints are written
after every evaluation and every --checkpoint-every minutes between them. SIGTERM or SIGINT (scancel, a time limit,
Ctrl-C) ends the run at the next step boundary the ranks agree on, after a checkpoint there (exit 143 / 130: stop.py).

This file is the run's story (run_main: parse -> set up -> build -> train -> finish) and the loop (Run); the
options are options.py's, the optimizer optim.py's, the precision precision.py's, --compile compile_choice.py's,
the resume decision resume.py's, the FLOPs flops.py's, the stop on a signal stop.py's (docs/layout.md).
"""
import contextlib
import copy
import itertools
import math
import os
import random
import signal
import sys
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
import precision
import schedules
from data import DataError, StandIn, build_data, data_here
from flops import count_flops, run_side_contexts, trial_pass
from methods import MethodError, weights_kept
from models import build_model, error_line, fixed_input_size
from optim import build_optimizer, decay_exclusions, weight_decay_note
from options import fail, method_config, micro_batch_size, parse_args, resolve, result_options
from plan import placement
from resume import check_decay_convention, device_history, kept_precision, resume_decision, resumed_config
from rng import restore_rng, rng_state
from rundir import (MetricsLog, RunDirError, check_unlocked, check_writable, lock_run_dir, mark_done, remove_run,
                    save_checkpoint, write_config)
from stop import STOP
from trackers import Trackers

NO_STEP = 2 ** 62  # "no non-finite step yet"


# ---- the run's story -------------------------------------------------------------------------

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


def run_main(argv=None):
    """The run: parse the options, set up the run directory (locked; resume or start decided), build the data,
    model, schedule, precision and optimizer, record the run's files, train, finish."""
    # -- parse
    args = parse_args(argv)
    proc = this_process(args.print_compile)
    setup, methods = resolve(args, proc.world_size, proc.device)
    if args.check:  # is this command right (docs, a sweep's lines)? Checked as a run would be, nothing written
        return check_only(args, setup, methods, proc)
    if args.print_amp:  # what --amp auto picks here, for a sweep to pass to all its runs: nothing is written
        return print_amp(args, setup, methods, proc)
    if args.print_compile:  # what --compile auto picks here, for a sweep to give a method set's runs: nothing written
        return print_compile(args, setup, methods, proc)
    # -- set up: the run directory, and what it holds decided (every rank decides alike: they read the same files)
    ckpt, wipe = open_run_dir(args, setup, proc.master, argv)
    # -- build: checks that need the data or the model come first, the precision's measurement after them all
    data, model, loader = build_run(args, setup, methods, proc.device, proc.rank, proc.world_size)
    recorded = resumed_config(args, setup, ckpt, data)  # config.json of the resumed run
    own = method_config(methods, args, setup)  # what the methods record of themselves
    spe = loader.steps_per_epoch
    plan = make_plan(args, setup, spe)
    setup, amp_measured = choose_precision(args, setup, ckpt, model, loader, methods, proc)
    without_effect = warn_of_methods(methods, args, proc.master)
    raw_model, exclusions = model, decay_exclusions(args, model)
    check_decay_convention(args, setup, ckpt, exclusions)
    note = weight_decay_note(args)
    if proc.master and note:
        print(note)
    optimizer, scheduler, scaler, autocast = build_training(model, args, setup, plan, methods, exclusions, proc.device)
    setup, compile_auto, compiled = compile_choice.choose(  # after the precision, on the run's own step
        args, setup, ckpt, recorded, lambda: compile_choice.measure_run(
            args, model, optimizer, scaler, methods, autocast, loader, plan, data, train_step, steps_undone),
        sys.stdout if proc.master else None)
    claim_run_dir(args, setup, proc.master)
    flops = count_flops(raw_model, methods, autocast, data, plan, micro_batch_size(args, proc.world_size), spe)
    state = start_state(ckpt, args, raw_model, optimizer, scheduler, scaler, methods, proc.rank)
    if compile_auto and ckpt is None:  # --compile auto's measurement is start-up, whichever way it chose
        state.startup_time = compile_auto["measure_s"]
    dynamic = compile_dynamic(setup, ckpt, recorded, methods)
    model = distribute(model, setup, proc, compiled, dynamic, len(flops.per_image))
    # -- record: config.json, metrics.csv, the trackers (rank 0)
    derived = dict(decay_excluded=exclusions, methods_without_effect=without_effect,
                   data_storage=getattr(data, "storage", None),
                   amp_measured=amp_measured if ckpt is None else recorded.get("amp_measured"),
                   compile_auto=compile_auto, compile_dynamic=dynamic if setup.compile else None,
                   train_flops_per_image=flops.per_image.get(costs.side_name((data.image_size,) * 2)),
                   train_flops_per_image_by_side=flops.per_image, device_names=device_history(setup, ckpt),
                   **placement(proc.device.type, torch.get_num_threads(),
                               torch.cuda.device_count() if proc.device.type == "cuda" else 0))
    config = run_config(args, setup, plan, spe, own, proc.device, derived, argv)
    log, tracked = (open_run_files(args, setup, plan, config, state, ckpt, wipe, methods, proc) if proc.master
                    else (None, Trackers([], None, None)))
    # -- train
    run = Run(args, setup, plan, data, loader, model, raw_model, optimizer, scheduler, scaler, methods, autocast,
              proc.rank, proc.world_size, proc.ddp, proc.device, log, tracked, flops, config["compile_dynamic"])
    steps_here = run.train(state)
    finish(run, state, steps_here, data, proc)


def finish(run, state, steps_here, data, proc):
    """The run's end: the trackers and validation workers closed; rank 0 marks the run done, or after a stop
    (a signal: stop.py) says where it stopped; under DDP every rank waits for that (no rank leaves while rank 0
    writes the checkpoint); a stopped process exits 128 + the signal."""
    run.tracked.close(exit_code=128 + run.stopped if run.stopped else 0)  # W&B: a stopped run is preempted
    if hasattr(data, "close"):  # the validation workers
        data.close()
    if proc.master and run.stopped:
        print(f"train.py: {signal.Signals(run.stopped).name}: checkpoint at step {state.step} saved; resume with "
              f"--resume auto", file=sys.stderr)
    elif proc.master:
        mark_done(run.setup.run_dir)
        print(f"done: {run.setup.run_dir}, {state.cost_time:.1f}s of training, {steps_here} optimizer steps in this "
              f"process")
    if proc.ddp:
        dist.barrier()
        dist.destroy_process_group()
    if run.stopped:
        if proc.local_rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and torchrun_parent():
            # torchrun restarts (--max-restarts) workers that stopped on a signal it did not get itself: each node's
            # agent is told to stop too, and ends its workers (they ignore a repeated SIGTERM) without a restart
            with contextlib.suppress(OSError):  # (gone already)
                os.kill(os.getppid(), signal.SIGTERM)
        sys.exit(128 + run.stopped)


def torchrun_parent():
    """Whether this process's parent is torchrun's agent (not a wrapper script of --no-python, not init or a
    container's pid 1 after the agent died): its command line runs torch.distributed.run or torchrun."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return False
    return any(w == b"torch.distributed.run" or w.endswith(b"torchrun") for w in words)


@dataclass(frozen=True)
class Process:
    """This process's place in the run: from torchrun's environment, or one process alone."""
    ddp: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def this_process(print_compile=None):
    """The Process, its GPU made current (before any CUDA question: otherwise every rank makes a context on GPU 0).
    --print-compile WORLD_SIZE: measured in one process as rank 0 of the runs' ranks."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    world_size = print_compile or world_size
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Process(ddp, rank, world_size, local_rank, device)


def check_only(args, setup, methods, proc):
    """--check: the options, recipes and plug-ins have passed resolve(); now --run-dir and --resume are decided as a
    run would (read only: nothing moved or recorded; the lock tried, not kept), the data read where it is here (a
    --data-dir that is a folder here; Fashion-MNIST's default folder), else, under --check shape, stood in for by its
    shape and size (data.StandIn), the model built on it with the methods and run once on blank images (build_run),
    and the schedule planned at the run's steps per epoch (make_plan), as a run does before training. One line on
    stdout; nothing written, trained, downloaded or measured; a problem is the run's own one-line error, exit 2."""
    check_writable(setup.run_dir)
    check_unlocked(setup.run_dir)
    try:
        ckpt, wipe = resume_decision(args, setup, False)  # as a rank other than 0: it prints, moves and records nothing
        start = "resumes its checkpoint" if ckpt else "replaces the run there" if wipe else "starts"
    except SystemExit as e:  # a finished run under --resume: a run would exit 0 at once
        if e.code:
            raise
        start = "is finished: a run exits at once"
    here, data = data_here(args.dataset, args.data_dir), None
    download, args.workers, args.download = args.download, 0, False  # no DataLoader workers, no download for a check
    if here and download:  # read once here, where it is already (build_run takes it); a run would download it
        try:
            data = run_data(args, proc.device)
        except DataError:
            here = False
    if not here and args.check != "shape":
        fail(f"--data-dir {args.data_dir or '(default)'}: the data is not here to check; run --check where it is, "
             f"or give --check shape to check the command by its dataset's shape and size", options=True)
    data = data if here else StandIn(args.dataset, proc.device, args.subset, args.image_size)
    loader = build_run(args, setup, methods, proc.device, proc.rank, proc.world_size, data)[2]
    plan = make_plan(args, setup, loader.steps_per_epoch)
    amp = "auto (measured as the run starts)" if precision.measures_precision(args, proc.device, proc.world_size) \
        else setup.amp
    print(f"train.py --check: OK: --run-dir {setup.run_dir} {start}; --data {args.dataset} "
          + (f"read from {args.data_dir}" if here and args.data_dir else "read" if here
             else f"not here ({args.data_dir or 'its default'}): checked by its shape and size")
          + f"; --model {args.model}; {args.schedule} {setup.epochs:g} epochs = {plan.run_steps} steps at "
          f"{loader.steps_per_epoch} per epoch, x{proc.world_size} ranks; methods {', '.join(setup.methods) or 'none'}"
          f"; amp {amp}")



def print_amp(args, setup, methods, proc):
    """--print-amp: the precision --amp auto uses here, measured where it is (after the schedule's checks: they are
    quick), on stdout alone and on stderr with its figures; nothing is written."""
    amp, figures = setup.amp, None
    if precision.measures_precision(args, proc.device, proc.world_size):
        model, loader = build_run(args, setup, methods, proc.device, proc.rank, proc.world_size)[1:3]
        make_plan(args, setup, loader.steps_per_epoch)
        amp, figures = precision.measure_precision(model, loader, methods, args, train_step)
    print(f"--amp auto: {amp}" + (f" ({', '.join(f'{k} {v:.0f}' for k, v in figures.items())} img/s)" if figures
                                  else " (fixed by the device)"), file=sys.stderr)
    print(amp)


def print_compile(args, setup, methods, proc):
    """--print-compile: what --compile auto picks here (on or off, on stdout; the figures on stderr), measured on
    the run's own step at the runs' world size, after the schedule's checks (they are quick) and --amp auto's
    measurement (a sweep resolves --amp auto first); nothing is written."""
    data, model, loader = build_run(args, setup, methods, proc.device, proc.rank, proc.world_size)
    plan = make_plan(args, setup, loader.steps_per_epoch)
    if precision.measures_precision(args, proc.device, proc.world_size):
        setup = replace(setup, amp=precision.measure_precision(model, loader, methods, args, train_step)[0])
    optimizer, _, scaler, autocast = build_training(model, args, setup, plan, methods, decay_exclusions(args, model),
                                                    proc.device)
    print(compile_choice.printed(args, setup, lambda: compile_choice.measure_run(
        args, model, optimizer, scaler, methods, autocast, loader, plan, data, train_step, steps_undone)))


def open_run_dir(args, setup, master, argv=None):
    """(checkpoint to resume or None, whether to wipe the old run first): --run-dir checked before anything slow is
    loaded, then decided (resume.resume_decision). One writer per run directory: rank 0 holds its lock from before it
    reads the folder to the end of the run (a folder that does not exist yet holds nothing to read, and is created
    only once the flags pass: claim_run_dir)."""
    check_writable(setup.run_dir)
    if master and not args.no_lock and os.path.isdir(setup.run_dir):
        HELD_LOCKS.append(lock_run_dir(setup.run_dir))
    return resume_decision(args, setup, master, command_line(argv))


def command_line(argv):
    """train.py's arguments, as config.json records them (argv: main's, or None for the process's own)."""
    return sys.argv[1:] if argv is None else list(argv)


def claim_run_dir(args, setup, master):
    """Rank 0 creates the run directory and locks it where open_run_dir could not (it did not exist yet); with
    --no-lock it only creates it."""
    locking = master and not args.no_lock
    if locking and not HELD_LOCKS:
        HELD_LOCKS.append(lock_run_dir(setup.run_dir))
    if master and not locking:
        os.makedirs(setup.run_dir, exist_ok=True)


def choose_precision(args, setup, ckpt, model, loader, methods, proc):
    """(setup with the run's precision, the figures measured or None): --amp auto keeps on a resume the precision
    the run recorded; on a CPU with native bf16 it is measured here, after every check of the options (a bad one
    fails fast); elsewhere resolve() fixed it by the device."""
    if args.amp == "auto" and ckpt is not None:
        return kept_precision(setup, ckpt, proc.device), None
    if not precision.measures_precision(args, proc.device, proc.world_size):
        return setup, None
    amp, measured = precision.measure_precision(model, loader, methods, args, train_step)
    if proc.master:
        print(f"--amp auto: {amp} ({', '.join(f'{k} {v:.0f}' for k, v in measured.items())} img/s over a few "
              f"training steps of this model)")
    return replace(setup, amp=amp), measured


def warn_of_methods(methods, args, master):
    """methods.without_effect() (config.json's methods_without_effect), and on rank 0 a warning for each method that
    changed nothing, as Composer's NoEffectWarning (the set is run, and says what it is), and each of the methods'
    own warnings (e.g. a gradient edit that a later hook's recomputed gradient replaces)."""
    without_effect = methods.without_effect()
    if master:
        for m in methods.all:
            if m.no_effect:
                print(f"warning: method {m.spec} changed nothing in {args.model} ({m.no_effect}); recorded in "
                      f"config.json as methods_without_effect")
        for line in methods.warnings():
            print(f"warning: {line}")
    return without_effect


def start_state(ckpt, args, raw_model, optimizer, scheduler, scaler, methods, rank):
    """The TrainState to start from: the checkpoint's, put back into the model, optimizer and methods; or a new one,
    with the model-side RNG (dropout, drop-path) seeded per rank (rank 0 keeps the seed)."""
    if ckpt is None:
        torch.manual_seed(args.seed if rank == 0 else hash((args.seed, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        return TrainState()
    try:
        return restore_checkpoint(ckpt, raw_model, optimizer, scheduler, scaler, methods, rank)
    except MethodError as e:
        fail(str(e))


def compile_dynamic(setup, ckpt, recorded, methods):
    """config.json's compile_dynamic: a resume compiles as the run recorded (its checkpoint says; config.json for a
    checkpoint that predates the key, as resume_decision reads options; runs from before the key: torch's default,
    as they were compiled); a fresh run as compile_choice.dynamic says."""
    if ckpt is not None:
        return {**recorded, **ckpt["config"]}.get("compile_dynamic")
    return compile_choice.dynamic(setup.compile, methods)


def distribute(model, setup, proc, compiled, dynamic, graphs):
    """The model to train: under DDP (the process group joined now, every rank checked to compile alike), then
    compiled around DDP, as PyTorch advises: the compiler then overlaps all-reduce and backward (`compiled`: --compile
    auto's measurement's model, where it chose to compile; else compiled here for `graphs` image sizes)."""
    if proc.ddp:
        init_distributed(proc.device, proc.rank, proc.world_size)
        compile_choice.same_on_every_rank(setup.compile, proc.device)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[proc.local_rank]
                                                          if proc.device.type == "cuda" else None)
    if setup.compile:
        model = compiled if compiled is not None else compile_choice.compile_model(model, dynamic, graphs)
    return model


def run_config(args, setup, plan, spe, own, device, derived, argv):
    """config.json (docs/run-format.md): every option under its flag's name, what they imply (Setup), the schedule
    in steps, the methods' own keys, the software, what the run derived or measured (`derived`), and argv."""
    return {**vars(args), **asdict(setup), "steps_per_epoch": spe, "total_steps": plan.total_steps,
            "run_steps": plan.run_steps, "cycle_end_epochs": [s / spe for s in plan.cycle_end_steps()],
            "speedup_ratio_eq1": schedules.eq1_ratio(schedules.cycle_end_epochs(
                args.warmup_epochs, setup.family_t0, setup.family_t_mult, setup.cycles)),
            **own, "device": device.type, "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda if device.type == "cuda" else None, **derived,
            "argv": command_line(argv)}


def open_run_files(args, setup, plan, config, state, ckpt, wipe, methods, proc):
    """Rank 0's (MetricsLog, Trackers): the old run removed where decided, config.json first for a new run (the
    folder says whose it is before anything else is in it), after MetricsLog has checked the rows it keeps for a
    resumed one; then the run's first lines on stdout."""
    if wipe:
        remove_run(setup.run_dir)
    if ckpt is None:
        write_config(setup.run_dir, config)
    log = MetricsLog(setup.run_dir, keep_rows=state.metrics_rows if ckpt is not None else None)  # may refuse
    if ckpt is not None:
        write_config(setup.run_dir, config)
    tracked = Trackers(args.log, setup.run_dir, config, resumed_at=state.step if ckpt is not None else 0)
    print(f"run {setup.run_dir}: {args.schedule}, {setup.epochs:g} epochs = {plan.run_steps} steps, curve points "
          f"at epochs {', '.join(f'{e:g}' for e in config['cycle_end_epochs'])}; methods "
          f"{', '.join(setup.methods) or 'none'}; {proc.device.type} x{proc.world_size}, "
          f"amp {setup.amp}" + (f"; resumed at step {state.step}" if ckpt is not None else ""))
    for m in methods.all:
        for key, value in m.config().items():
            if isinstance(value, list) and value:  # what a method changed, e.g. the layers BlurPool replaced
                print(f"{m.spec}: {key}: {', '.join(map(str, value))}")
    return log, tracked


# ---- building ----------------------------------------------------------------------------------

def build_run(args, setup, methods, device, rank, world_size, data=None):
    """(data, model, train loader): the data (or `data`, already built from these options), the model with the
    methods' surgery on its device, checked by the methods; seeded so that every rank builds the same initial model.
    fail()s in one line."""
    configure_device(device, args.deterministic)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    try:
        data = data or run_data(args, device)
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


def run_data(args, device):
    """The run's dataset, as its data flags ask (build_data; DataError where it cannot be read)."""
    return build_data(args.dataset, args.data_dir, device, args.subset, args.download, args.workers,
                      augment=args.augment == "standard", decode=args.decode, image_size=args.image_size)


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
    scaler, autocast = precision.amp_context(setup.amp, device)
    return optimizer, scheduler, scaler, autocast


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


# ---- the loop ----------------------------------------------------------------------------------

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
    """The training loop and what it needs; one object so the loop reads without a dozen arguments. Its two
    services: the evaluations and rows (Evaluator), the path's checkpoints and wsd snapshots (Checkpoints)."""

    def __init__(self, args, setup, plan, data, loader, model, raw_model, optimizer, scheduler, scaler, methods,
                 autocast, rank, world_size, ddp, device, log, tracked, flops, compile_dynamic=None):
        self.args, self.setup, self.plan, self.data, self.loader = args, setup, plan, data, loader
        self.compile_dynamic = compile_dynamic  # config.json's, kept in the checkpoint too
        self.model, self.raw_model, self.optimizer, self.scheduler, self.scaler = (model, raw_model, optimizer,
                                                                                   scheduler, scaler)
        self.methods, self.autocast, self.tracked = methods, autocast, tracked
        self.rank, self.world_size, self.ddp, self.device, self.master = rank, world_size, ddp, device, rank == 0
        self.sf = plan.schedule == "schedule-free"
        self.stopped = 0  # the signal train() stopped on at a checkpoint (STOP), 0 where it ran to the end
        self.evaluator = Evaluator(self, log, flops)
        self.checkpoints = Checkpoints(self)
        spe = loader.steps_per_epoch
        every = round(setup.eval_every * spe) if setup.eval_every else 0
        # evaluations on the trunk (every run but wsd: the whole run); a wsd branch is evaluated at its end
        self.trunk_evals = set(range(every, plan.total_steps, every)) if every else set()
        if plan.schedule != "wsd":
            self.trunk_evals |= self.evaluator.curve_points | {plan.total_steps}

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
                state.trunk = self.checkpoints.snapshot(state, loss_sum)
                clock.start()
            for path_step, x, y in itertools.islice(stream, seg.end - at):  # this segment's steps
                lr, first_bad = self.step(state, x, y, self.context(path_step), loss_sum, first_bad, loss_window)
                bar.update(1)
                # -- 3. evaluate and log at the curve points; checkpoint after that or every few minutes
                done = path_step + 1
                row_due = done == seg.end if seg.kind == "branch" else done in self.trunk_evals
                due, stop = save_or_stop(a, last_save, state.step, self.ddp, self.device, self.master)
                if row_due or due or stop:
                    clock.pause(state)
                    state.loss_sum = self.check_finite(first_bad, loss_sum)
                    state.loss_window = loss_window.tolist()
                    if row_due:
                        self.evaluator.evaluate_and_log(state, seg, done, lr)
                        loss_sum.zero_()
                    if seg.kind == "branch" and done == seg.end and state.step < plan.run_steps:  # back to the trunk
                        # (after the last branch the run is over: last.pt keeps the model of the last row)
                        state.loss_sum = self.checkpoints.restore_snapshot(state)
                        loss_sum.fill_(state.loss_sum)
                        loss_window = self.window_tensor(state)
                    self.checkpoints.save(state)
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
        contexts = [self.context(path_step)]
        if self.setup.compile and self.methods.resizes:  # every image size the run trains at compiled now, in start-up
            contexts += run_side_contexts(self.plan, self.methods, self.data, self.loader.steps_per_epoch).values()
        for ctx in contexts:
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

    def check_finite(self, first_bad, loss_sum):
        """Stop with the earliest non-finite step over all ranks; returns this rank's loss sum as a float."""
        bad = reduced_min(first_bad, self.ddp)
        if bad < NO_STEP:
            lr = schedules.lr_at(self.plan, bad, self.setup.sf_lr if self.sf else self.args.lr, self.args.eta_min)
            fail(f"non-finite training loss at step {bad + 1} (lr {lr:.6g}); the last good checkpoint is kept; "
                 f"lower --lr, use --amp bf16/none, or allow a few with --skip-nonfinite N", code=3)
        return loss_sum.item()


def save_or_stop(args, last_save, step, ddp, device, master):
    """(checkpoint due, signal to stop on or 0) after `step`: --checkpoint-every by rank 0's clock, a signal on any
    rank (STOP). Without DDP at every step; under DDP every 25 steps, decided together (MAX over the ranks) so that
    all save and stop at the same step: a signal is acted on within 25 steps (plus an evaluation due in between, and
    the checkpoint's write)."""
    every = args.checkpoint_every
    due = bool(every) and time.monotonic() - last_save >= 60 * every
    if not ddp:
        return due, STOP.signum
    if step % 25:
        return False, 0
    votes = torch.tensor([float(due and master), float(STOP.signum)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes[0].item()), int(votes[1].item())


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


# ---- evaluation and the metrics rows -----------------------------------------------------------

class Evaluator:
    """The run's evaluations: validation at a point of the run (schedule-free's averaged weights, a method's
    evaluation weights), and the metrics row of what was trained since the last one, logged by rank 0."""

    def __init__(self, run, log, flops):
        self.run, self.log, self.flops = run, log, flops
        self.curve_points = set(run.plan.cycle_end_steps())

    def evaluate_and_log(self, state, seg, done, lr):
        """Validate, append the metrics row (rank 0), reset the row's accumulators."""
        r, t_eval = self.run, time.perf_counter()
        a = r.args
        window = [v for v in state.loss_window or () if math.isfinite(v)]
        sums = torch.tensor([state.loss_sum, state.loss_steps, sum(window), len(window)], dtype=torch.float64,
                            device=r.device)
        if r.ddp:
            dist.all_reduce(sums)
        val = self.evaluate_point(done)
        spe, plan = r.loader.steps_per_epoch, r.plan
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
        if r.device.type == "cuda":
            row["peak_mem_gb"] = f"{torch.cuda.max_memory_allocated(r.device) / 2**30:.2f}"
        if r.master:
            self.log.append(row)
            r.tracked.row(state.step, row)
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
        r = self.run
        micro = micro_batch_size(r.args, r.world_size)
        if not r.sf:
            with r.methods.eval_weights(r.raw_model):  # e.g. EMA's averaged weights, put back after
                return evaluate(r.raw_model, r.data, r.rank, r.world_size, micro, r.autocast, r.methods, r.ddp)
        with weights_kept(r.raw_model):
            r.optimizer.eval()
            recompute_bn(r.raw_model, r.loader, done, r.methods, r.autocast, r.ddp)
            with r.methods.eval_weights(r.raw_model):
                val = evaluate(r.raw_model, r.data, r.rank, r.world_size, micro, r.autocast, r.methods, r.ddp)
            r.optimizer.train()
        return val


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


# ---- checkpoints and wsd snapshots: one path state, saved and restored side by side ----------

class Checkpoints:
    """The current model's path state: copied at a wsd branch point (the trunk) and put back after the branch,
    saved as a checkpoint after evaluations, restored by restore_checkpoint."""

    def __init__(self, run):
        self.raw_model, self.optimizer, self.scheduler, self.scaler, self.methods = (
            run.raw_model, run.optimizer, run.scheduler, run.scaler, run.methods)
        self.args, self.setup, self.ddp, self.master = run.args, run.setup, run.ddp, run.master
        self.compile_dynamic = run.compile_dynamic

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
    """Put back what Checkpoints.path_state captured: model, optimizer, scaler, methods, RNG; returns its ROW_FIELDS."""
    raw_model.load_state_dict(path["model"])
    optimizer.load_state_dict(path["optimizer"])
    scaler.load_state_dict(path["scaler"])
    methods.load_state_dict(path.get("methods"))  # checkpoints before the method API: methods without state
    restore_rng(path["rng"])
    return {k: path[k] for k in ROW_FIELDS}


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


def restore_checkpoint(ckpt, raw_model, optimizer, scheduler, scaler, methods, rank):
    """Load what Checkpoints.save wrote; returns the TrainState to continue from."""
    mine = dict(ADDED_PER_RANK, **(ckpt["ranks"][rank] if rank < len(ckpt["ranks"]) else ckpt["ranks"][0]))
    path = dict(ckpt, path_time=ckpt["train_time_s"], **{k: mine[k] for k in PER_RANK})
    row = load_path(path, raw_model, optimizer, scaler, methods)
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    trunk = None if ckpt["trunk"] is None else dict(ckpt["trunk"], **dict(ADDED_PER_RANK, **mine["trunk"]))
    return TrainState(step=ckpt["step"], cost_time=ckpt["curve_cost_s"], startup_time=ckpt.get("startup_s", 0.0),
                      metrics_rows=ckpt["metrics_rows"], skipped=ckpt["skipped_steps"], trunk=trunk, **row)


if __name__ == "__main__":
    STOP.until_exit = True  # the process ends with the run: a stop's repeated SIGTERMs stay ignored to the exit
    main()
