"""--amp: the precision a run computes in. `auto` is fixed by the device (bf16 where native, else fp16 on a GPU,
fp32 on a CPU), except on a CPU with native bf16, where it is measured on the run's own model: bf16's speed there
depends on the model. `measure` times interleaved candidates of one training step (--compile auto has its own
timer, compile_choice.images_per_second: a minimum wall time per round, the GPU synced); train.py and
benchmarks.throughput take their precision from here."""
import platform
import time

import torch

from methods import Context, MethodList, weights_kept
from rng import restore_rng, rng_state

AMP_MARGIN = 1.1  # --amp auto takes bf16 on a CPU only when it trains at least this much faster than fp32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def amp_context(amp, device):
    """(GradScaler, autocast context) of a precision: the scaler on for fp16 only, autocast for bf16 and fp16."""
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    amp_dtype = DTYPES.get(amp)
    return scaler, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def measures_precision(args, device, world_size):
    """--amp auto measures on a CPU with native bf16, in one process (ranks could pick differently); elsewhere its
    choice is fixed: bf16 on GPUs that have it (else fp16), fp32 on CPUs without native bf16 (emulated: ~10x slower)."""
    return args.amp == "auto" and device.type == "cpu" and world_size == 1 and cpu_has_native_bf16()


def measure_precision(model, loader, methods, args, train_step, steps=3):
    """--amp auto on a CPU: which of fp32 and bf16 trains this model faster, and the images/s of each, from a few
    steps (one untimed first) of train_step (train.py's) on the run's first batch. bf16's speed on a CPU depends on
    the model (on one Xeon with AMX a small ViT ran 1.6x slower in bf16, our small ResNet 1.6x faster), so the CPU's
    features cannot decide. Leaves no trace in the weights, BatchNorm statistics and RNG (put back); a method's own
    Python state is not touched (the steps run without the methods' hooks, on the model after their surgery)."""
    x, y = next(loader.epoch(0, 0))
    micro = args.batch_size // max(args.grad_accum, 1)  # one process's micro-batch (options.micro_batch_size)
    x, y = methods.transform_eval_batch(x[:micro]), y[:micro]  # the layout of training, no augmentation drawn
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = Context(step=0, epoch=0.0, rank=0, world_size=1, seed=args.seed, run_progress=0.0, cycle_progress=0.0,
                  num_classes=int(y.max()) + 1)

    def step(amp):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")
        return lambda: train_step(model, optimizer, scaler, MethodList([]), autocast, x, y, 1, False, ctx)
    rng = rng_state()
    with weights_kept(model):
        figures = measure({amp: step(amp) for amp in ("none", "bf16")}, len(x), steps)
        optimizer.zero_grad(set_to_none=True)
    restore_rng(rng)
    # bf16 only when clearly faster: near a tie fp32, whose result does not depend on the timing's noise
    return ("bf16" if figures["bf16"] > AMP_MARGIN * figures["none"] else "none"), figures


def measure(candidates, batch, steps, rounds=2):
    """{name: images/s} of each candidate step (a callable), interleaved round by round, the better of `rounds`
    rounds each: this VM's speed drifts, and a drift slows every candidate of a round alike."""
    figures = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, step in candidates.items():
            figures[name].append(images_per_second(step, batch, steps))
    return {name: max(r) for name, r in figures.items()}


def images_per_second(step, batch, steps):
    """Images per second of `step` over `steps` calls, after one untimed call."""
    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)
