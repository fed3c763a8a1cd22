"""Train one network and write one run directory (the run format: docs/run-format.md).

    python train.py                                   # small ResNet, Fashion-MNIST, cyclic, 3 cycles
    torchrun --nproc_per_node=8 train.py --data imagenet --data-dir /data/imagenet --model resnet50 ...

DDP comes from the torchrun environment (NCCL on CUDA, gloo on CPU); only rank 0 writes files.
The LR follows schedules.py and is stepped once per optimizer step; validation runs at every
curve point (cycle ends, budgets), at the end, and every --eval-every epochs; checkpoints are written
after every evaluation and every --checkpoint-every minutes between them.
"""
import argparse
import contextlib
import copy
import itertools
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import schedules
from analysis.runs import ADDED_DEFAULTS
from data import DATASETS, DataError, build_data
from methods import (BLURPOOL_MODES, SHORT, Objective, blurred_layers, prepare_model, selected_methods,
                     to_channels_last)
from models import SMALL_RESNET, build_model, parse_model_kwargs
from rundir import (MetricsLog, RunDirError, check_writable, checkpoint_files, holds_run, is_done, load_checkpoint,
                    lock_run_dir, mark_done, metrics_rows, recorded_options, remove_run, save_checkpoint, write_config)

# Options that define the result: a resume with any of them changed is refused. eval_every: the rows --metric max
# takes its peak from; tf32 and deterministic: the GPU's arithmetic; device_name: the speed of train_time_s;
# cooldown_version: wsd's cooldown formula (2: its last step at eta_min; runs without the key used 1).
RESULT_KEYS = ("dataset", "data_dir", "subset", "model", "schedule", "epochs", "warmup_epochs", "t0", "t_mult",
               "eta_min", "batch_size", "grad_accum", "world_size", "lr", "momentum", "nesterov", "weight_decay",
               "amp", "methods", "label_smoothing", "mixup", "seed", "compile", "cycle_decay", "cooldown_frac",
               "cooldown_shape", "sf_lr", "sf_warmup_epochs", "blurpool_mode", "family_t0", "family_t_mult",
               "eval_every", "model_kwargs", "tf32", "deterministic", "device_name", "cooldown_version", "opt",
               "opt_betas", "opt_eps", "decay_exclusions", "clip_grad")
