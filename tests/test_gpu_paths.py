"""The GPU and cluster paths, where a CPU can show them: the launcher a venv on a system torch has, file systems
without locks, the bf16 choice on GPUs that only emulate it, the recorded arithmetic and hardware, schedule-free
evaluations that leave no trace, BatchNorm recalibration independent of the world size."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT, TINY


@pytest.fixture
def in_process(monkeypatch):
    import train
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return train


def test_gpu_sweeps_launch_torchrun_through_the_venvs_python(tmp_path):
    """A venv made with --system-site-packages on a machine whose torch is the system's has no bin/torchrun."""
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), "sweep", "--dry-run", "--gpus", "2", "--out", str(tmp_path),
                        "--cycles", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    runs = [line for line in p.stdout.splitlines() if "train.py" in line]
    assert runs and all("/bin/python -m torch.distributed.run " in line and "bin/torchrun" not in line
                        for line in runs), p.stdout
    sbatch = open(os.path.join(ROOT, "slurm", "sweep.sbatch")).read() + open(os.path.join(ROOT, "launch.sh")).read()
    assert "bin/torchrun" not in sbatch


def test_a_file_system_without_locks_is_one_line_naming_no_lock(in_process, monkeypatch, tmp_path, capsys):
    import locks

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        in_process.main(TINY + ["--run-dir", run, "--cycles", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "cannot lock files" in err and "--no-lock" in err
    in_process.main(TINY + ["--run-dir", run, "--cycles", "1", "--no-lock"])
    assert os.path.exists(os.path.join(run, "done"))


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp16")])
def test_amp_auto_on_a_gpu_takes_bf16_only_where_it_is_native(in_process, monkeypatch, native, expected):
    """A V100 or T4 emulates bf16 (torch's default check says yes): there auto must pick fp16 + GradScaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    args = in_process.parse_args(TINY + ["--amp", "auto"])
    assert in_process.resolve(args, 1, torch.device("cuda", 0))[0].amp == expected


def test_the_arithmetic_and_hardware_are_recorded(in_process, tmp_path):
    run = str(tmp_path / "run")
    in_process.main(TINY + ["--run-dir", run, "--cycles", "1", "--deterministic"])
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["tf32"] is False and config["deterministic"] is True and config["cuda_version"] is None
    with open("/proc/cpuinfo") as f:
        model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    assert config["device_name"] == model and config["device_names"] == [model]


def test_a_resume_on_other_hardware_is_refused_unless_allowed(in_process, tmp_path, capsys):
    run = str(tmp_path / "run")
    in_process.main(TINY + ["--run-dir", run, "--cycles", "1", "--eval-every", "0.5"])
    os.remove(os.path.join(run, "done"))
    os.remove(os.path.join(run, "checkpoints", "last.pt"))  # resume from the row before the last
    prev = os.path.join(run, "checkpoints", "prev.pt")
    ckpt = torch.load(prev, weights_only=True)
    ckpt["config"]["device_name"] = "NVIDIA A100-SXM4-80GB"
    torch.save(ckpt, prev)
    with pytest.raises(SystemExit) as e:
        in_process.main(TINY + ["--run-dir", run, "--cycles", "1", "--eval-every", "0.5", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "other hardware (device_name: 'NVIDIA A100-SXM4-80GB' -> " in err
    assert "--allow-device-change" in err
    in_process.main(TINY + ["--run-dir", run, "--cycles", "1", "--eval-every", "0.5", "--resume",
                            "--allow-device-change"])
    config = json.load(open(os.path.join(run, "config.json")))
    assert os.path.exists(os.path.join(run, "done")) and len(config["device_names"]) == 2


def test_schedule_free_evaluations_leave_no_trace(in_process, tmp_path):
    """Its eval/train switch is not bit-exact: without putting the training weights back, two runs that differ
    only in how often they evaluate end with different weights."""
    ends = []
    for every in ("0", "0.5"):
        run = str(tmp_path / f"every{every}")
        in_process.main(TINY + ["--run-dir", run, "--schedule", "schedule-free", "--amp", "none", "--eval-every",
                                every])
        ckpt = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)
        with open(os.path.join(run, "metrics.csv")) as f:
            last = f.read().splitlines()[-1].split(",")
        ends.append((ckpt["model"], ckpt["optimizer"]["state"], last[4:7]))  # validation loss and accuracies
    (w0, s0, row0), (w1, s1, row1) = ends
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(s0[i]["z"], s1[i]["z"]) for i in s0) and row0 == row1


RECALIBRATE = """import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train
from data import build_data
from models import build_model
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
ddp = world > 1
if ddp:
    dist.init_process_group("gloo")
data = build_data("synthetic", None, torch.device("cpu"), subset=256)
stats = []
for r in ([rank] if ddp else range(2)):  # one process: each of the two ranks' slices in turn
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, 3)
    loader = data.train_loader(64, r, 2, 0)
    from methods import MethodList
    plain = MethodList([])
    train.recompute_bn(model, loader, 9, plain, torch.autocast("cpu", enabled=False), ddp=ddp, batches_used=2)
    stats.append(torch.cat([b for n, b in model.state_dict().items() if "running" in n]))
if rank == 0:
    torch.save(stats, {out!r})
if ddp:  # a clean gloo shutdown: without it a rank can abort at exit ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
"""


def test_batchnorm_recalibration_uses_every_ranks_images(tmp_path):
    """Two gloo ranks: each recomputes on its slice of the same global batches, and the statistics are averaged;
    equal to one process doing each slice and averaging (not rank 0's slice alone, half the images)."""
    outs = []
    for torchrun in (0, 2):
        out = str(tmp_path / f"stats{torchrun}.pt")
        script = tmp_path / f"recalibrate{torchrun}.py"
        script.write_text(RECALIBRATE.format(root=ROOT, out=out))
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
        cmd = [sys.executable] + launcher
        p = subprocess.run(cmd + [str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(torch.load(out))
    (first, second), (averaged,) = outs
    torch.testing.assert_close(averaged, (first + second) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second, rtol=1e-3)  # the slices differ: the average is not rank 0's


def test_a_two_node_sweep_gives_each_run_its_own_rendezvous_and_one_report(tmp_path):
    plans = []
    for node in ("0", "1"):
        env = dict(ENV, RDZV_ID="job42", NNODES="2", SLURM_NODEID=node)
        p = subprocess.run([os.path.join(ROOT, "launch.sh"), "sweep", "--dry-run", "--gpus", "8", "--rdzv-endpoint",
                            "head:29400", "--methods", "baseline,ls", "--cycles", "2", "--out", str(tmp_path)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        plans.append(p.stdout.splitlines())
    runs = [line for line in plans[0] if "train.py" in line]
    assert runs == [line for line in plans[1] if "train.py" in line]  # both nodes plan the same runs, in order
    ids = [line.split("--rdzv-id ")[1].split()[0] for line in runs]
    assert len(runs) == 6 and len(set(ids)) == 6 and all(i.startswith("job42-") for i in ids)
    assert "analysis.report" in plans[0][-1] and not any("analysis.report" in line for line in plans[1])
    sbatch = "\n".join(line for line in open(os.path.join(ROOT, "slurm", "sweep.sbatch")) if not line.startswith("#"))
    assert sbatch.index("./launch.sh setup") < sbatch.index("srun") and "SKIP_SETUP=1" in sbatch  # its commands


def test_gpu_check_runs_every_check_in_its_cpu_dry_mode(tmp_path):
    """The same script ./launch.sh gpu-check runs on a GPU, on CPU with tiny budgets: every check runs (or says
    why it is skipped) and the JSON summary holds them all, so the script cannot rot between GPU sessions."""
    out = tmp_path / "check"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py"), "--dry", "--out", str(out)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=900)
    summary = json.loads((out / "gpu-check.json").read_text())
    verdicts = {name: c["verdict"] for name, c in summary["checks"].items()}
    assert p.returncode == 0, (verdicts, p.stdout[-3000:], p.stderr[-2000:])
    assert verdicts == {"bf16": "passed", "fp16": "skipped", "compile": "skipped", "resume": "passed",
                        "estimators": "passed", "image_folder": "passed", "two_gpus": "passed",
                        "benchmark": "passed"}
    assert summary["checks"]["two_gpus"]["figures"]["one_process"]["acc1"] == pytest.approx(
        summary["checks"]["two_gpus"]["figures"]["two_ranks"]["val_acc1"], abs=0.02)
    assert summary["too_old"] == [] and summary["torch"] == torch.__version__


def test_gpu_check_skips_a_check_whose_optional_package_is_missing(tmp_path):
    """An offline GPU node's own Python without schedulefree: that estimator is skipped in one line, the rest run."""
    blocked = tmp_path / "blocked" / "schedulefree"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed on this machine')\n")
    env = dict(ENV, PYTHONPATH=str(tmp_path / "blocked"))
    out = tmp_path / "check"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py"), "--dry", "--only", "estimators", "--out",
                        str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    figures = json.loads((out / "gpu-check.json").read_text())["checks"]["estimators"]
    assert p.returncode == 0 and figures["verdict"] == "passed", p.stdout[-2000:]
    assert figures["figures"]["schedule-free"].startswith("skipped: the schedulefree package")
    assert isinstance(figures["figures"]["wsd"], float)
