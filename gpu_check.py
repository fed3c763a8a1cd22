"""Check a new GPU machine in one command: real training in each precision, exact resume, the estimators, the
ImageFolder path, multi-GPU evaluation, and the throughput benchmark; one JSON summary.

    python gpu_check.py [--data-dir FASHION_MNIST_DIR] [--out runs/gpu-check]      # ./launch.sh gpu-check
    python gpu_check.py --dry                                                     # the same checks, tiny, on CPU

Runs with whatever Python and torch the machine has (no network needed: nothing is installed); a check whose
optional package is missing is skipped with one line, the rest go on. Each check runs train.py (or a benchmark)
in a subprocess and judges what it wrote; the summary (device, versions, each check's verdict and figures) is
printed and written to OUT/gpu-check.json. --dry runs every check on CPU with synthetic data and tiny budgets, so
that the test suite keeps this script from rotting; its accuracy bars are chance-level ones.
"""
import argparse
import csv
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
TIMEOUT = 240  # seconds for any one subprocess: a stuck check cannot eat the machine's time
NEEDED = ("torch", "torchvision", "timm", "numpy", "tqdm", "PIL")  # train.py imports these; schedulefree optional


def version_problems():
    """Installed packages below requirements.txt's lower bounds, one phrase each (missing ones too)."""
    problems = []
    for line in open(REQUIREMENTS):
        m = re.match(r"^([A-Za-z0-9_-]+)\s*>=\s*([0-9.]+)", line.strip())
        if not m:
            continue
        name, low = m.groups()
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} missing (>= {low} needed)")
            continue
        if tuple(int(x) for x in re.findall(r"\d+", have)[:3]) < tuple(int(x) for x in low.split(".")):
            problems.append(f"{name} {have} is older than {low}")
    return problems


