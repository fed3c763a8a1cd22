import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny real run: synthetic data, 256 images, batch 32: 8 steps per epoch, cycle ends at 2 and 4.
TINY = ["--data", "synthetic", "--subset", "256", "--batch-size", "32", "--warmup-epochs", "1", "--t0", "1",
        "--cycles", "2", "--lr", "0.1", "--no-progress"]


# CPU runs unless a test asks for the GPU (test_cuda.py): on a GPU host the CPU suite would otherwise train in TF32
# and ask torchrun's extra ranks for GPUs that are not there
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
GPU_ENV = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}


def train_cmd(args, torchrun=0, torchrun_args=()):
    """The command line of train.py, or of torchrun running it in `torchrun` processes."""
    return [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                                *torchrun_args] if torchrun else []) + [os.path.join(ROOT, "train.py")] + list(args)


def run_train(args, env=None, torchrun=0, check=True):
    """Run train.py (or torchrun with `torchrun` processes) in a subprocess; returns CompletedProcess."""
    p = subprocess.run(train_cmd(args, torchrun), cwd=ROOT, env=dict(ENV, **(env or {})), capture_output=True,
                       text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture
def tiny_run_args():
    return list(TINY)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped elsewhere; ./launch.sh gpu-check runs them)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