NO_STEP = 2 ** 62  # "no non-finite step yet"
# --opt: timm's optimizers that take momentum (sgdw) or betas (the others); weight decay is decoupled in all four
OPTIMIZERS = ("sgdw", "adamw", "lamb", "lion")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", dest="dataset", default="fashion-mnist", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data-dir", default=None, help="dataset folder (default for fashion-mnist: Debian's package)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-dir")
    g.add_argument("--subset", type=int, default=0, help="train on N images only (0: all)")
    g.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank (imagenet)")
    g.add_argument("--model", default=SMALL_RESNET, help=f"{SMALL_RESNET} or any timm model name")
    g.add_argument("--model-kwargs", default="", metavar="K=V,...",
                   help="options for timm.create_model, e.g. drop_rate=0.1,drop_path_rate=0.1,img_size=32")
    g = p.add_argument_group("schedule (periods in epochs, applied per optimizer step)")
    g.add_argument("--schedule", default="cyclic", help=" | ".join(schedules.SCHEDULES))
    g.add_argument("--epochs", type=float, default=None, help="total epochs (all but standard: must end a cycle)")
    g.add_argument("--cycles", type=int, default=None, help="number of cycles (budgets), instead of --epochs (3)")
    g.add_argument("--warmup-epochs", type=float, default=0.5)
    g.add_argument("--t0", type=float, default=0.5, help="first cycle's period")
    g.add_argument("--t-mult", type=int, default=None, help="period multiplier (default 2; constant: 1)")
    g.add_argument("--eta-min", type=float, default=0.0)
    g.add_argument("--cycle-decay", type=float, default=0.7, metavar="GAMMA",
                   help="cyclic-decay: peak of cycle i is lr * GAMMA^i")
    g.add_argument("--cooldown-frac", type=float, default=0.2, metavar="F",
                   help="wsd: each budget T's cooldown branch starts at (1 - F) T")
    g.add_argument("--cooldown-shape", default="1-sqrt", help="wsd: 1-sqrt | linear")
    g.add_argument("--sf-lr", type=float, default=None, help="schedule-free: its LR (default 5 x --lr)")
    g.add_argument("--sf-warmup-epochs", type=float, default=None,
                   help="schedule-free: its linear warmup (default --warmup-epochs)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256, help="global batch per optimizer step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--opt", default="sgdw", help=f"optimizer from timm: {' | '.join(OPTIMIZERS)}")
    g.add_argument("--opt-betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="adamw, lamb, lion: betas (default: the optimizer's own)")
    g.add_argument("--opt-eps", type=float, default=None, help="adamw, lamb: epsilon (default: the optimizer's own)")
    g.add_argument("--decay-exclusions", default="auto", help="auto | on | off: no weight decay on biases and "
                   "normalisation weights (timm's convention); auto: on iff the model has no BatchNorm (ViTs, also "
                   "ConvNeXt, NFNets); off for BatchNorm models, as all runs before the flag")
    g.add_argument("--clip-grad", type=float, default=0.0, metavar="NORM",
                   help="clip the global gradient norm to NORM (after fp16 unscaling, on the all-reduced gradient); "
                        "0: off")
    g.add_argument("--lr", type=float, default=0.4, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--weight-decay", type=float, default=5e-4, help="decoupled: per-step decay is wd * lr / peak lr")
    g.add_argument("--amp", default="auto", help="auto | none | bf16 | fp16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--deterministic", action="store_true",
                   help="GPU: no TF32, no cudnn autotuning, deterministic kernels (slower; bitwise-exact resume)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("methods")
    g.add_argument("--blurpool", action="store_true", help="anti-aliased downsampling (BlurPool)")
    g.add_argument("--blurpool-mode", default="blur-first",
                   help="blur-first: a stride-1 blur, then the strided layer (the paper's, Composer's default); "
                        "conv-first: the layer at stride 1, then a strided blur (x1.95 forward FLOPs on the "
                        "small ResNet, x1.48 on ResNet-50)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and batches")
    g.add_argument("--label-smoothing", type=float, nargs="?", const=0.1, default=0.0, metavar="EPS")
    g.add_argument("--mixup", type=float, nargs="?", const=0.2, default=0.0, metavar="ALPHA")
    g = p.add_argument_group("run directory and logging")
    g.add_argument("--run-dir", default=None,
                   help="default: runs/<dataset>_<model>_<schedule>-e<epochs>_<methods>_s<seed>")
    g.add_argument("--resume", nargs="?", const="must", default=None, metavar="auto",
                   help="continue the run in --run-dir; 'auto' starts fresh when there is no checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    g.add_argument("--eval-every", type=float, default=None,
                   help="epochs between extra evaluations (default: 1 for resident datasets, else curve points only)")
    g.add_argument("--checkpoint-every", type=float, default=30.0, metavar="MINUTES",
                   help="also checkpoint (and check for non-finite loss) this often between evaluations; 0: never")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--allow-device-change", action="store_true",
                   help="resume on another GPU or CPU model (its train_time_s then mixes two speeds)")
    g.add_argument("--no-lock", action="store_true",
                   help="no lock on --run-dir (for file systems without flock); nothing then stops a second writer")
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N optimizer steps whose loss is NaN/inf instead of stopping (checks every step)")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Setup:
    """What the options imply, derived once; config.json records these over the options of the same name."""
    epochs: float
    cycles: int
    t0: float  # as recorded: a standard run's one cosine period
    t_mult: int
    family_t0: float  # the cyclic shape whose budgets the run samples (a standard run's t0/t_mult as given)
    family_t_mult: int
    amp: str
    methods: list
    world_size: int
    eval_every: float
    run_dir: str
    sf_lr: float
    sf_warmup_epochs: float
    model_kwargs: dict  # --model-kwargs parsed
    tf32: bool  # matmuls and convolutions in TF32 (CUDA unless --deterministic): a precision of its own
    device_name: str  # the GPU's or the CPU's model: what the time axis was measured on
    cooldown_version: int  # wsd: schedules.COOLDOWN_VERSION; None for the other schedules


def fail(message, code=2, every_rank=False, options=False):
    """One line on stderr naming the flag and the fix, a non-zero exit; nothing written. options=True marks a
    refusal of the options themselves (a bad value, a run of other options): it would refuse every run of a sweep,
    so it is also written to $TRAIN_REFUSAL_FILE where launch.sh set one (torchrun turns every exit code into 1)."""
    rank = int(os.environ.get("RANK", 0))
    if rank == 0 or every_rank:
        where = f"rank {rank}: " if every_rank and int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"train.py: error: {where}{message}", file=sys.stderr)
    if options and os.environ.get("TRAIN_REFUSAL_FILE"):  # every rank: whichever the agent stops last
        with open(os.environ["TRAIN_REFUSAL_FILE"], "a") as f:
            f.write(message + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


def micro_batch_size(cfg, world_size):
    """Images per forward pass on one rank (before --grad-accum is validated, 0 counts as 1)."""
    return cfg.batch_size // (world_size * max(cfg.grad_accum, 1))


def resolve(args, world_size, device):
    """Validate every flag and derive the Setup; fail() on the first bad one."""
    a = args
    for name, value in sorted(vars(a).items()):  # before anything is written: inf and nan pass every bound below
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}", options=True)
    checks = [
        (a.dataset in DATASETS, f"--data: unknown dataset '{a.dataset}'; choose one of {', '.join(DATASETS)}"),
        (a.schedule in schedules.SCHEDULES,
         f"--schedule: unknown '{a.schedule}'; choose one of {', '.join(schedules.SCHEDULES)}"),
        (a.amp in ("auto", "none", "bf16", "fp16"), f"--amp: unknown '{a.amp}'; choose auto, none, bf16 or fp16"),
        (a.lr > 0, f"--lr must be a positive number, got {a.lr}"),
        (0 <= a.momentum < 1, f"--momentum must be in [0, 1), got {a.momentum}"),
        (a.opt in OPTIMIZERS, f"--opt: unknown '{a.opt}'; choose one of {', '.join(OPTIMIZERS)}"),
        (a.opt_betas is None or all(0 <= b < 1 for b in a.opt_betas),
         f"--opt-betas must be in [0, 1), got {a.opt_betas}"),
        (a.opt_betas is None or a.opt != "sgdw", "--opt-betas: sgdw has momentum, not betas; use --momentum"),
        (not (a.nesterov and a.opt != "sgdw"), f"--nesterov is sgdw's; {a.opt} takes --opt-betas"),
        (not (a.schedule == "schedule-free" and a.opt == "adamw" and a.opt_betas and a.opt_betas[0] == 0),
         "--opt-betas: schedule-free AdamW averages with beta1: it must be > 0"),
        (a.opt_eps is None or a.opt_eps > 0, f"--opt-eps must be positive, got {a.opt_eps}"),
        (a.opt_eps is None or a.opt in ("adamw", "lamb"), f"--opt-eps: {a.opt} takes no epsilon"),
        (a.decay_exclusions in ("auto", "on", "off"),
         f"--decay-exclusions: unknown '{a.decay_exclusions}'; choose auto, on or off"),
        (a.clip_grad >= 0, f"--clip-grad must be >= 0 (0: off), got {a.clip_grad}"),
        (not (a.schedule == "schedule-free" and a.opt not in ("sgdw", "adamw")),
         f"--schedule schedule-free has an SGD and an AdamW variant: use --opt sgdw or adamw, not {a.opt}"),
        (not (a.nesterov and a.momentum == 0), "--nesterov needs --momentum > 0"),
        (a.weight_decay >= 0, f"--weight-decay must be >= 0, got {a.weight_decay}"),
        (0 <= a.eta_min < a.lr, f"--eta-min must be in [0, --lr), got {a.eta_min}"),
        (a.batch_size > 0, f"--batch-size must be positive, got {a.batch_size}"),
        (a.grad_accum > 0, f"--grad-accum must be positive, got {a.grad_accum}"),
        (a.batch_size % (world_size * max(a.grad_accum, 1)) == 0,
         f"--batch-size {a.batch_size} is not divisible by world size {world_size} x --grad-accum {a.grad_accum}; "
         f"use a multiple of {world_size * max(a.grad_accum, 1)}"),
        (a.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {a.warmup_epochs}"),
        (a.t0 > 0, f"--t0 must be positive, got {a.t0}"),
        (a.t_mult is None or a.t_mult >= 1, f"--t-mult must be an integer >= 1, got {a.t_mult}"),
        (not (a.schedule == "constant" and a.t_mult not in (None, 1)),
         "--t-mult: a constant schedule has t_mult 1; drop --t-mult or use --schedule cyclic"),
        (a.cycles is None or a.cycles >= 1, f"--cycles must be >= 1, got {a.cycles}"),
        (a.epochs is None or a.epochs > 0, f"--epochs must be positive, got {a.epochs}"),
        (0 < a.cycle_decay <= 1, f"--cycle-decay must be in (0, 1], got {a.cycle_decay}"),
        (0 < a.cooldown_frac < 1, f"--cooldown-frac must be in (0, 1), got {a.cooldown_frac}"),
        (a.cooldown_shape in schedules.COOLDOWN_SHAPES,
         f"--cooldown-shape: unknown '{a.cooldown_shape}'; choose {' or '.join(schedules.COOLDOWN_SHAPES)}"),
        (a.sf_lr is None or a.sf_lr > 0, f"--sf-lr must be positive, got {a.sf_lr}"),
        (a.sf_warmup_epochs is None or a.sf_warmup_epochs >= 0,
         f"--sf-warmup-epochs must be >= 0, got {a.sf_warmup_epochs}"),
        (not (a.schedule == "schedule-free" and a.opt == "sgdw" and a.momentum == 0),
         "--schedule schedule-free needs --momentum > 0"),
        (a.blurpool_mode in BLURPOOL_MODES,
         f"--blurpool-mode: unknown '{a.blurpool_mode}'; choose {' or '.join(BLURPOOL_MODES)}"),
        (a.subset >= 0, f"--subset must be >= 0, got {a.subset}"),
        (a.workers >= 0, f"--workers must be >= 0, got {a.workers}"),
        (0 <= a.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {a.label_smoothing}"),
        (a.mixup >= 0, f"--mixup must be >= 0, got {a.mixup}"),
        (not (a.mixup > 0 and micro_batch_size(a, world_size) % 2),
         "--mixup needs an even micro-batch (batch / (world size x grad-accum))"),
        (a.eval_every is None or a.eval_every >= 0, f"--eval-every must be >= 0, got {a.eval_every}"),
        (a.checkpoint_every >= 0, f"--checkpoint-every must be >= 0 minutes, got {a.checkpoint_every}"),
        (a.skip_nonfinite >= 0, f"--skip-nonfinite must be >= 0, got {a.skip_nonfinite}"),
        (not (a.amp == "fp16" and device.type == "cpu"),
         "--amp fp16 needs a CUDA device; use --amp bf16 or none on CPU"),
        (not (a.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported()),
         "--amp bf16: this GPU has no bf16; use --amp fp16 (or auto)"),
        (not (a.resume and a.overwrite), "--resume and --overwrite exclude each other; pick one"),
        (a.resume in (None, "must", "auto"), f"--resume takes no value or 'auto', got '{a.resume}'"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message, options=True)
    if a.schedule == "schedule-free":
        try:
            import schedulefree  # noqa: F401
        except ImportError:
            fail("--schedule schedule-free needs the schedulefree package: pip install -r requirements.txt",
                 options=True)
    t_mult = 1 if a.schedule == "constant" else (a.t_mult or 2)
    if a.schedule == "standard":  # the epochs of the cyclic run's cycles, if given as --cycles
        epochs, cycles = a.epochs or schedules.cyclic_epochs(a.warmup_epochs, a.t0, t_mult, a.cycles or 3), 1
    elif a.epochs is None:
        cycles = a.cycles or 3
        epochs = schedules.cyclic_epochs(a.warmup_epochs, a.t0, t_mult, cycles)
    else:
        epochs = a.epochs
        try:
            cycles = schedules.cycles_for_epochs(a.warmup_epochs, a.t0, t_mult, a.epochs)
        except ValueError as e:
            fail(str(e), options=True)
        if a.cycles not in (None, cycles):
            fail(f"--cycles {a.cycles} disagrees with --epochs {a.epochs:g} ({cycles} cycles); give only one of them",
                 options=True)
    if a.warmup_epochs >= epochs:
        fail(f"--warmup-epochs {a.warmup_epochs:g} must be shorter than the run ({epochs:g} epochs)", options=True)
    if a.schedule == "schedule-free" and (a.sf_warmup_epochs or 0) >= epochs:
        fail(f"--sf-warmup-epochs {a.sf_warmup_epochs:g} must be shorter than the run ({epochs:g} epochs): the LR "
             f"would never reach its peak", options=True)
    amp = auto_precision(device) if a.amp == "auto" else a.amp
    methods = selected_methods(a)
    try:
        model_kwargs = parse_model_kwargs(a.model_kwargs)
    except ValueError as e:
        fail(str(e), options=True)
    standard = a.schedule == "standard"  # recorded shape: one cosine period over the rest of the run
    return Setup(epochs=epochs, cycles=cycles, t0=epochs - a.warmup_epochs if standard else a.t0,
                 t_mult=1 if standard else t_mult, family_t0=a.t0, family_t_mult=t_mult, amp=amp, methods=methods,
                 world_size=world_size, eval_every=a.eval_every if a.eval_every is not None else
                 (0.0 if a.dataset == "imagenet" else 1.0),
                 run_dir=a.run_dir or default_run_dir(a, epochs, methods),
                 sf_lr=a.sf_lr or 5 * a.lr, sf_warmup_epochs=a.warmup_epochs if a.sf_warmup_epochs is None
                 else a.sf_warmup_epochs, model_kwargs=model_kwargs,
                 tf32=device.type == "cuda" and not a.deterministic, device_name=hardware_name(device),
                 cooldown_version=schedules.COOLDOWN_VERSION if a.schedule == "wsd" else None)


def device_history(setup, ckpt):
    """Every GPU or CPU model the run has trained on (more than one only through --allow-device-change)."""
    before = [] if ckpt is None else [ckpt["config"].get("device_name"),
                                      *(recorded_options(setup.run_dir) or {}).get("device_names", [])]
    return sorted({setup.device_name, *filter(None, before)})


def hardware_name(device):
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo; the platform's words elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def auto_precision(device):
    """What --amp auto means on `device`: bf16 where it is native, else fp16 with a GradScaler (GPU) or fp32 (CPU)."""
    if device.type == "cuda":
        return "bf16" if gpu_has_native_bf16() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "none"


def gpu_has_native_bf16():
    """bf16 in hardware (Ampere and later): torch's default check also counts pre-Ampere GPUs, which emulate it
    slowly, where fp16 with a GradScaler is the right choice. Asked after set_device: of this rank's GPU."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_has_native_bf16():
    """bf16 in hardware: AVX512-BF16 or AMX on x86 (mkldnn's own check also counts AVX-512 alone, where bf16 is
    emulated and slower than fp32), and the bf16 extension on Arm (mkldnn checks exactly that there)."""
    if platform.machine() in ("aarch64", "arm64"):
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def default_run_dir(args, epochs, methods):
    label = "+".join(SHORT[m] for m in methods) or "baseline"
    return os.path.join("runs", f"{args.dataset}_{args.model}_{args.schedule}-e{epochs:g}_{label}_s{args.seed}")


def resume_decision(args, setup, master):
    """Read run_dir and decide: (checkpoint to resume or None, whether to wipe the old run first).
    Exits 0 for a finished run of the same options under --resume, and fail()s on anything that would lose or mix
    results: other options, a damaged metrics.csv, a folder that is not provably an empty start of this run."""
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
    from_config = recorded_options(run_dir)
    recorded = None if ckpt is None and from_config is None else {**ADDED_DEFAULTS, **(from_config or {}),
                                                                  **(ckpt["config"] if ckpt is not None else {})}
    done = is_done(run_dir)
    if recorded is not None:
        # a finished run made elsewhere stays valid: the folder of a dataset that has one known content (not an
        # ImageFolder tree: there the folder is the dataset), and the precision --amp auto chose on that host
        argv = (from_config or {}).get("argv") or []
        asked_amp = argv[argv.index("--amp") + 1] if "--amp" in argv[:-1] else "auto"
        # the hardware: tf32 follows it (CPU or GPU); each rank knows only its own GPU, so rank 0's decides
        hardware = ("device_name", "tf32")
        host = ((("data_dir",) * (args.dataset != "imagenet") + hardware + ("amp",) * (args.amp == asked_amp == "auto")
                 if done else ()) + hardware * args.allow_device_change + hardware * (not master))
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


def result_options(args, setup):
    merged = {**vars(args), **asdict(setup)}
    return {k: merged[k] for k in RESULT_KEYS}


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


HELD_LOCKS = []  # the lock files run_main holds


def run_main(argv=None):
    args = parse_args(argv)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    local_rank, master = int(os.environ.get("LOCAL_RANK", 0)), rank == 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # before any CUDA question: otherwise every rank makes a context on GPU 0
        torch.cuda.set_device(device)
    setup = resolve(args, world_size, device)
    check_writable(setup.run_dir)  # before anything slow is loaded
    # One writer per run directory: rank 0 holds its lock from before it reads the folder to the end of the
    # run (a folder that does not exist yet holds nothing to read, and is created only once the flags pass).
    locking = master and not args.no_lock
    if locking and os.path.isdir(setup.run_dir):
        HELD_LOCKS.append(lock_run_dir(setup.run_dir))
    ckpt, wipe = resume_decision(args, setup, master)  # every rank decides alike: they all read the same files
    configure_device(device, args.deterministic)
    torch.manual_seed(args.seed)  # every rank builds the same initial model
    random.seed(args.seed)
    np.random.seed(args.seed)

    try:
        data = build_data(args.dataset, args.data_dir, device, args.subset, args.download, args.workers)
        model = build_model(args.model, data.num_classes, data.in_chans, setup.model_kwargs)
    except (DataError, ValueError) as e:
        fail(str(e), options=True)
    loader = data.train_loader(args.batch_size, rank, world_size, args.seed)
    spe = loader.steps_per_epoch
    if spe < 1:
        fail(f"--batch-size {args.batch_size} is larger than the training set; lower it or drop --subset", options=True)
    plan = make_plan(args, setup, spe)
    if locking and not HELD_LOCKS:
        HELD_LOCKS.append(lock_run_dir(setup.run_dir))
    if master and not locking:
        os.makedirs(setup.run_dir, exist_ok=True)
    model = prepare_model(model, args).to(device)
    replaced = blurred_layers(model)
    without_effect = sorted(m for m, none in (("blurpool", args.blurpool and not replaced),
                                              ("channels_last", args.channels_last and not any(
                                                  isinstance(x, torch.nn.Conv2d) for x in model.modules())))
                            if none)
    if master and without_effect:  # as Composer's NoEffectWarning: the set is run, and says what it is
        print(f"warning: {', '.join(without_effect)} changed nothing in {args.model} (no strided convolution or "
              f"max-pool to blur, or no convolution for a memory format); recorded in config.json as "
              f"methods_without_effect")
    raw_model = model
    exclusions = decay_exclusions(args, model)
    if ckpt is not None and "decay_exclusions" not in ckpt["config"] and exclusions:
        fail(f"--resume: {setup.run_dir} predates --decay-exclusions and decayed every parameter, which auto no "
             f"longer does for {args.model}; resume it with --decay-exclusions off")
    if master and args.opt != "sgdw" and args.weight_decay / args.lr > 1:  # AdamW's usual 0.05 means 0.05 x lr here
        print(f"warning: --weight-decay {args.weight_decay:g} is the decay per step at the peak LR: {args.opt} will "
              f"shrink the weights by {args.weight_decay:.0%} a step (torch's AdamW weight_decay w is --weight-decay "
              f"w x --lr here)")
    optimizer = build_optimizer(model, args, setup, plan, exclusions)
    scheduler = schedules.build_scheduler(optimizer, plan, args.eta_min)
    scaler = torch.amp.GradScaler(device.type, enabled=setup.amp == "fp16")
    objective = Objective(args, data.num_classes)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setup.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    state = TrainState()
    if ckpt is not None:
        state = restore_checkpoint(ckpt, raw_model, optimizer, scheduler, scaler, rank)
    else:  # the model-side RNG (dropout, drop-path) differs per rank; rank 0 keeps the seed
        torch.manual_seed(args.seed if rank == 0 else hash((args.seed, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
    if ddp:
        init_distributed(device, rank, world_size)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                          else None)
    if args.compile:  # the DDP-wrapped model, as PyTorch advises: the compiler then overlaps all-reduce and backward
        model = torch.compile(model)

    config = {**vars(args), **asdict(setup), "steps_per_epoch": spe, "total_steps": plan.total_steps,
              "run_steps": plan.run_steps, "cycle_end_epochs": [s / spe for s in plan.cycle_end_steps()],
              "speedup_ratio_eq1": schedules.eq1_ratio(schedules.cycle_end_epochs(
                  args.warmup_epochs, setup.family_t0, setup.family_t_mult, setup.cycles)),
              "blurpool_layers": replaced, "device": device.type, "torch_version": torch.__version__,
              "cuda_version": torch.version.cuda if device.type == "cuda" else None, "decay_excluded": exclusions,
              "methods_without_effect": without_effect,
              "device_names": device_history(setup, ckpt),
              "argv": sys.argv[1:] if argv is None else list(argv)}
    log = None
    if master:
        if wipe:
            remove_run(setup.run_dir)
        if ckpt is None:  # config.json first: the folder says whose it is before anything else is in it
            write_config(setup.run_dir, config)
        log = MetricsLog(setup.run_dir, keep_rows=state.metrics_rows if ckpt is not None else None)  # may refuse
        if ckpt is not None:  # after MetricsLog has checked the rows it keeps
            write_config(setup.run_dir, config)
        print(f"run {setup.run_dir}: {args.schedule}, {setup.epochs:g} epochs = {plan.run_steps} steps, curve points "
              f"at epochs {', '.join(f'{e:g}' for e in config['cycle_end_epochs'])}; methods "
              f"{', '.join(setup.methods) or 'none'} (label smoothing eps {objective.label_smoothing:g}, mixup alpha "
              f"{objective.mixup_alpha:g}); {device.type} x{world_size}, "
              f"amp {setup.amp}" + (f"; resumed at step {state.step}" if ckpt is not None else ""))
        if replaced:
            print(f"blurpool ({args.blurpool_mode}) on {len(replaced)} layers: {', '.join(replaced)}")

    run = Run(args, setup, plan, data, loader, model, raw_model, optimizer, scheduler, scaler, objective, autocast,
              rank, world_size, ddp, device, log)
    steps_here = run.train(state)
    if master:
        mark_done(setup.run_dir)
        print(f"done: {setup.run_dir}, {state.cost_time:.1f}s of training, {steps_here} optimizer steps in this "
              f"process")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


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
    images: int = 0  # images trained since the last row, and the seconds they took
    row_time: float = 0.0
    trunk: dict = None  # wsd, inside a branch: the trunk's state at the branch point, restored after it


class Run:
    """The training loop and what it needs; one object so the loop reads without a dozen arguments."""

    def __init__(self, args, setup, plan, data, loader, model, raw_model, optimizer, scheduler, scaler, objective,
                 autocast, rank, world_size, ddp, device, log):
        self.args, self.setup, self.plan, self.data, self.loader = args, setup, plan, data, loader
        self.model, self.raw_model, self.optimizer, self.scheduler, self.scaler = (model, raw_model, optimizer,
                                                                                   scheduler, scaler)
        self.objective, self.autocast, self.log = objective, autocast, log
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

    def train(self, state):
        """Run the plan from state.step to the end; returns the optimizer steps taken by this process."""
        a, plan, spe = self.args, self.plan, self.loader.steps_per_epoch
        first_step = state.step
        first_bad = torch.full((), NO_STEP, dtype=torch.long, device=self.device)  # earliest non-finite step
        loss_sum = torch.full((), state.loss_sum, device=self.device)  # summed on the device: no sync per step
        started = time.perf_counter()
        stream = self.warm_up(state) if state.step < plan.run_steps else None
        state.startup_time += time.perf_counter() - started  # start-up: its own column, off the training clock
        clock = Clock(self.device)
        last_save = time.monotonic()
        bar = tqdm(total=plan.run_steps, initial=state.step, disable=not self.master or a.no_progress, unit="step",
                   dynamic_ncols=True, leave=False)
        while state.step < plan.run_steps:
            seg, at = plan.segment_at(state.step)
            if seg.kind == "branch" and state.trunk is None:  # wsd: keep the trunk, train a copy down to 0
                clock.pause(state)  # the trunk's time so far belongs to the snapshot
                state.trunk = self.snapshot(state, loss_sum)
                clock.start()
            for path_step, x, y in stream or batches(self.loader, at, seg.end):
                # -- 1. learning rate: the scheduler set it for this step (schedule-free: the optimizer does)
                lr = self.optimizer.param_groups[0]["lr"]
                # -- 2. forward, backward, update
                loss = train_step(self.model, self.optimizer, self.scaler, self.objective, self.autocast, x, y,
                                  a.grad_accum, self.ddp, (path_step, self.rank),
                                  check_finite=state.skipped < a.skip_nonfinite, clip_grad=a.clip_grad)
                if self.sf:
                    lr = self.optimizer.param_groups[0]["scheduled_lr"]
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
                bar.update(1)
                # -- 3. evaluate and log at the curve points; checkpoint after that or every few minutes
                done = path_step + 1
                row_due = done == seg.end if seg.kind == "branch" else done in self.trunk_evals
                save_due = row_due or self.checkpoint_due(last_save, state.step)
                if save_due:
                    clock.pause(state)
                    state.loss_sum = self.check_finite(first_bad, loss_sum)
                    if row_due:
                        self.evaluate_and_log(state, seg, done, lr)
                        loss_sum.zero_()
                    if seg.kind == "branch" and done == seg.end and state.step < plan.run_steps:  # back to the trunk
                        # (after the last branch the run is over: last.pt keeps the model of the last row)
                        state.loss_sum = self.restore_snapshot(state)
                        loss_sum.fill_(state.loss_sum)
                    self.save(state)
                    last_save = time.monotonic()
                    clock.start()
                # -- 4. progress
                if self.master and not a.no_progress and (state.step % 25 == 0 or row_due):
                    bar.set_postfix(epoch=f"{done / spe:.2f}", lr=f"{lr:.4f}",
                                    loss=f"{loss_sum.item() / max(state.loss_steps, 1):.4f}",
                                    img_s=f"{state.images / max(state.row_time + clock.elapsed(), 1e-9):.0f}")
            stream = None
        bar.close()
        return state.step - first_step

    def warm_up(self, state):
        """This process's start-up, timed apart into startup_s: the data pipeline's first batch, then one forward
        and backward pass on it (torch.compile, cudnn autotuning, allocator growth), undone (weights, BatchNorm
        statistics, gradients, RNG), so that train_time_s counts training only, each standard run and the cyclic
        run alike, and a resumed process's compilation too. Returns the batches of the current segment."""
        seg, at = self.plan.segment_at(state.step)
        stream = batches(self.loader, at, seg.end)
        path_step, x, y = first = next(stream)
        rng = rng_state()
        with weights_kept(self.raw_model):
            self.model.train()
            xm, ym = self.objective.prepare(x.chunk(self.args.grad_accum)[0].clone(),  # MixUp mixes in place
                                            y.chunk(self.args.grad_accum)[0], (path_step, self.rank, 0))
            with (self.model.no_sync() if self.ddp else contextlib.nullcontext()), self.autocast:
                loss = self.objective.loss(self.model(xm), ym)
            self.scaler.scale(loss).backward()
            self.optimizer.zero_grad(set_to_none=True)
        restore_rng(rng)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)  # peak_mem_gb: training's, not the start-up's
        return itertools.chain([first], stream)

    def checkpoint_due(self, last_save, step):
        """--checkpoint-every: rank 0's clock decides, every 25 steps under DDP so that ranks agree."""
        if not self.args.checkpoint_every:
            return False
        if not self.ddp:
            return time.monotonic() - last_save >= 60 * self.args.checkpoint_every
        if step % 25:
            return False
        due = torch.tensor(float(time.monotonic() - last_save >= 60 * self.args.checkpoint_every), device=self.device)
        dist.broadcast(due, 0)
        return bool(due.item())

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
        t_eval = time.perf_counter()
        sums = torch.tensor([state.loss_sum, state.loss_steps], dtype=torch.float64, device=self.device)
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
                   cycle=seg.branch if seg.kind == "branch" else plan.cycle_of_step(done - 1),
                   cycle_end=int(curve_point or (done == plan.total_steps and plan.schedule != "wsd")),
                   images_per_s=f"{state.images / max(state.row_time, 1e-9):.1f}", skipped_steps=state.skipped,
                   eval_time_s=f"{time.perf_counter() - t_eval:.3f}")
        if self.device.type == "cuda":
            row["peak_mem_gb"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f}"
        if self.master:
            self.log.append(row)
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
            return evaluate(self.raw_model, self.data, self.rank, self.world_size, self.micro_batch(), self.autocast,
                            self.args.channels_last, self.ddp)
        with weights_kept(self.raw_model):
            self.optimizer.eval()
            recompute_bn(self.raw_model, self.loader, done, self.objective, self.autocast, self.ddp)
            val = evaluate(self.raw_model, self.data, self.rank, self.world_size, self.micro_batch(), self.autocast,
                           self.args.channels_last, self.ddp)
            self.optimizer.train()
        return val

    def micro_batch(self):
        return micro_batch_size(self.args, self.world_size)

    # ---- checkpoints and wsd snapshots: one path state, saved and restored side by side ----------

    def path_state(self, state):
        """The current model's path: model (BN buffers too), optimizer, scaler, RNG and the open row's sums.
        A wsd branch point keeps a copy (the trunk); a checkpoint saves it, PER_RANK parts gathered."""
        return dict(model=self.raw_model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict(), rng=rng_state(),
                    **{k: getattr(state, k) for k in ROW_FIELDS})

    def snapshot(self, state, loss_sum):
        """The trunk at a branch point (a deep copy: the branch trains the live model on)."""
        state.loss_sum = float(loss_sum)
        return copy.deepcopy(self.path_state(state))

    def restore_snapshot(self, state):
        """Put the trunk back after its branch; returns its row's loss sum."""
        t, state.trunk = state.trunk, None
        for k, v in load_path(t, self.raw_model, self.optimizer, self.scaler).items():
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
            skipped_steps=state.skipped, ranks=ranks, trunk=trunk, config=result_options(self.args, self.setup)))


@contextlib.contextmanager
def weights_kept(model):
    """Whatever runs inside leaves `model`'s parameters and buffers bit for bit as they were: a copy, kept on the
    CPU (off the GPU's memory), put back at the end."""
    saved = {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(saved)


ROW_FIELDS = ("loss_sum", "loss_steps", "images", "row_time", "path_time")  # TrainState fields a path carries
PER_RANK = ("rng", "loss_sum", "loss_steps")  # path parts that differ between DDP ranks


def load_path(path, raw_model, optimizer, scaler):
    """Put back what Run.path_state captured: model, optimizer, scaler, RNG; returns its ROW_FIELDS."""
    raw_model.load_state_dict(path["model"])
    optimizer.load_state_dict(path["optimizer"])
    scaler.load_state_dict(path["scaler"])
    restore_rng(path["rng"])
    return {k: path[k] for k in ROW_FIELDS}


def restore_checkpoint(ckpt, raw_model, optimizer, scheduler, scaler, rank):
    """Load what Run.save wrote; returns the TrainState to continue from."""
    mine = ckpt["ranks"][rank] if rank < len(ckpt["ranks"]) else ckpt["ranks"][0]
    path = dict(ckpt, path_time=ckpt["train_time_s"], **{k: mine[k] for k in PER_RANK})
    row = load_path(path, raw_model, optimizer, scaler)
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    trunk = None if ckpt["trunk"] is None else dict(ckpt["trunk"], **{k: mine["trunk"][k] for k in PER_RANK})
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


def batches(loader, start, end):
    """(path step, x, y) for path steps [start, end), across epochs; data depend on the path step alone."""
    spe, step = loader.steps_per_epoch, start
    while step < end:
        for x, y in loader.epoch(step // spe, step % spe):
            yield step, x, y
            step += 1
            if step >= end or step % spe == 0:
                break


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
        if args.opt == "lamb":  # timm's Lamb clips gradients to 1.0 and couples its decay to the trust ratio unless
            extra.update(max_grad_norm=None, decoupled_decay=True)  # told: --clip-grad and one convention instead
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
        threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, cores // local_world)
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


def train_step(model, optimizer, scaler, objective, autocast, x, y, grad_accum, ddp, draw_key, check_finite=False,
               clip_grad=0.0):
    """One optimizer step over this rank's batch in `grad_accum` micro-steps; returns the mean loss
    (a device tensor: reading it would sync). DDP all-reduces gradients on the last micro-step only.
    With check_finite, a non-finite loss on any rank skips the update on all ranks, puts back the
    BatchNorm statistics the forward pass moved, and returns None: the step leaves no trace."""
    model.train()
    buffers = [b.clone() for b in model.buffers()] if check_finite else None
    total = torch.zeros((), device=x.device)
    for micro, (xm, ym) in enumerate(zip(x.chunk(grad_accum), y.chunk(grad_accum))):
        xm, ym = objective.prepare(xm, ym, (*draw_key, micro))
        sync = not ddp or micro == grad_accum - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
            loss = objective.loss(model(xm), ym) / grad_accum
        scaler.scale(loss).backward()
        total += loss.detach()
    if check_finite:
        finite = torch.isfinite(total).float()
        if ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
            return None
    if clip_grad:  # the whole step's gradient (DDP: all-reduced on the last micro-step), fp16's scale taken out
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def recompute_bn(model, loader, path_step, objective, autocast, ddp=False, batches_used=8):
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
    for i, (x, _) in enumerate(loader.epoch((path_step - 1) // loader.steps_per_epoch, 0)):
        if i == batches_used:
            break
        if objective.channels_last:
            x = to_channels_last(x)
        with autocast:
            model(x)
    for bn, m in zip(bns, momenta):
        bn.momentum = m
        if ddp and bn.track_running_stats:
            for stat in (bn.running_mean, bn.running_var):
                dist.all_reduce(stat)
                stat /= dist.get_world_size()


@torch.no_grad()
def evaluate(model, data, rank, world_size, batch_size, autocast, channels_last, ddp):
    """Plain cross-entropy and top-1/top-5 over this rank's shard, summed over ranks: exact on the whole set.
    Batches of the training micro-batch size: known to fit, and on CPU 2-3x faster than batches of
    thousands, whose activations spill out of the caches. Same memory format as training."""
    model.eval()
    if ddp:  # BN running stats drift per rank during training: evaluate rank 0's, the model that is saved
        for buf in model.buffers():
            dist.broadcast(buf, 0)
    device = data.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    for x, y in data.val_batches(rank, world_size, batch_size):
        if channels_last:
            x = to_channels_last(x)
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