def run_bounded(cmd, env, timeout):
    """subprocess.run in a process group of its own, killed whole (torchrun's workers too) past `timeout` s."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise RuntimeError(f"{' '.join(cmd[1:3])} ... took over {timeout} s and was stopped") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def rows(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


class Machine:
    """Where the checks run: OUT, the data flags (real or dry), the accuracy bar, the environment; train() and
    trained() run train.py for a check."""

    def __init__(self, out, data_dir, dry, gpus):
        self.out, self.data_dir, self.dry, self.gpus = out, data_dir, dry, gpus
        # real: 2 epochs of Fashion-MNIST (~91 % for the small ResNet); dry: synthetic data, a few steps
        self.data = (["--data", "synthetic", "--subset", "256", "--batch-size", "32"] if dry else
                     ["--data", "fashion-mnist"] + (["--data-dir", data_dir] if data_dir else []))
        self.bar = 0.0 if dry else 85.0  # top-1 a trained model must reach (dry: none; it checks the plumbing)
        self.env = dict(os.environ, PYTHONWARNINGS="ignore", **({"CUDA_VISIBLE_DEVICES": ""} if dry else {}))

    def train(self, name, *flags, procs=1):
        """train.py into OUT/name (a fresh run unless the flags say --resume); the run folder."""
        run = os.path.join(self.out, name)
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                                  if procs > 1 else []) + [os.path.join(ROOT, "train.py")]
        fresh = [] if "--resume" in flags else ["--overwrite"]
        p = run_bounded(cmd + self.data + ["--run-dir", run, "--no-progress", *fresh, *flags], self.env, TIMEOUT)
        if p.returncode != 0:
            raise RuntimeError(f"train.py {' '.join(flags)} failed ({p.returncode}): "
                               f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")
        return run

    def trained(self, name, *flags):
        """(reached the accuracy bar, figures) of a standard 2-epoch run with these flags."""
        run = self.train(name, "--schedule", "standard", "--epochs", "2", "--warmup-epochs", "0.2", "--eval-every",
                         "0", *flags)
        last = rows(run)[-1]
        figures = dict(val_acc1=float(last["val_acc1"]), train_time_s=float(last["train_time_s"]),
                       images_per_s=float(last["images_per_s"]), startup_s=float(last.get("startup_s") or 0))
        return figures["val_acc1"] >= self.bar, figures


# ---- the checks: each takes the Machine and returns (passed, figures); passed None is a skip -------------------

def check_bf16(m):
    return m.trained("bf16", "--amp", "bf16" if not m.dry else "auto")


def check_fp16(m):
    """fp16 with a GradScaler to a real accuracy; the scaler's final scale and growth tracker are reported (a
    scale below the initial 65536 means it skipped steps on overflow and backed off, as it should)."""
    if m.dry:
        return None, "fp16 needs a GPU"
    ok, figures = m.trained("fp16", "--amp", "fp16")
    import torch
    scale = torch.load(os.path.join(m.out, "fp16", "checkpoints", "last.pt"), weights_only=True)["scaler"]
    figures.update(final_scale=scale.get("scale"), growth_tracker=scale.get("_growth_tracker"))
    return ok and scale.get("scale") not in (None, 0), figures


def check_compile(m):
    if m.dry:  # minutes of C++ compilation on a small CPU; the check is bf16's with one flag more
        return None, "compiling is checked on a GPU only"
    return m.trained("compile", "--compile")


def check_resume(m):
    """Killed mid-run and resumed, against the uninterrupted run: bitwise under --deterministic."""
    flags = ["--schedule", "standard", "--epochs", "1", "--warmup-epochs", "0.2", "--eval-every", "0.25",
             "--deterministic", "--checkpoint-every", "0"]
    ref = m.train("resume-ref", *flags)
    run = os.path.join(m.out, "resume")
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + m.data + ["--run-dir", run, "--no-progress", *flags]
    p = subprocess.Popen(cmd, cwd=ROOT, env=m.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = os.path.join(run, "metrics.csv"), time.time() + TIMEOUT
    while p.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:  # header + 2 rows
            break
        time.sleep(0.02)
    p.kill()
    p.wait()
    if p.returncode != -signal.SIGKILL or os.path.exists(os.path.join(run, "done")):
        raise RuntimeError("the run to interrupt finished (or failed) before it could be killed")
    m.train("resume", *flags, "--resume", "auto")
    timing = lambda k: k.endswith("_s") or k == "peak_mem_gb"  # noqa: E731 (not the arithmetic's)
    strip = lambda rs: [{k: v for k, v in r.items() if not timing(k)} for r in rs]  # noqa: E731
    same = strip(rows(run)) == strip(rows(ref))
    return same, dict(rows=len(rows(run)), val_acc1=float(rows(run)[-1]["val_acc1"]),
                      reference_val_acc1=float(rows(ref)[-1]["val_acc1"]))


def check_estimators(m):
    figures = {}
    for schedule in ("wsd", "schedule-free"):
        try:
            run = m.train(schedule, "--schedule", schedule, "--warmup-epochs", "0.25", "--t0", "0.25", "--cycles",
                          "2", "--eval-every", "0")
        except RuntimeError as e:
            if "schedulefree" in str(e):
                figures[schedule] = "skipped: the schedulefree package is not installed"
                continue
            raise
        figures[schedule] = float(rows(run)[-1]["val_acc1"])
    return all(isinstance(v, str) or v >= m.bar * 0.9 for v in figures.values()), figures


def check_image_folder(m):
    """A generated ImageFolder tree through DataLoader workers (decode, crop, flip) to a finished run."""
    import numpy as np
    from PIL import Image
    root = os.path.join(m.out, "tree")
    g = np.random.default_rng(0)
    for split, n in (("train", 32), ("val", 8)):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (64, 80, 3), np.uint8)).save(
                    os.path.join(root, split, c, f"{i}.JPEG"), format="JPEG")
    data, m.data = m.data, ["--data", "imagenet", "--data-dir", root, "--batch-size", "16", "--workers", "2"]
    figures = {}
    try:  # the workers decode; then (on a GPU) the GPU decodes each batch (--decode cuda)
        for decode in ("cpu",) + (() if m.dry else ("cuda",)):
            run = m.train(f"image-folder-{decode}", "--cycles", "1", "--warmup-epochs", "1", "--t0", "1",
                          "--decode", decode)
            last = rows(run)[-1]
            figures.update({f"{decode}_val_acc1": float(last["val_acc1"]),
                            f"{decode}_images_per_s": float(last["images_per_s"])})
    finally:
        m.data = data
    if not m.dry:
        figures["loader"] = loader_benchmark(m)
    return True, figures


def loader_benchmark(m):
    """The loader benchmark's img/s of each input pipeline, the GPU-decode one included."""
    path = os.path.join(m.out, "loader.json")
    p = run_bounded([sys.executable, "-m", "benchmarks.loader", "--decode", "cuda", "--sizes", "224",
                     "--workers", "0", "4", "8", "--images", "1024", "--json", path], m.env, TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"loader benchmark failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return {f"{r['pipeline']} {r['transform']} w{r['workers']}": r["images_per_s"]
            for r in json.load(open(path))["results"]}


def check_two_gpus(m):
    """2 ranks over NCCL (the model compiled around DDP, with the untimed warm-up): their sharded evaluation
    of the saved weights equals one process's; and schedule-free on 2 ranks (BatchNorm averaged over them)."""
    if m.gpus < 2 and not m.dry:
        return None, "needs 2 GPUs"
    flags = ["--cycles", "1", "--warmup-epochs", "0.5", "--t0", "0.5", "--eval-every", "0", "--deterministic",
             "--amp", "none"]  # fp32 without TF32: the two evaluations differ only in the order of the sums
    run = m.train("two-ranks", *flags, *([] if m.dry else ["--compile"]), procs=2)
    sf = m.train("two-ranks-sf", *flags, "--schedule", "schedule-free", procs=2)
    single = run_bounded([sys.executable, "-c", EVAL_ONE.format(root=ROOT, run=run, data=m.data)], m.env, TIMEOUT)
    if single.returncode != 0:
        raise RuntimeError(f"one-process evaluation failed: {single.stderr.strip().splitlines()[-1:]}")
    one = json.loads(single.stdout.strip().splitlines()[-1])
    two = rows(run)[-1]
    close = abs(float(two["val_acc1"]) - one["acc1"]) < 0.02 and abs(float(two["val_loss"]) - one["loss"]) < 1e-4
    return close, dict(two_ranks=dict(val_acc1=float(two["val_acc1"]), val_loss=float(two["val_loss"])),
                       one_process=one, schedule_free_val_acc1=float(rows(sf)[-1]["val_acc1"]))


