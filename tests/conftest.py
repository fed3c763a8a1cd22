import os
import subprocess
import sys

import pytest
import torch

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


def run_train(args, env=None, torchrun=0, check=True, fresh=False):
    """Run train.py (or torchrun with `torchrun` processes) in a process of its own; returns CompletedProcess. A
    plain run is forked from a server that has imported train.py's modules once (torch, timm: ~3 s a process,
    most of the suite's time), and runs the script as `python train.py` does: its own argv, environment, exit
    code, stdout and stderr. Runs with an environment of their own, torchrun, and fresh=True (one side of a
    comparison between processes: forked children share the server's hash seed and numpy state) get a new
    interpreter."""
    if torchrun or env or fresh:
        p = subprocess.run(train_cmd(args, torchrun), cwd=ROOT, env=dict(ENV, **(env or {})), capture_output=True,
                           text=True, timeout=600)
    else:
        p = forked_train(list(args))
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def forked_train(args, timeout=600):
    import multiprocessing
    import multiprocessing.forkserver
    import tempfile
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train", "conftest"])
    saved = dict(os.environ)
    try:  # the server starts (once) in the runs' environment, with train.py's and the tests' folders importable
        os.environ.clear()
        os.environ.update(ENV, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for name in (out, err):
            open(name, "w").close()
        child = ctx.Process(target=as_script, args=(os.path.join(ROOT, "train.py"), args, ENV, out, err))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(train_cmd(args), timeout)
        with open(out) as o, open(err) as e:
            stdout, stderr = o.read(), e.read()
        if child.exitcode and not stderr:  # it died before the script ran (the server's stderr has why)
            stderr = f"the forked train.py died before running (exit code {child.exitcode})"
        return subprocess.CompletedProcess(train_cmd(args), child.exitcode, stdout, stderr)


def as_script(path, args, env, out, err):
    """In a forked child: run `path` as `python path args` would, with `env`, stdout and stderr to files; exits
    with the script's code (atexit handlers run, as at an interpreter's exit)."""
    import atexit
    import gc
    import multiprocessing
    import runpy
    import threading
    import traceback
    import warnings
    assert "train" in sys.modules, "the server did not preload train.py's modules"
    # a main process again: DataLoader workers fork from it, as from `python train.py` (not through a forkserver)
    multiprocessing.set_start_method("fork", force=True)
    multiprocessing.process._parent_process = None
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    for fd, name in ((1, out), (2, err)):
        target = os.open(name, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", buffering=1, closefd=False)
    sys.argv, code = [path] + args, 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # as the interpreter's exit: join non-daemon threads, exit handlers, collect
        atexit._run_exitfuncs()
        gc.collect()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def step_context(step=0, rank=0, world_size=1, num_classes=10):
    """The methods' Context of one step, as train.py makes it (progress 0)."""
    from methods import Context
    return Context(step=step, epoch=0.0, rank=rank, world_size=world_size, seed=0, run_progress=0.0,
                   cycle_progress=0.0, num_classes=num_classes)


ONE_STEP = """import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train
from methods import Context, MethodList, build
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
opt = torch.optim.SGD(net.parameters(), lr=1.0)  # one plain step: the change is the gradient the step used
before = [p.detach().clone() for p in net.parameters()]
g = torch.Generator().manual_seed(1)
x, y = 50 * torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 4, (8,), generator=g)
share = slice(rank * 8 // world, (rank + 1) * 8 // world)
ctx = Context(step=0, epoch=0.0, rank=rank, world_size=world, seed=0, run_progress=0.0, cycle_progress=0.0,
              num_classes=4)
scaler, autocast = torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)
train.train_step(model, opt, scaler, MethodList([build(m) for m in {methods!r}]), autocast, x[share], y[share], 2,
                 world > 1, ctx, clip_grad={clip})
step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, net.parameters())])
if rank == 0:
    torch.save(step, {out!r})
if world > 1:  # a clean gloo shutdown: without it a rank can abort at exit ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
"""


def one_step_change(tmp_path, world, clip=0.0, methods=()):
    """The weights' change in one train_step (plain SGD, lr 1, 2 micro-steps, `methods` on) of a tiny linear model
    on 8 large-valued images: in one process, or shared by `world` gloo ranks under torchrun."""
    name = f"step{world}-{clip}-{'+'.join(methods)}"
    out, script = str(tmp_path / f"{name}.pt"), tmp_path / f"{name}.py"
    script.write_text(ONE_STEP.format(root=ROOT, clip=clip, methods=list(methods), out=out))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
    p = subprocess.run([sys.executable] + launcher + [str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(out)


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
