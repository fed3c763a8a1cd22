"""Train one network and write one run directory (../shared/run-format.md).

    python train.py                                   # small ResNet, Fashion-MNIST, cyclic, 3 cycles
    torchrun --nproc_per_node=8 train.py --data imagenet --data-dir /data/imagenet --model resnet50 ...

DDP comes from the torchrun environment (NCCL on CUDA, gloo on CPU); only rank 0 writes files.
The LR follows schedules.py and is stepped once per optimizer step; validation runs at every
cycle end (the tradeoff-curve points), at the end, and every --eval-every epochs.
"""
import argparse
import contextlib
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import SGDW
from tqdm import tqdm

import schedules
from data import DATASETS, DataError, build_data
from methods import SHORT, Objective, prepare_model, selected_methods, to_channels_last
from models import SMALL_RESNET, build_model
from rundir import (MetricsLog, holds_run, load_checkpoint, mark_done, save_checkpoint,
                    write_config)

# Options that define the result: a resume with any of them changed is refused.
RESULT_KEYS = ("dataset", "data_dir", "subset", "model", "schedule", "epochs", "warmup_epochs", "t0", "t_mult",
               "eta_min", "batch_size", "grad_accum", "world_size", "lr", "momentum", "nesterov", "weight_decay",
               "amp", "methods", "label_smoothing", "mixup", "seed", "compile")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", dest="dataset", default="fashion-mnist", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data-dir", default=None, help="dataset folder (default for fashion-mnist: Debian's package)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-dir")
    g.add_argument("--subset", type=int, default=0, help="train on the first N images only (0: all)")
    g.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank (imagenet)")
    g.add_argument("--model", default=SMALL_RESNET, help=f"{SMALL_RESNET} or any timm model name")
    g = p.add_argument_group("schedule (periods in epochs, applied per optimizer step)")
    g.add_argument("--schedule", default="cyclic", help="standard | cyclic | constant")
    g.add_argument("--epochs", type=float, default=None, help="total epochs (cyclic: must end a cycle)")
    g.add_argument("--cycles", type=int, default=None, help="cyclic: number of cycles, instead of --epochs (default 3)")
    g.add_argument("--warmup-epochs", type=float, default=0.5)
    g.add_argument("--t0", type=float, default=0.5, help="first cycle's period")
    g.add_argument("--t-mult", type=int, default=None, help="period multiplier (default 2; constant: 1)")
    g.add_argument("--eta-min", type=float, default=0.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256, help="global batch per optimizer step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--lr", type=float, default=0.4, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--weight-decay", type=float, default=5e-4, help="decoupled: per-step decay is wd * lr / peak lr")
    g.add_argument("--amp", default="auto", help="auto | none | bf16 | fp16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("methods")
    g.add_argument("--blurpool", action="store_true", help="anti-aliased downsampling (BlurPool)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and batches")
    g.add_argument("--label-smoothing", type=float, nargs="?", const=0.1, default=0.0, metavar="EPS")
    g.add_argument("--mixup", type=float, nargs="?", const=0.2, default=0.0, metavar="ALPHA")
    g = p.add_argument_group("run directory and logging")
    g.add_argument("--run-dir", default=None, help="default: runs/<dataset>_<model>_<schedule>-e<epochs>_<methods>_s<seed>")
    g.add_argument("--resume", nargs="?", const="must", default=None, metavar="auto",
                   help="continue the run in --run-dir; 'auto' starts fresh when there is no checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    g.add_argument("--eval-every", type=float, default=None,
                   help="epochs between extra evaluations (default: 1 for resident datasets, else cycle ends only)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N optimizer steps whose loss is NaN/inf instead of stopping (checks every step)")
    return p.parse_args(argv)


def fail(flag_message):
    """One line on stderr naming the flag and the fix, exit status 2, nothing written."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"train.py: error: {flag_message}", file=sys.stderr)
    sys.exit(2)


def micro_batch_size(cfg, world_size):
    """Images per forward pass on one rank (before --grad-accum is validated, 0 counts as 1)."""
    return cfg.batch_size // (world_size * max(cfg.grad_accum, 1))


def resolve(cfg, world_size, device):
    """Validate every flag and derive the schedule; fail() on the first bad one."""
    checks = [
        (cfg.dataset in DATASETS, f"--data: unknown dataset '{cfg.dataset}'; choose one of {', '.join(DATASETS)}"),
        (cfg.schedule in schedules.SCHEDULES, f"--schedule: unknown '{cfg.schedule}'; choose standard, cyclic or constant"),
        (cfg.amp in ("auto", "none", "bf16", "fp16"), f"--amp: unknown '{cfg.amp}'; choose auto, none, bf16 or fp16"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (not (cfg.nesterov and cfg.momentum == 0), "--nesterov needs --momentum > 0"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.eta_min >= 0 and cfg.eta_min < cfg.lr, f"--eta-min must be in [0, --lr), got {cfg.eta_min}"),
        (cfg.batch_size > 0, f"--batch-size must be positive, got {cfg.batch_size}"),
        (cfg.grad_accum > 0, f"--grad-accum must be positive, got {cfg.grad_accum}"),
        (cfg.batch_size % (world_size * max(cfg.grad_accum, 1)) == 0,
         f"--batch-size {cfg.batch_size} is not divisible by world size {world_size} x --grad-accum {cfg.grad_accum}; "
         f"use a multiple of {world_size * max(cfg.grad_accum, 1)}"),
        (cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}"),
        (cfg.t0 > 0, f"--t0 must be positive, got {cfg.t0}"),
        (cfg.t_mult is None or cfg.t_mult >= 1, f"--t-mult must be an integer >= 1, got {cfg.t_mult}"),
        (not (cfg.schedule == "constant" and cfg.t_mult not in (None, 1)), "--t-mult: a constant schedule has t_mult 1; drop --t-mult or use --schedule cyclic"),
        (cfg.cycles is None or cfg.cycles >= 1, f"--cycles must be >= 1, got {cfg.cycles}"),
        (cfg.epochs is None or cfg.epochs > 0, f"--epochs must be positive, got {cfg.epochs}"),
        (cfg.subset >= 0, f"--subset must be >= 0, got {cfg.subset}"),
        (cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}"),
        (0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (cfg.mixup >= 0, f"--mixup must be >= 0, got {cfg.mixup}"),
        (not (cfg.mixup > 0 and micro_batch_size(cfg, world_size) % 2),
         "--mixup needs an even micro-batch (batch / (world size x grad-accum))"),
        (cfg.eval_every is None or cfg.eval_every >= 0, f"--eval-every must be >= 0, got {cfg.eval_every}"),
        (cfg.skip_nonfinite >= 0, f"--skip-nonfinite must be >= 0, got {cfg.skip_nonfinite}"),
        (not (cfg.amp == "fp16" and device.type == "cpu"), "--amp fp16 needs a CUDA device; use --amp bf16 or none on CPU"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other; pick one"),
        (cfg.resume in (None, "must", "auto"), f"--resume takes no value or 'auto', got '{cfg.resume}'"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    cfg.t_mult = 1 if cfg.schedule == "constant" else (cfg.t_mult or 2)
    if cfg.schedule == "standard":
        cfg.epochs = cfg.epochs or schedules.cyclic_epochs(cfg.warmup_epochs, cfg.t0, 2, cfg.cycles or 3)
        cfg.cycles = 1
    elif cfg.epochs is None:
        cfg.cycles = cfg.cycles or 3
        cfg.epochs = schedules.cyclic_epochs(cfg.warmup_epochs, cfg.t0, cfg.t_mult, cfg.cycles)
    else:
        try:
            n = schedules.cycles_for_epochs(cfg.warmup_epochs, cfg.t0, cfg.t_mult, cfg.epochs)
        except ValueError as e:
            fail(str(e))
        if cfg.cycles not in (None, n):
            fail(f"--cycles {cfg.cycles} disagrees with --epochs {cfg.epochs:g} ({n} cycles); give only one of them")
        cfg.cycles = n
    if cfg.warmup_epochs >= cfg.epochs:
        fail(f"--warmup-epochs {cfg.warmup_epochs:g} must be shorter than the run ({cfg.epochs:g} epochs)")
    if cfg.schedule == "standard":  # recorded shape: one cosine period over the rest of the run
        cfg.t0, cfg.t_mult = cfg.epochs - cfg.warmup_epochs, 1
    if cfg.amp == "auto":
        if device.type == "cuda":
            cfg.amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            cfg.amp = "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"
    cfg.methods = selected_methods(cfg)
    cfg.world_size = world_size


def default_run_dir(cfg):
    methods = "+".join(SHORT[m] for m in cfg.methods) or "baseline"
    return os.path.join("runs", f"{cfg.dataset}_{cfg.model}_{cfg.schedule}-e{cfg.epochs:g}_{methods}_s{cfg.seed}")


def prepare_run_dir(cfg):
    """Decide fresh / resume / refuse before anything is written. Returns the checkpoint to resume or None."""
    if cfg.resume:
        ckpt = load_checkpoint(cfg.run_dir) if os.path.isdir(cfg.run_dir) else None
        if ckpt is None and cfg.resume == "must":
            fail(f"--resume: no readable checkpoint in {cfg.run_dir}/checkpoints; start it without --resume "
                 f"(or with --resume auto)")
        if ckpt is not None:
            # the checkpoint carries the options it was trained with, so a stray config.json cannot mislead
            old = ckpt.get("config")
            if old is None:
                fail(f"--resume: the checkpoint in {cfg.run_dir}/checkpoints does not record its options (written by "
                     f"an older train.py); start the run again with --overwrite")
            diffs = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESULT_KEYS if old.get(k) != getattr(cfg, k)]
            if diffs:
                fail(f"--resume: these options differ from the run in {cfg.run_dir}: {'; '.join(diffs)}")
            return ckpt
        cfg.overwrite = True  # 'auto' with no checkpoint: the run died before its first one, nothing to lose
        return None
    if holds_run(cfg.run_dir) and not cfg.overwrite:
        fail(f"--run-dir {cfg.run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
             f"or choose another --run-dir")
    return None


# ---- the run ---------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_args(argv)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    resolve(cfg, world_size, device)
    master = rank == 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, cores // local_world)
        torch.set_num_threads(threads)  # ranks on one machine share its cores; OMP_NUM_THREADS overrides
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    try:
        data = build_data(cfg.dataset, cfg.data_dir, device, cfg.subset, cfg.download, cfg.workers)
        model = build_model(cfg.model, data.num_classes, data.in_chans)
    except (DataError, ValueError) as e:
        fail(str(e))
    loader = data.train_loader(cfg.batch_size, rank, world_size, cfg.seed)
    if loader.steps_per_epoch < 1:
        fail(f"--batch-size {cfg.batch_size} is larger than the training set; lower it or drop --subset")
    plan = schedules.make_plan(cfg.schedule, cfg.epochs, cfg.warmup_epochs, cfg.t0, cfg.t_mult, loader.steps_per_epoch)
    if plan.schedule != "standard" and plan.t0_steps < 1:
        fail(f"--t0 {cfg.t0:g} epochs is under one optimizer step ({loader.steps_per_epoch} steps per epoch); raise --t0")
    if cfg.eval_every is None:
        cfg.eval_every = 1.0 if hasattr(data, "train_x") else 0.0
    cfg.run_dir = cfg.run_dir or default_run_dir(cfg)
    ckpt = prepare_run_dir(cfg)  # every rank decides alike: they all read the same files

    model = prepare_model(model, cfg).to(device)
    raw_model = model
    optimizer = SGDW(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                     weight_decay=cfg.weight_decay / cfg.lr)  # timm's SGDW decays by lr * wd per step
    scheduler = schedules.build_scheduler(optimizer, plan, cfg.eta_min)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    objective = Objective(cfg, data.num_classes)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    step, train_time, metrics_rows, skipped = 0, 0.0, 0, 0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, train_time, metrics_rows, skipped = (ckpt["step"], ckpt["train_time_s"], ckpt["metrics_rows"],
                                                   ckpt["skipped_steps"])
        restore_rng(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        init_distributed(device, rank, world_size)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    config = dict(vars(cfg))
    config.update(steps_per_epoch=loader.steps_per_epoch, total_steps=plan.total_steps,
                  cycle_end_epochs=[s / loader.steps_per_epoch for s in plan.cycle_end_steps()],
                  speedup_ratio_eq1=schedules.speedup_ratio(cfg.t_mult, cfg.cycles) if cfg.schedule != "standard" else 1.0,
                  device=device.type, torch_version=torch.__version__, argv=sys.argv[1:] if argv is None else list(argv))
    if master:
        if ckpt is None and cfg.overwrite:
            remove_run(cfg.run_dir)
        os.makedirs(cfg.run_dir, exist_ok=True)
        write_config(cfg.run_dir, config)
        log = MetricsLog(cfg.run_dir, keep_rows=metrics_rows if ckpt is not None else None)
        print(f"run {cfg.run_dir}: {cfg.schedule}, {cfg.epochs:g} epochs = {plan.total_steps} steps, "
              f"cycle ends at epochs {', '.join(f'{e:g}' for e in config['cycle_end_epochs'])}; methods "
              f"{', '.join(cfg.methods) or 'none'}; {device.type} x{world_size}, amp {cfg.amp}"
              + (f"; resumed at step {step}" if ckpt is not None else ""))

    cycle_ends = set(plan.cycle_end_steps())
    every = round(cfg.eval_every * loader.steps_per_epoch) if cfg.eval_every else 0
    eval_steps = cycle_ends | {plan.total_steps} | (set(range(every, plan.total_steps, every)) if every else set())
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    loss_steps, images_since_row, time_since_row = 0, 0, 0.0
    last_lr = schedules.lr_at(plan, step - 1, cfg.lr, cfg.eta_min) if step else 0.0
    bar = tqdm(total=plan.total_steps, initial=step, disable=not master or cfg.no_progress, unit="step",
               dynamic_ncols=True, leave=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_start = time.perf_counter()
    while step < plan.total_steps:
        for x, y in loader.epoch(step // loader.steps_per_epoch, step % loader.steps_per_epoch):
            last_lr = optimizer.param_groups[0]["lr"]
            loss = train_step(model, optimizer, scaler, objective, autocast, x, y, cfg.grad_accum, ddp, (step, rank),
                              check_finite=skipped < cfg.skip_nonfinite)
            if loss is None:  # non-finite and --skip-nonfinite allows it: no update, the schedule goes on
                skipped += 1
                if master:
                    tqdm.write(f"skipped step {step + 1}: non-finite loss ({skipped}/{cfg.skip_nonfinite} allowed)")
            else:
                loss_sum += loss
                loss_steps += 1
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            scheduler.step()
            step += 1
            images_since_row += cfg.batch_size
            bar.update(1)
            if master and not cfg.no_progress and (step % 25 == 0 or step in eval_steps):
                bar.set_postfix(epoch=f"{step / loader.steps_per_epoch:.2f}", cycle=plan.cycle_of_step(step - 1),
                                lr=f"{last_lr:.4f}", loss=f"{loss_sum.item() / max(loss_steps, 1):.4f}",
                                img_s=f"{images_since_row / (time.perf_counter() - t_start + time_since_row):.0f}")
            if step in eval_steps:
                sync()
                elapsed = time.perf_counter() - t_start
                train_time += elapsed
                time_since_row += elapsed
                t_eval = time.perf_counter()
                bad = reduced(first_bad, ddp, op="max")
                if bad >= 0:
                    fail_nonfinite(master, bad + 1, schedules.lr_at(plan, bad, cfg.lr, cfg.eta_min))
                train_loss = reduced(loss_sum / max(loss_steps, 1), ddp)
                val = evaluate(raw_model, data, rank, world_size, micro_batch_size(cfg, world_size), autocast,
                               cfg.channels_last, ddp)
                row = dict(epoch=f"{step / loader.steps_per_epoch:.6g}", step=step, lr=f"{last_lr:.8g}",
                           train_loss=f"{train_loss:.6f}", val_loss=f"{val['loss']:.6f}", val_acc1=f"{val['acc1']:.4f}",
                           val_acc5=f"{val['acc5']:.4f}" if val["acc5"] is not None else None,
                           train_time_s=f"{train_time:.3f}", cycle=plan.cycle_of_step(step - 1),
                           cycle_end=int(step in cycle_ends or step == plan.total_steps),
                           images_per_s=f"{images_since_row / time_since_row:.1f}", skipped_steps=skipped)
                row["eval_time_s"] = f"{time.perf_counter() - t_eval:.3f}"
                if device.type == "cuda":
                    row["peak_mem_gb"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"
                if master:
                    log.append(row)
                    save_checkpoint(cfg.run_dir, dict(
                        model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict(), step=step, train_time_s=train_time, metrics_rows=log.rows,
                        skipped_steps=skipped, rng=gather_rng(ddp), config={k: getattr(cfg, k) for k in RESULT_KEYS}))
                    tqdm.write(f"epoch {row['epoch']:>6} step {step:>6} cycle {row['cycle']:>2} lr {last_lr:.4f} | "
                               f"train loss {row['train_loss']} | val loss {row['val_loss']} acc1 {row['val_acc1']}% | "
                               f"{row['images_per_s']} img/s, {train_time:.1f}s"
                               + (f", peak {row['peak_mem_gb']} GiB" if "peak_mem_gb" in row else "")
                               + (" | cycle end" if row["cycle_end"] else ""))
                elif ddp:
                    gather_rng(ddp)
                loss_sum.zero_()
                loss_steps, images_since_row, time_since_row = 0, 0, 0.0
                t_start = time.perf_counter()
            if step >= plan.total_steps:
                break
    bar.close()
    if master:
        mark_done(cfg.run_dir)
        print(f"done: {cfg.run_dir}, {train_time:.1f}s of training")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


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


def train_step(model, optimizer, scaler, objective, autocast, x, y, grad_accum, ddp, draw_key, check_finite=False):
    """One optimizer step over this rank's batch in `grad_accum` micro-steps; returns the mean loss
    (a device tensor: reading it would sync). DDP all-reduces gradients on the last micro-step only.
    With check_finite, a non-finite loss on any rank skips the update on all ranks and returns None."""
    model.train()
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
            return None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(model, data, rank, world_size, batch_size, autocast, channels_last, ddp):
    """Plain cross-entropy and top-1/top-5 over this rank's shard, summed over ranks: exact on the whole set.
    Batches of the training micro-batch size: known to fit, and on CPU 2-3x faster than batches of
    thousands, whose activations spill out of the caches."""
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


def reduced(t, ddp, op="mean"):
    """The value of a 0-d tensor over all ranks, their mean or max (all ranks must call this when ddp)."""
    if ddp:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t.item()


def fail_nonfinite(master, step, lr):
    if master:
        print(f"train.py: error: non-finite training loss at step {step} (lr {lr:.6g}); the last good checkpoint is "
              f"kept; lower --lr, use --amp bf16/none, or allow a few with --skip-nonfinite N", file=sys.stderr)
    sys.exit(3)


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


def gather_rng(ddp):
    """Every rank's RNG states, in rank order (all ranks must call this when ddp)."""
    mine = rng_state()
    if not ddp:
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def remove_run(run_dir):
    import shutil
    for name in ("config.json", "metrics.csv", "done"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)


if __name__ == "__main__":
    main()