def check_benchmark(m):
    path = os.path.join(m.out, "throughput.json")
    flags = ["--steps", "3", "--batch-size", "32"] if m.dry else []
    p = run_bounded([sys.executable, "-m", "benchmarks.throughput", "--json", path] + flags + (
        ["--data-dir", m.data_dir] if m.data_dir else []), m.env, TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    figures = json.load(open(path))
    same = figures["ran"]["a"] == figures["ran"]["b"] == figures["ran"]["c"]
    return same, {k: figures[k] for k in ("device", "amp", "a_img_s", "b_img_s", "c_img_s", "b_over_a")}


# The checks in the order they run (--only picks some): a new check is one function above and one line here.
CHECKS = {"bf16": check_bf16, "fp16": check_fp16, "compile": check_compile, "resume": check_resume,
          "estimators": check_estimators, "image_folder": check_image_folder, "two_gpus": check_two_gpus,
          "benchmark": check_benchmark}


# One process evaluates a run's saved weights on the whole validation set (train.py's own evaluate, world 1).
EVAL_ONE = """import json, sys, torch
from types import SimpleNamespace
sys.path.insert(0, {root!r})
import options, train
from data import build_data
from methods import MethodList
from models import build_model
args = options.parse_args({data!r})
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
data = build_data(args.dataset, args.data_dir, device, args.subset)
model = build_model("small_resnet", data.num_classes, data.in_chans).to(device)
model.load_state_dict(torch.load({run!r} + "/checkpoints/last.pt", weights_only=True)["model"])
config = json.load(open({run!r} + "/config.json"))
dtype = {{"bf16": torch.bfloat16, "fp16": torch.float16}}.get(config["amp"])
train.configure_device(device, deterministic=True)
micro = options.micro_batch_size(SimpleNamespace(**config), config["world_size"])  # the run's evaluation batch
val = train.evaluate(model, data, 0, 1, micro, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
                     MethodList([]), False)
print(json.dumps(dict(acc1=val["acc1"], loss=val["loss"])))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "gpu-check"))
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST's IDX files (default: Debian's package)")
    p.add_argument("--dry", action="store_true", help="every check, tiny, on CPU (what the test suite runs)")
    p.add_argument("--only", default=",".join(CHECKS), help="a comma-separated subset of " + ", ".join(CHECKS))
    a = p.parse_args(argv)
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_check.py: {sys.executable} lacks {', '.join(missing)}: use a Python that has them (the .venv, "
              f"or pip install -r requirements.txt where there is a network)", file=sys.stderr)
        return 2
    import torch
    os.makedirs(a.out, exist_ok=True)
    gpus = 0 if a.dry else torch.cuda.device_count()
    if not gpus and not a.dry:
        print("gpu_check.py: no CUDA device here; --dry runs the same checks on CPU", file=sys.stderr)
        return 2
    summary = dict(device=torch.cuda.get_device_name(0) if gpus else "cpu (dry run)", gpus=gpus,
                   torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
                   too_old=version_problems(), checks={})
    machine = Machine(a.out, a.data_dir, a.dry, gpus)
    for name in a.only.split(","):
        t = time.time()
        try:
            passed, figures = CHECKS[name](machine)
            verdict = "skipped" if passed is None else ("passed" if passed else "FAILED")
        except Exception as e:  # one check's failure is reported; the others still run
            verdict, figures = "FAILED", f"{type(e).__name__}: {e}"
        summary["checks"][name] = dict(verdict=verdict, seconds=round(time.time() - t, 1), figures=figures)
        print(f"{name:>13}: {verdict} ({summary['checks'][name]['seconds']} s) {figures}", flush=True)
    with open(os.path.join(a.out, "gpu-check.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if summary["too_old"]:
        print("packages older than requirements.txt allows: " + "; ".join(summary["too_old"]))
    failed = [n for n, c in summary["checks"].items() if c["verdict"] == "FAILED"]
    print(f"gpu-check on {summary['device']} (torch {summary['torch']}, CUDA {summary['cuda']}): "
          f"{len(summary['checks']) - len(failed)} of {len(summary['checks'])} passed or skipped"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; summary in {a.out}/gpu-check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
