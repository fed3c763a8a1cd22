"""Plans, packed runs and SLURM arrays without a cluster: launch.sh sweep --plan / --parallel, run-plan, and
slurm/array.sbatch through the shims in tests/shims (sbatch, srun, scontrol run the tasks here). Where only the
launching is tested, train.py is a fake that records its arguments and environment (a venv whose python runs
fake_train for a train.py run); the equalities of metrics are real tiny runs."""
import csv
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time

import pytest

from conftest import ENV, ROOT
from plan import descendants
from test_resume import TIME_COLUMNS, metrics_without_time

SHIMS = os.path.join(ROOT, "tests", "shims")
SMALL = ["--data", "synthetic", "--subset", "256", "--batch-size", "32", "--amp", "none"]
SHAPE = ["--seeds", "0", "--methods", "baseline", "--warmup", "1", "--t0", "1", "--cycles", "1", "--no-report"]

FAKE_TRAIN = r'''import fcntl, hashlib, json, os, signal, subprocess, sys, time
args = sys.argv[1:]
run, argv = args[args.index("--run-dir") + 1], args[args.index("train.py") + 1:]
log = lambda **e: os.write(os.open(os.environ["FAKE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT),
                           (json.dumps(dict(e, run=run, pid=os.getpid(), t=time.time())) + "\n").encode())
STOP = {signal.SIGINT, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, STOP)  # taken one by one below: two at once are two, not one handler call


def wait(seconds):  # as train.py: a signal ends the run after a checkpoint at its next step (FAKE_GRACE s here) with
    # exit 128 + signal; a second SIGINT ends it at once (train.py ignores a repeated SIGTERM: any second signal here
    # ends the fake, so that a test sees one plan.py should not have sent)
    got = signal.sigtimedwait(STOP, seconds)
    if got is not None:
        log(event="signal", signum=got.si_signo)
        again = signal.sigtimedwait(STOP, float(os.environ.get("FAKE_GRACE", "0.2")))
        if again is not None:
            log(event="signal", signum=again.si_signo)
            os._exit(1)
        log(event="stopped")  # its checkpoint written
        sys.exit(128 + got.si_signo)


os.makedirs(run, exist_ok=True)
if run.endswith(os.environ.get("FAKE_RACE") or "\0") and not os.path.exists(run + ".raced"):
    open(run + ".raced", "w").close()  # a train.py started by hand takes the folder between the claim and our lock
    hand = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
                             "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); print(flush=True); "
                             "time.sleep(300)", os.path.join(run, "lock")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # (not holding the worker's pipes)
    hand.stdout.readline()
    log(event="hand", hand=hand.pid)
lock = open(os.path.join(run, "lock"), "a+")
try:  # as train.py: one writer per run folder
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    log(event="twice")
    print(f"train.py: error: --run-dir {run} is in use by another train.py", file=sys.stderr)
    sys.exit(2)
lock.write(f"{os.getpid()}\n")
lock.flush()
keys = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TRAIN_CONCURRENT_RUNS", "SLURM_ARRAY_TASK_ID",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
log(event="start", env={k: os.environ.get(k) for k in keys}, cores=sorted(os.sched_getaffinity(0)), args=args)
if os.environ.get("FAKE_GRANDCHILD"):  # as torchrun's workers: a process in a session of its own
    kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log(event="grandchild", grandchild=kid.pid)
wait(float(os.environ.get("FAKE_SECONDS", "0.2")))
if run.endswith(os.environ.get("FAKE_DIE") or "\0") and not os.path.exists(run + ".died"):
    open(run + ".died", "w").close()  # killed from outside (the OOM killer, say), once
    os.kill(os.getpid(), signal.SIGKILL)
named = lambda flag: [a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                      if a.split("=")[0] == flag]
sha = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()
json.dump({"argv": argv, "recipe_sha256": [sha(p) for p in named("--config")],  # as train.py records them
           "plugins": {os.path.basename(p): "sha256:" + sha(p) for p in named("--plugins")}},
          open(os.path.join(run, "config.json"), "w"))
open(os.path.join(run, "done"), "w").close()
log(event="end")
'''


@pytest.fixture
def fake(tmp_path):
    """(environment, log reader): launch.sh's VENV runs fake_train for every train.py run, answers torch's GPU count
    with $FAKE_TORCH_GPUS (0), and runs the real python for the rest; no GPU unless a test says so."""
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    python = tmp_path / "venv" / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\ncase " $* " in *" --run-dir "*) exec {sys.executable} '
                      f'{tmp_path / "fake_train.py"} "$@";;\n*torch.cuda.device_count*) echo ${{FAKE_TORCH_GPUS:-0}}; '
                      f'exit;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = dict(ENV, VENV=str(tmp_path / "venv"), FAKE_LOG=str(tmp_path / "log"), SKIP_SETUP="1",
               SLURM_SHIM_STATE=str(tmp_path / "slurm"), PATH=f"{SHIMS}:{os.environ['PATH']}",
               CYCLIC_GPU_LOCKS=str(tmp_path / "gpu-locks"))  # (this machine's GPU locks: the test's own)

    def events(kind="start"):
        if not os.path.exists(tmp_path / "log"):
            return []
        return [e for e in map(json.loads, open(tmp_path / "log")) if e["event"] == kind]
    return env, events


def sh(*args, env, check=True, timeout=300):
    p = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def launch(*args, env, check=True):
    return sh(os.path.join(ROOT, "launch.sh"), *args, env=env, check=check)


def write_plan(path, out, records, gpus=0):
    """A plan written as a sweep writes it (plan.py write), from (run folder, train.py arguments) pairs."""
    subprocess.run([sys.executable, "plan.py", "write", str(path), str(out), str(gpus), "test"], cwd=ROOT, text=True,
                   input="".join(f"{d}\t{argv}\n" for d, argv in records), check=True, capture_output=True)


def numbered(out, n):
    """n fake runs r0, r1, ... in `out`."""
    return [(f"{out}/r{i}", f"--run-dir {out}/r{i} --resume auto --no-progress --seed {i}") for i in range(n)]


def real_env(tmp_path):
    return dict(ENV, VENV=os.path.join(ROOT, ".venv"), SKIP_SETUP="1", SLURM_SHIM_STATE=str(tmp_path / "slurm"),
                PATH=f"{SHIMS}:{os.environ['PATH']}", CYCLIC_GPU_LOCKS=str(tmp_path / "gpu-locks"))


def test_a_plan_is_the_sweeps_runs_in_its_order_and_runs_nothing(tmp_path, fake):
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    shape = ["--seeds", "0 1", "--methods", "baseline,ls", "--cycles", "1", "--", "--data", "synthetic", "--amp",
             "none"]
    dry = launch("sweep", "--out", str(out), "--dry-run", *shape, env=env).stdout.splitlines()
    told = launch("sweep", "--out", str(out), "--plan", str(plan), "--gpus-per-run", "0", *shape, env=env).stdout
    lines = plan.read_text().splitlines()
    assert lines[0].startswith("# command: ./launch.sh sweep --out") and "--plan" in lines[0]
    runs = [json.loads(line) for line in lines if not line.startswith("#")]
    assert [" ".join(["train.py"] + r["argv"]) for r in runs] == [line.split(" ", 1)[1] for line in dry
                                                                 if "train.py" in line]
    assert [r["index"] for r in runs] == list(range(8)) and {(r["gpus"], r["nodes"]) for r in runs} == {(0, 1)}
    assert f"sbatch --array=0-7%M slurm/array.sbatch {plan}" in told
    assert f"./launch.sh run-plan {plan} --parallel N" in told and "shells" not in told  # not --next per shell
    assert sorted(os.listdir(out)) == ["plan"] and events() == []  # nothing run, no run folder


def test_bad_plans_and_too_many_runs_at_once_are_one_line_and_run_nothing(tmp_path, fake):
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 3))
    text = plan.read_text()

    def refused(told, *args):
        p = launch(*args, env=env, check=False)
        assert p.returncode == 2 and told in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    refused("--index 3 is out of range: " + f"{plan} has 3 lines, 0-2", "run-plan", str(plan), "--index", "3")
    refused("--index x is out of range", "run-plan", str(plan), "--index", "x")
    refused("run-plan takes PLAN --index K", "run-plan", str(plan))
    refused("run-plan: --parallel takes the number of runs at once (1, 2, ...), got '0'", "run-plan", str(plan),
            "--parallel", "0")
    for k in ("-1", "\u00b2"):  # '²'.isdigit() is True
        refused(f" is out of range: {plan} has 3 lines, 0-2", "run-plan", str(plan), "--index", k)
    (tmp_path / "binary").write_bytes(b"# command: x\n\xff\xfe\n")
    refused(f"{tmp_path / 'binary'} is not a plan (not UTF-8 text)", "run-plan", str(tmp_path / "binary"), "--next")
    none = tmp_path / "none"
    empty = subprocess.run([sys.executable, "plan.py", "write", str(none / "plan"), str(none), "0", "test"], cwd=ROOT,
                           input="", text=True, capture_output=True)
    assert empty.stderr == "launch.sh: sweep: its options select no runs; no plan was written\n"
    assert empty.returncode == 2 and not none.exists()
    omp = sh(sys.executable, "plan.py", "check-parallel", "2", "0", env=dict(env, OMP_NUM_THREADS="x"), check=False)
    assert omp.returncode == 2 and len(omp.stderr.splitlines()) == 1
    assert omp.stderr.startswith("launch.sh: OMP_NUM_THREADS=x is not a number of threads"), omp.stderr
    plan.write_text(text.replace('"--seed", "1"', '"--seed", "7"'))  # edited by hand
    refused("was edited after it was written", "run-plan", str(plan), "--index", "1")
    refused("was edited after it was written", "run-plan", str(plan), "--next")
    plan.write_text(text)
    os.rename(out, tmp_path / "moved")  # the runs folder moved, the plan with it
    refused(f"the plan's runs folder {out} is missing (moved", "run-plan", str(tmp_path / "moved" / "plan"), "--next")
    assert events() == [] and not out.exists()
    cores = len(os.sched_getaffinity(0))
    sweep = ["sweep", "--out", str(tmp_path / "new"), *SHAPE, "--", *SMALL]
    refused(f"--parallel {cores + 1} runs of 1 process(es) need {cores + 1} cores; this machine has {cores}",
            *sweep[:1], "--parallel", str(cores + 1), *sweep[1:])
    gpus = tmp_path / "bin"
    gpus.mkdir()
    (gpus / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    (gpus / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{gpus}:{env['PATH']}"
    refused("--parallel 2 runs of 2 GPU(s) need 4 GPUs; this machine has 2 (0,1)", *sweep[:1], "--parallel", "2",
            "--gpus-per-run", "2", *sweep[1:])
    assert not (tmp_path / "new").exists()


def test_a_bad_plan_path_or_a_plan_being_run_is_refused_in_one_line_and_nothing_is_left(tmp_path, fake):
    """--plan '' (it ran the whole sweep here), --plan FOLDER (a traceback, FOLDER.tmp left behind), and a plan
    written again while a worker holds one of its lines (its workers' --index K would become other runs): one line,
    exit 2, nothing run, written or left."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    sweep = ["sweep", "--out", str(out), "--gpus-per-run", "0", *SHAPE, "--", "--amp", "none"]

    def refused(told, *args, p=None):
        p = p or launch(*args, env=env, check=False)
        assert p.returncode == 2 and p.stderr.startswith(f"launch.sh: {told}") and len(p.stderr.splitlines()) == 1, \
            p.stderr
    refused("--plan takes the file to write the plan to, got ''", sweep[0], "--plan", "", *sweep[1:])
    folder = tmp_path / "folder"
    folder.mkdir()
    refused(f"sweep: --plan {folder} is a folder; give the plan a file name, e.g. --plan {folder}/plan", sweep[0],
            "--plan", str(folder), *sweep[1:])
    (tmp_path / "file").write_text("")
    refused(f"sweep: cannot write the plan {tmp_path}/file/plan (File exists: {tmp_path}/file)", sweep[0], "--plan",
            str(tmp_path / "file" / "plan"), *sweep[1:])
    assert sorted(os.listdir(tmp_path)) == ["fake_train.py", "file", "folder", "venv"] and events() == []
    write_plan(plan, out, numbered(out, 3))
    text = plan.read_text()
    line = json.loads(text.splitlines()[3])
    holder = subprocess.Popen([sys.executable, "-c", "import json, sys, time, plan\nheld, _ = plan.claim(sys.argv[1], "
                               "json.loads(sys.argv[2]))\nprint(held is not None, flush=True)\ntime.sleep(300)",
                               str(plan), json.dumps(line)], cwd=ROOT, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "True\n"
        write = subprocess.run([sys.executable, "plan.py", "write", str(plan), str(out), "0", "test"], cwd=ROOT,
                               input=f"{out}/x\t--seed 9\n", text=True, capture_output=True)
        refused(f"sweep: --plan {plan} is being run (a line is held by pid {holder.pid} on {socket.gethostname()}): "
                f"write it again once its workers have ended", p=write)
        refused(f"sweep: --plan {plan} is being run", sweep[0], "--plan", str(plan), *sweep[1:])
        assert plan.read_text() == text and not os.path.exists(f"{plan}.tmp")
    finally:
        holder.kill()
        holder.wait()
    write_plan(plan, out, numbered(out, 2))  # its worker gone, it is written
    assert plan.read_text() != text and events() == []


def test_two_workers_claim_each_line_once_and_a_dead_workers_line_is_claimed_again(tmp_path, fake):
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 6))
    first = subprocess.Popen([os.path.join(ROOT, "launch.sh"), "run-plan", str(plan), "--next"], cwd=ROOT,
                             env=dict(env, FAKE_SECONDS="30"), start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not events() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its run die together (a node lost)
    first.wait()
    assert [e["run"] for e in events()] == [f"{out}/r0"] and not (out / "r0" / "done").exists()
    workers = [subprocess.Popen([os.path.join(ROOT, "launch.sh"), "run-plan", str(plan), "--next"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [w.wait(120) for w in workers] == [0, 0], [w.communicate() for w in workers]
    started = [e["run"] for e in events()]
    assert sorted(started) == sorted([f"{out}/r{i}" for i in range(6)] + [f"{out}/r0"])  # r0 again, none twice more
    assert {e["pid"] for e in events("start")} - {e["pid"] for e in events("end")} == {events()[0]["pid"]}
    assert events("twice") == [] and all((out / f"r{i}" / "done").exists() for i in range(6))
    assert len({e["pid"] for e in events()[1:]}) == 6


def test_parallel_slices_the_gpus_and_the_cores_and_records_them(tmp_path, fake):
    env, events = fake
    gpus = tmp_path / "bin"
    gpus.mkdir()
    (gpus / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n3\\n'\n")  # a node of 4 GPUs
    (gpus / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=f"{gpus}:{env['PATH']}", FAKE_SECONDS="0.5")
    launch("sweep", "--out", str(tmp_path / "study"), "--parallel", "2", "--gpus-per-run", "2", "--seeds", "0 1",
           "--cycles", "1", "--no-report", "--", "--data", "synthetic", "--amp", "none", env=env)
    runs = events()
    assert len(runs) == 4 and {e["env"]["CUDA_VISIBLE_DEVICES"] for e in runs} == {"0,1", "2,3"}
    assert all(e["args"][e["args"].index("--nproc_per_node") + 1] == "2" for e in runs)  # torchrun, 2 processes
    assert {e["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] for e in runs} == {"120"}  # its workers' grace to checkpoint
    assert {e["env"]["TRAIN_CONCURRENT_RUNS"] for e in runs} == {"2"}
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2 and shutil.which("taskset"):  # each run its half of the cores
        assert all(not set(a["cores"]) & set(b["cores"]) for a, b in overlapping(runs, events("end")))
        assert {len(e["cores"]) for e in runs} == {len(cores) // 2}
    # a SLURM allocation's GPUs (CUDA_VISIBLE_DEVICES) sliced one per run (no --gpus-per-run: one process each)
    write_plan(tmp_path / "p2" / "plan", tmp_path / "p2", numbered(tmp_path / "p2", 4))
    sh(sys.executable, "plan.py", "parallel", str(tmp_path / "p2" / "plan"), "2",
       env=dict(env, CUDA_VISIBLE_DEVICES="5,7", SLURM_JOB_ID="9"))
    second = [e for e in events() if "/p2/" in e["run"]]
    assert {e["env"]["CUDA_VISIBLE_DEVICES"] for e in second} == {"5", "7"}
    assert all("torch.distributed.run" not in e["args"] for e in second)


def two_gpu_machine(env, tmp_path, seconds):
    """The fake's environment on a machine whose nvidia-smi lists GPUs 0 and 1 and names none in the environment
    (not a SLURM allocation), each fake run lasting `seconds`."""
    gpus = tmp_path / "bin"
    gpus.mkdir()
    (gpus / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    (gpus / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    return dict(env, PATH=f"{gpus}:{env['PATH']}", FAKE_SECONDS=str(seconds))


def test_workers_started_by_hand_on_one_machine_take_a_gpu_slot_each(tmp_path, fake):
    """Three `--next` workers on a machine of 2 GPUs whose environment names none (not a SLURM allocation): each line
    gets a free GPU of its own (locked machine-wide, the third worker waits for one), and records the runs on the
    machine then; a SLURM job's CUDA_VISIBLE_DEVICES is left as it is; `run-plan --parallel 2` takes them too; a
    line wider than the machine is one line, exit 2."""
    env, events = fake
    env = two_gpu_machine(env, tmp_path, seconds=1)
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 5), gpus=1)
    workers = [subprocess.Popen([os.path.join(ROOT, "launch.sh"), "run-plan", str(plan), "--next"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    assert [w.wait(120) for w in workers] == [0, 0, 0], [w.communicate() for w in workers]
    assert len(events()) == 5 and {e["env"]["CUDA_VISIBLE_DEVICES"] for e in events()} <= {"0", "1"}, events()
    pairs = overlapping(events(), events("end"))  # never two runs on one GPU at once
    assert pairs and all(a["env"]["CUDA_VISIBLE_DEVICES"] != b["env"]["CUDA_VISIBLE_DEVICES"] for a, b in pairs)
    assert "2" in {e["env"]["TRAIN_CONCURRENT_RUNS"] for e in events()}
    write_plan(plan, out, numbered(out, 6), gpus=1)
    launch("run-plan", str(plan), "--index", "5", env=dict(env, CUDA_VISIBLE_DEVICES="7", SLURM_JOB_ID="8"))  # SLURM's
    assert (events()[-1]["env"]["CUDA_VISIBLE_DEVICES"], events()[-1]["env"]["TRAIN_CONCURRENT_RUNS"]) == ("7", None)
    other = tmp_path / "other"
    write_plan(other / "plan", other, numbered(other, 2), gpus=1)
    launch("run-plan", str(other / "plan"), "--parallel", "2", env=env)
    assert sorted(e["env"]["CUDA_VISIBLE_DEVICES"] for e in events()[-2:]) == ["0", "1"]
    write_plan(other / "plan", other, numbered(other, 2), gpus=3)
    p = launch("run-plan", str(other / "plan"), "--next", env=env, check=False)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f"launch.sh: run-plan: {other}/plan: runs on 3 GPU(s); this machine has 2 (0,1): run it on a node with 3"]
    assert len(events()) == 8


def overlapping(starts, ends):
    """The pairs of runs (their start events) that ran at the same time."""
    end = {e["pid"]: e["t"] for e in ends}
    return [(a, b) for i, a in enumerate(starts) for b in starts[i + 1:]
            if a["t"] < end[b["pid"]] and b["t"] < end[a["pid"]]]


def test_no_two_runs_of_any_plans_share_a_gpu_of_the_machine(tmp_path, fake):
    """GPU slots were a plan's own (PLAN.gpus/) and `--parallel` took none: a `--next` worker of one plan and a
    `--parallel 2` of another on a machine of 2 GPUs trained two runs on GPU 0. Every worker that picks its GPUs now
    locks each machine-wide (CYCLIC_GPU_LOCKS, else /tmp/cyclic-tradeoff-gpus-UID), waiting, said once, while too
    few are free; a SLURM job's GPUs (SLURM_JOB_ID with CUDA_VISIBLE_DEVICES) are its own and taken as given."""
    env, events = fake
    env = two_gpu_machine(env, tmp_path, seconds=3)
    a, b = tmp_path / "a", tmp_path / "b"
    write_plan(a / "plan", a, numbered(a, 2), gpus=1)
    write_plan(b / "plan", b, numbered(b, 3), gpus=1)
    workers = [subprocess.Popen([os.path.join(ROOT, "launch.sh"), "run-plan", str(plan), *how], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for plan, how in ((a / "plan", ["--next"]), (b / "plan", ["--parallel", "2"]))]
    assert [w.wait(120) for w in workers] == [0, 0], [w.communicate() for w in workers]
    told = "".join(w.stderr.read() for w in workers)
    assert len(events()) == 5 and {e["env"]["CUDA_VISIBLE_DEVICES"] for e in events()} == {"0", "1"}, told
    pairs = overlapping(events(), events("end"))
    assert pairs and all(x["env"]["CUDA_VISIBLE_DEVICES"] != y["env"]["CUDA_VISIBLE_DEVICES"] for x, y in pairs)
    assert "launch.sh: run-plan: waiting for 1 free GPU(s) of 0,1, held by pid " in told, told
    assert {e["env"]["TRAIN_CONCURRENT_RUNS"] for e in events() if "/b/" in e["run"]} == {"2"}


def test_a_worker_killed_mid_run_leaves_its_gpus_locked_by_the_run(tmp_path, fake):
    """The GPU locks were the worker's alone: `kill -9` of a worker freed its GPUs while its run trained on (its
    child lived), and the next worker was given the same GPU. The run holds them too now (inherited files)."""
    env, events = fake
    env = two_gpu_machine(env, tmp_path, seconds=6)
    a, b = tmp_path / "a", tmp_path / "b"
    write_plan(a / "plan", a, numbered(a, 1), gpus=2)
    write_plan(b / "plan", b, numbered(b, 1), gpus=1)
    first = subprocess.Popen([os.path.join(ROOT, "launch.sh"), "run-plan", str(a / "plan"), "--next"], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not events() and time.time() < deadline:
        time.sleep(0.1)
    assert events(), "the first run did not start"
    for pid in [first.pid] + descendants(first.pid):  # the worker itself (plan.py), not the run
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"plan.py" in f.read():
                os.kill(pid, signal.SIGKILL)
    launch("run-plan", str(b / "plan"), "--next", env=env)
    (run_a, run_b), (end_a, _) = events(), events("end")
    assert run_b["t"] >= end_a["t"], (run_a, run_b, end_a)  # b waited for a's run, not for a's worker
    first.wait(60)


def test_a_gpu_lock_folder_others_can_write_or_a_symlink_is_refused_in_one_line(tmp_path, fake):
    """/tmp/cyclic-tradeoff-gpus-UID has a name anyone can guess: made first by another user (or a symlink), its lock
    files could be pointed at a file of ours, which the lock's record then overwrote."""
    env, events = fake
    env = two_gpu_machine(env, tmp_path, seconds=0)
    write_plan(tmp_path / "a" / "plan", tmp_path / "a", numbered(tmp_path / "a", 1), gpus=1)
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    for folder in (shared, tmp_path / "link"):
        p = launch("run-plan", str(tmp_path / "a" / "plan"), "--next", env=dict(env, CYCLIC_GPU_LOCKS=str(folder)),
                   check=False)
        assert p.returncode == 2 and p.stderr.splitlines()[-1].startswith(
            f"launch.sh: run-plan: the GPU lock folder {folder} is not a folder of this user's alone"), p.stderr
    assert not events() and not os.listdir(elsewhere)


def test_a_signal_ends_every_child_a_failed_run_does_not_stop_the_others_and_none_runs_twice(tmp_path, fake):
    """SIGTERM to launch.sh (not to its children) ends both runs of a --parallel 2 sweep, which then resume; a run
    killed from outside is named at the end while the others finish; no run folder ever has two writers."""
    env, events = fake
    sweep = [os.path.join(ROOT, "launch.sh"), "sweep", "--out", str(tmp_path / "study"), "--parallel", "2", "--seeds",
             "0 1", "--cycles", "1", "--no-report", "--", "--data", "synthetic", "--amp", "none"]
    p = subprocess.Popen(sweep, cwd=ROOT, env=dict(env, FAKE_SECONDS="60"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(events()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 143 and "stopped by signal 15" in stderr, stdout[-2000:] + stderr[-2000:]
    for e in events():  # both children ended with the sweep
        with pytest.raises(ProcessLookupError):
            os.kill(e["pid"], 0)
    assert len(events()) == 2 and events("end") == [] and not list((tmp_path / "study").glob("*/*/*/done"))
    again = sh(*sweep, env=dict(env, FAKE_DIE="s1/cyclic"), check=False)  # one run dies from outside this time
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-2:] == [
        "launch.sh: 1 run(s) failed, see their messages above:", f"  {tmp_path}/study/baseline/s1/cyclic (exit -9)"]
    done = sorted(str(d.parent.relative_to(tmp_path / "study")) for d in (tmp_path / "study").glob("*/*/*/done"))
    assert done == ["baseline/s0/cyclic", "baseline/s0/standard-e2", "baseline/s1/standard-e2"]
    sh(*sweep, env=env)  # the third time only the failed run is left
    assert [e["run"].split("study/")[1] for e in events()][-1] == "baseline/s1/cyclic" and len(events()) == 2 + 4 + 1
    assert events("twice") == []


def test_a_run_stopped_by_a_signal_sent_to_it_alone_is_named_resumable_and_nothing_new_starts(tmp_path, fake):
    """train.py's stop (a checkpoint, exit 128 + the signal) on a signal its launcher did not get (sent to the run
    alone; a Ctrl-C that bash waits out) read as a failure, and the sweep or worker went on to start the next run:
    now it is named stopped and resumable, nothing new starts, and the exit status is 128 + the signal."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 3))
    sweep = ["sweep", "--out", str(tmp_path / "seq"), "--seeds", "0", "--cycles", "1", "--no-report", "--", "--data",
             "synthetic", "--amp", "none"]
    for how, signum, first in ((["run-plan", str(plan), "--next"], signal.SIGTERM, f"{out}/r0"),
                               (sweep, signal.SIGINT, f"{tmp_path}/seq/baseline/s0/cyclic")):
        p = subprocess.Popen([os.path.join(ROOT, "launch.sh"), *how], cwd=ROOT, env=dict(env, FAKE_SECONDS="60"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not [e for e in events() if e["run"] == first] and time.time() < deadline:
            time.sleep(0.05)
        os.kill(events()[-1]["pid"], signum)
        stderr = p.communicate(timeout=60)[1]
        name = signal.Signals(signum).name
        assert p.returncode == 128 + signum and "FAILED" not in stderr, stderr
        assert stderr.splitlines()[-2:] == [
            f"launch.sh: stopped ({name}, exit {128 + signum}; resumable from its last checkpoint): {first}",
            "launch.sh: stopped by a signal: no run was started after it; run the same command again to resume it"], \
            stderr
        assert events()[-1]["run"] == first and events("end") == []


def test_a_signalled_sweep_passes_it_on_waits_for_its_run_to_checkpoint_and_stops(tmp_path, fake):
    """A SIGTERM to a plain sweep (SLURM's early warning, --signal=TERM@300, reaches every process of the step) used
    to kill launch.sh at once: its run went on orphaned (and SLURM kills what a step leaves when its task ends). Now
    launch.sh passes it on, waits for the run's checkpoint, starts nothing more and exits 143; torchrun lines get
    120 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, in the printed command) before torchrun SIGKILLs its workers."""
    env, events = fake
    sweep = [os.path.join(ROOT, "launch.sh"), "sweep", "--out", str(tmp_path / "study"), "--seeds", "0", "--cycles",
             "1", "--no-report", "--", "--data", "synthetic", "--amp", "none"]
    p = subprocess.Popen(sweep, cwd=ROOT, env=dict(env, FAKE_SECONDS="60", FAKE_GRACE="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not events() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stderr = p.communicate(timeout=60)[1]
    first = f"{tmp_path}/study/baseline/s0/cyclic"
    assert p.returncode == 143 and [e["run"] for e in events("stopped")] == [first], stderr  # before launch.sh ended
    assert stderr.splitlines()[-2:] == [
        f"launch.sh: stopped (SIGTERM, exit 143; resumable from its last checkpoint): {first}",
        "launch.sh: stopped by a signal: no run was started after it; run the same command again to resume it"]
    assert len(events()) == 1 and not alive(events()[0]["pid"])
    dry = sh(*sweep[:2], "--dry-run", "--gpus", "2", *sweep[2:], env=env).stdout
    assert " train.py " in dry and all(line.startswith("env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120 ") for line in
                                       dry.splitlines() if " train.py " in line), dry
    for script in ("array", "sweep"):  # SLURM's early warning to the steps (not B:, the batch shell alone)
        assert "\n#SBATCH --signal=TERM@300\n" in open(os.path.join(ROOT, "slurm", f"{script}.sbatch")).read()


def test_a_local_array_runs_its_lines_one_at_a_time_with_slurms_variables(tmp_path, fake):
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 4))
    p = sh("sbatch", "--array=0-3%1", "slurm/array.sbatch", str(plan), env=env)
    assert p.stdout.startswith("Submitted batch job ")
    runs = events()
    assert [(e["run"], e["env"]["SLURM_ARRAY_TASK_ID"]) for e in runs] == [(f"{out}/r{i}", str(i)) for i in range(4)]
    ends = events("end")
    assert all(ends[i]["t"] <= runs[i + 1]["t"] for i in range(3))  # one at a time
    (out / "r2" / "done").unlink()
    p = sh(sys.executable, "plan.py", "unfinished", str(plan), env=env, check=False)
    assert p.returncode == 1 and p.stderr.splitlines()[1:] == [f"  2 {out}/r2"]


def test_unfinished_names_lines_without_done_or_done_with_other_arguments(tmp_path, fake):
    """After an array, `unfinished` lists what is left to run: a line whose run has no 'done', and one whose 'done'
    is another line's (its run finished with other arguments: the line was refused, not run)."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 3))
    launch("run-plan", str(plan), "--next", env=env)
    (out / "r0" / "done").unlink()
    (out / "r1" / "config.json").write_text(json.dumps({"argv": ["--run-dir", f"{out}/r1", "--lr", "0.2"]}))
    p = sh(sys.executable, "plan.py", "unfinished", str(plan), env=env, check=False)
    assert p.returncode == 1 and p.stderr.splitlines()[1:] == [f"  0 {out}/r0", f"  1 {out}/r1"], p.stderr


def test_unfinished_counts_a_run_of_an_older_recipe_or_plugin_as_not_the_lines(tmp_path, fake):
    """A plan written again after its --config recipe or --plugins file changed: run-plan refuses the old runs
    (train.py: 'lr: 0.1 -> 0.2'), so `unfinished` lists them too (it compares the files' hashes the runs recorded
    with the line's), and counts them finished again once the files are as the runs had them."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    recipe, plugin = tmp_path / "recipe.yaml", tmp_path / "mine.py"
    recipe.write_text("lr: 0.1\n")
    plugin.write_text("# a method\n")
    runs = [(d, f"{a} --config {recipe} --plugins={plugin}") for d, a in numbered(out, 2)]
    write_plan(plan, out, runs)
    launch("run-plan", str(plan), "--next", env=env)
    unfinished = lambda: sh(sys.executable, "plan.py", "unfinished", str(plan), env=env, check=False)  # noqa: E731
    assert unfinished().returncode == 0
    for path, text in ((recipe, "lr: 0.2\n"), (plugin, "# another method\n")):
        was = path.read_text()
        path.write_text(text)
        write_plan(plan, out, runs)  # the plan written again for the changed file
        p = unfinished()
        assert p.returncode == 1 and p.stderr.splitlines()[1:] == [f"  0 {out}/r0", f"  1 {out}/r1"], (path, p.stderr)
        path.write_text(was)
        write_plan(plan, out, runs)
        assert unfinished().returncode == 0
    assert len(events()) == 2


def patched_plan(tmp_path, patch):
    """The command of plan.py with `patch` (Python, on the modules plan, fcntl, json, os) applied first: a race or a
    file system simulated."""
    script = tmp_path / "patched_plan.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport fcntl, json, os, plan\n{patch}\n"
                      f"try:\n    sys.exit(plan.main(sys.argv[1:]))\nexcept plan.PlanError as e:\n"
                      f"    sys.exit(f'launch.sh: {{e}}')\n")
    return [sys.executable, str(script)]


def test_a_line_finished_between_the_test_for_done_and_its_claim_is_not_run_again(tmp_path, fake):
    """run-plan tests a line's 'done' before claiming it; its holder may finish it in between (a worker elsewhere
    ends its run and drops the claim): tested again once the claim is held, it is skipped, not run a second time."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 2))
    patch = """real = plan.claim
def claim(path, line):
    if line["index"] == 0:  # its run ends elsewhere, now
        os.makedirs(line["run_dir"])
        json.dump({"argv": line["argv"]}, open(os.path.join(line["run_dir"], "config.json"), "w"))
        open(os.path.join(line["run_dir"], "done"), "w").close()
    return real(path, line)
plan.claim = claim"""
    p = sh(*patched_plan(tmp_path, patch), "run", str(plan), "--next", env=env)
    assert [e["run"] for e in events()] == [f"{out}/r1"] and f"skip (done): {out}/r0" in p.stdout.splitlines()


def test_writing_a_plan_again_never_makes_a_worker_take_a_free_line_for_held(tmp_path, fake):
    """The write's test for held lines flocks each free claim file for a moment; a worker claiming that line then
    found it locked and left it to the claim's last holder (a dead worker: --index K exited 1, 'held elsewhere').
    The test holds the plan's pick lock, where workers claim: the worker waits for it, then runs its line."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 1))
    p = sh(sys.executable, "plan.py", "run", str(plan), "--index", "0", env=dict(env, FAKE_DIE="r0"), check=False)
    assert p.returncode == 1 and os.listdir(f"{plan}.claims")  # line 0's claim file, free, the line unfinished
    patch = """import time
real = plan.try_lock
def try_lock(path, create):
    f, holder = real(path, create)
    if f is not None and not create:  # the write's test, on a free claim: slowed down
        print("holding", flush=True)
        time.sleep(3)
    return f, holder
plan.try_lock = try_lock"""
    write = subprocess.Popen([*patched_plan(tmp_path, patch), "write", str(plan), str(out), "0", "test"], cwd=ROOT,
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    write.stdin.write("".join(f"{d}\t{argv}\n" for d, argv in numbered(out, 1)))
    write.stdin.close()
    assert write.stdout.readline() == "holding\n"
    worker = sh(sys.executable, "plan.py", "run", str(plan), "--index", "0", env=env, check=False)
    assert write.wait(30) == 0
    assert worker.returncode == 0 and (out / "r0" / "done").exists(), worker.stderr


def test_a_line_claimed_twice_where_flock_is_not_shared_fails_named(tmp_path, fake):
    """A file system whose flock does not reach across nodes (simulated: flock does nothing in either worker) lets a
    second worker claim a line the first runs; its record replaces the first's in the claim file, which the first
    reads back after its run: it fails the line naming the cause and the other claimant (exit 1), and marks the run
    folder suspect (claimed-twice: both may have written it): its 'done' no longer counts, for `unfinished`, the
    analysis or a rerun (which names the marker and runs nothing) until someone checks the run."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 1))
    worker = patched_plan(tmp_path, "fcntl.flock = lambda *args: None") + ["run", str(plan), "--next"]
    first = subprocess.Popen(worker, cwd=ROOT, env=dict(env, FAKE_SECONDS="3"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not events() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.Popen(worker, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second.communicate(timeout=60)  # it claimed line 0 too; its train.py found the run folder in use
    stderr = first.communicate(timeout=60)[1]
    assert first.returncode == 1 and stderr.splitlines()[-2:] == [
        "launch.sh: 1 run(s) failed, see their messages above:",
        f"  {out}/r0 (flock on {plan}.claims is not shared across nodes: line 0 claimed twice, also by pid "
        f"{second.pid} on {socket.gethostname()}; marked suspect: {out}/r0/claimed-twice)"], stderr
    assert second.returncode == 1 and len(events("twice")) == 1
    assert (out / "r0" / "claimed-twice").exists() and (out / "r0" / "done").exists()  # (written by the first)
    p = sh(sys.executable, "plan.py", "unfinished", str(plan), env=env, check=False)
    assert p.returncode == 1 and p.stderr.splitlines()[1:] == [f"  0 {out}/r0 (suspect: claimed twice, two workers "
                                                               f"may have written it; see {out}/r0/claimed-twice)"]
    again = launch("run-plan", str(plan), "--next", env=env, check=False)
    assert again.returncode == 1 and len(events()) == 1 and again.stderr.splitlines()[-1] == (
        f"  {out}/r0 (suspect: {out}/r0/claimed-twice says two workers may have written it at once: check the run, "
        f"then delete its folder to run the line again, or the file to keep the run)"), again.stderr
    from test_analysis import write_run  # a readable run so marked: the analysis leaves it out, named
    from analysis.runs import load_runs
    run = write_run(tmp_path, "marked", "standard", [], [(1, 50.0, 1.0, 0, 1)])
    (run / "claimed-twice").write_text("line 0 claimed twice\n")
    assert load_runs([str(run)]) == []


def test_a_line_that_cannot_be_started_fails_named_and_the_others_still_run(tmp_path, fake):
    """An error in a worker (here: a line whose arguments hold a NUL byte, which no process starts with) is its
    line's failure: one line naming the line and the error, no traceback, the other lines run, exit 1."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    runs = numbered(out, 3)
    runs[1] = (runs[1][0], runs[1][1] + " \0")
    write_plan(plan, out, runs)
    p = launch("run-plan", str(plan), "--next", env=env, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"launch.sh: FAILED (ValueError: embedded null byte): {out}/r1" in p.stderr.splitlines()
    assert sorted(e["run"] for e in events("end")) == [f"{out}/r0", f"{out}/r2"]


def test_a_line_held_elsewhere_is_named_with_its_host_and_job_and_never_looks_done(tmp_path, fake):
    """--next leaves a line another worker holds to it (exit 0: it runs there) and says the plan is not complete;
    --index K on a held line is an error (an array task that ran nothing must not look successful). Both name the
    holder's pid, host and SLURM job: flocks may not reach across nodes, so that is where to look."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 3))
    line = json.loads(plan.read_text().splitlines()[4])  # line 1, after 3 header lines and line 0
    holder = subprocess.Popen([sys.executable, "-c", "import json, sys, time, plan\nheld, _ = plan.claim(sys.argv[1], "
                               "json.loads(sys.argv[2]))\nprint(held is not None, flush=True)\ntime.sleep(300)",
                               str(plan), json.dumps(line)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              env=dict(env, SLURM_JOB_ID="77", SLURM_ARRAY_TASK_ID="3"))
    try:
        assert holder.stdout.readline() == "True\n"
        who = f"pid {holder.pid} on {socket.gethostname()} (SLURM_JOB_ID 77, SLURM_ARRAY_TASK_ID 3) (run-plan)"
        p = launch("run-plan", str(plan), "--next", env=env)
        assert sorted(e["run"] for e in events()) == [f"{out}/r0", f"{out}/r2"]
        assert p.stderr.splitlines()[-1].startswith(
            f"launch.sh: run-plan: 1 line(s) left to other workers, which hold them: 1 ({who}); the plan is complete "
            f"when they finish"), p.stderr
        p = launch("run-plan", str(plan), "--index", "1", env=env, check=False)
        assert p.returncode == 1 and p.stderr.splitlines() == [
            f"launch.sh: run-plan: line 1 ({out}/r1) is held elsewhere, by {who}: nothing was run here (if it is not "
            f"running there, run this line again)"], p.stderr
    finally:
        holder.kill()
        holder.wait()
    assert len(events()) == 2
    launch("run-plan", str(plan), "--index", "1", env=env)  # its holder gone, the line runs here
    assert (out / "r1" / "done").exists()


def test_a_run_folder_taken_by_hand_after_the_claim_is_left_to_its_holder_not_failed(tmp_path, fake):
    """A train.py started by hand on a line's folder between the claim and the run's own lock (the run is then
    refused: 'in use') runs that line: --next moves on and names it left to that holder, no failure."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 3))
    p = launch("run-plan", str(plan), "--next", env=dict(env, FAKE_RACE="r1"), check=False)
    hand = [e["hand"] for e in events("hand")]
    try:
        assert p.returncode == 0 and "FAILED" not in p.stderr and len(events("twice")) == 1, p.stderr
        assert (f"1 line(s) left to other workers, which hold them: 1 (pid {hand[0]} (train.py))"
                in p.stderr.splitlines()[-1]), p.stderr
        assert [(out / f"r{i}" / "done").exists() for i in range(3)] == [True, False, True]
    finally:
        for pid in hand:
            os.kill(pid, signal.SIGKILL)


def test_a_recipe_or_plugin_changed_after_the_plan_was_written_is_refused_by_name(tmp_path, fake):
    """The plan's checksum covers the arguments; the files they name (--config, --plugins) are hashed too, since the
    same arguments would run other options: a changed or missing one is one line naming it, exit 2, nothing run."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    recipe, plugin = tmp_path / "recipe.yaml", tmp_path / "mine.py"
    recipe.write_text("lr: 0.1\n")
    plugin.write_text("# a method\n")
    write_plan(plan, out, [(d, f"{a} --config {recipe} --plugins={plugin}") for d, a in numbered(out, 2)])
    recipe.write_text("lr: 0.2\n")
    for how in (["--index", "1"], ["--next"]):
        p = launch("run-plan", str(plan), *how, env=env, check=False)
        first = 1 if how[0] == "--index" else 0
        assert p.returncode == 2 and p.stderr.splitlines() == [
            f"launch.sh: run-plan: {recipe}, named in line {first}'s arguments, changed since the plan was written: "
            f"its runs would not be the plan's; put it back or write the plan again (./launch.sh sweep ... --plan "
            f"{plan})"], p.stderr
    recipe.write_text("lr: 0.1\n")
    plugin.unlink()
    p = launch("run-plan", str(plan), "--next", env=env, check=False)
    assert p.returncode == 2 and f"{plugin}, named in line 0's arguments, cannot be read (No such" in p.stderr
    assert events() == [] and sorted(os.listdir(out)) == ["plan"]  # no run folder, no plan.lock or plan.claims/
    plugin.write_text("# a method\n")  # both as they were: the plan runs
    launch("run-plan", str(plan), "--next", env=env)
    assert len(events("end")) == 2


def test_without_nvidia_smi_torch_counts_the_gpus_and_runs_on_gpus_refuse_where_there_are_none(tmp_path, fake):
    """No nvidia-smi (a container, say): torch's count in the runs' python slices the GPUs, so parallel runs do not
    all see every GPU; none there, a plan whose runs want GPUs is refused in one line (exit 2), nothing run."""
    env, events = fake
    env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if not os.path.exists(f"{d}/nvidia-smi"))
    out = tmp_path / "study"
    write_plan(out / "plan", out, numbered(out, 2))
    sh(sys.executable, "plan.py", "parallel", str(out / "plan"), "2", env=dict(env, FAKE_TORCH_GPUS="2"))
    assert sorted(e["env"]["CUDA_VISIBLE_DEVICES"] for e in events()) == ["0", "1"]
    gpu = tmp_path / "gpu"
    write_plan(gpu / "plan", gpu, numbered(gpu, 2), gpus=1)
    none = "--parallel 2 runs of 1 GPU(s): this machine has no GPU"
    for args, told in ((["check-parallel", "2", "1"], none), (["parallel", str(gpu / "plan"), "2"], none),
                       (["run", str(gpu / "plan"), "--index", "0"], "run-plan: line 0: runs on 1 GPU(s), and none is"),
                       (["run", str(gpu / "plan"), "--next"], f"run-plan: {gpu}/plan: runs on 1 GPU(s), and none is")):
        p = sh(sys.executable, "plan.py", *args, env=env, check=False)  # FAKE_TORCH_GPUS unset: torch finds none
        assert p.returncode == 2 and p.stderr.startswith(f"launch.sh: {told}") and len(p.stderr.splitlines()) == 1
    assert len(events()) == 2


def read_terminal(fd, shown):
    """Keep what the processes on a pseudo-terminal write (they would block on a full one) until all close it."""
    try:
        while True:
            data = os.read(fd, 4096)
            if not data:
                return
            shown.append(data)
    except OSError:  # EIO: the last process holding the terminal closed it
        return


def test_one_ctrl_c_reaches_each_run_once(tmp_path, fake):
    """Ctrl-C in a terminal reaches its whole foreground process group, the run included, and launch.sh passes it
    on to plan.py as SIGTERM a moment later: plan.py sends the run nothing more, so it gets that one signal and ends
    itself (train.py takes a second signal as 'die now', without its checkpoint); exit 130, the next line not run."""
    env, events = fake
    out, plan = tmp_path / "study", tmp_path / "study" / "plan"
    write_plan(plan, out, numbered(out, 2))
    master, terminal = os.openpty()
    p = subprocess.Popen([os.path.join(ROOT, "launch.sh"), "run-plan", str(plan), "--next"], cwd=ROOT,
                         env=dict(env, FAKE_SECONDS="60", FAKE_GRACE="1"), stdin=terminal, stdout=terminal,
                         stderr=terminal, start_new_session=True,
                         preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # the terminal is the session's
    os.close(terminal)
    shown = []
    reader = threading.Thread(target=read_terminal, args=(master, shown), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while not events() and time.time() < deadline:
        time.sleep(0.05)
    os.write(master, b"\x03")
    rc = p.wait(60)
    reader.join(10)
    os.close(master)
    assert rc == 130, b"".join(shown).decode(errors="replace")[-3000:]
    assert [(e["run"], e["signum"]) for e in events("signal")] == [(f"{out}/r0", signal.SIGINT)]
    assert [e["run"] for e in events("stopped")] == [f"{out}/r0"] == [e["run"] for e in events()]  # not killed
    for e in events():
        with pytest.raises(ProcessLookupError):
            os.kill(e["pid"], 0)


def alive(pid):
    """Whether pid runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_second_signal_more_than_2_s_after_the_first_kills_each_runs_whole_tree(tmp_path, fake):
    """SIGTERM to plan.py alone (no terminal: the runs did not get it) reaches each run once; a repeat at once adds
    nothing (launch.sh passes a Ctrl-C on as SIGTERM); one more than 2 s later kills the runs still ending, and
    what they started in sessions of their own (torchrun's workers: the GPU and the run's lock)."""
    env, events = fake
    out = tmp_path / "study"
    write_plan(out / "plan", out, numbered(out, 2))
    p = subprocess.Popen([sys.executable, "plan.py", "parallel", str(out / "plan"), "2"], cwd=ROOT,
                         env=dict(env, FAKE_SECONDS="60", FAKE_GRACE="60", FAKE_GRANDCHILD="1"),
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        second_signal_kills(p, events)
    finally:
        for e in events("grandchild"):
            if alive(e["grandchild"]):
                os.kill(e["grandchild"], signal.SIGKILL)


def second_signal_kills(p, events):
    deadline = time.time() + 120
    while (len(events()) < 2 or len(events("grandchild")) < 2) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    while len(events("signal")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # (a second signal would be logged by now)
    runs = sorted(e["run"] for e in events())
    assert sorted(e["run"] for e in events("signal")) == runs and {e["signum"] for e in events("signal")} == {15}
    for e in events():
        os.kill(e["pid"], 0)  # still ending (writing its checkpoint)
    time.sleep(max(0.0, max(e["t"] for e in events("signal")) + 2.5 - time.time()))  # > 2 s after plan.py's first
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 143 and "stopped by signal 15" in p.stderr.read()
    assert sorted(e["run"] for e in events("signal")) == runs and events("end") == events("stopped") == []
    for e in events():
        with pytest.raises(ProcessLookupError):
            os.kill(e["pid"], 0)
    assert len(events("grandchild")) == 2 and not any(alive(e["grandchild"]) for e in events("grandchild"))


# ---- real tiny runs: the ways of running a study give the same numbers ---------------------------------------------

REAL = [*SHAPE, "--", *SMALL, "--eval-every", "0.5"]  # 2 runs of 16 steps, 4 rows each (resumable mid-run)
RUNS = ("baseline/s0/cyclic", "baseline/s0/standard-e2")


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The plain sweep, one run after the other, one thread each (OMP_NUM_THREADS=1, as conftest.ENV)."""
    out = tmp_path_factory.mktemp("sequential") / "study"
    launch("sweep", "--out", str(out), *REAL, env=real_env(tmp_path_factory.mktemp("env")))
    return out


def test_parallel_two_on_cpu_equal_the_sequential_sweep_but_for_the_times(tmp_path, sequential):
    out = tmp_path / "study"
    launch("sweep", "--out", str(out), "--parallel", "2", *REAL, env=real_env(tmp_path))
    configs = {}
    for run in RUNS:
        assert metrics_without_time(out / run) == metrics_without_time(sequential / run), run
        configs[run] = json.load(open(out / run / "config.json"))
        alone = json.load(open(sequential / run / "config.json"))
        assert (alone["concurrent_runs"], configs[run]["concurrent_runs"]) == (1, 2)
        assert alone["threads"] == configs[run]["threads"] == 1 and configs[run]["gpus"] is None
    if shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2:  # each run its own cores
        assert configs[RUNS[0]]["cores"] != configs[RUNS[1]]["cores"]
    with open(out / RUNS[0] / "metrics.csv") as f:
        assert TIME_COLUMNS <= set(next(csv.reader(f)))  # (the columns left out of the comparison exist)


def test_a_local_array_two_at_once_killed_and_requeued_resumes_to_the_sweeps_numbers(tmp_path, sequential):
    """sbatch --array=0-1%2 through the shims, every process of both tasks SIGKILLed mid-run (a node lost), the
    job requeued: both runs resume and end equal to the sequential sweep's; then the report job, and the plan
    written again with other options: a result-defining one is refused; one that is not is reported finished by
    train.py, which records those arguments, so that the line counts as done for run-plan and `unfinished`."""
    env, out = real_env(tmp_path), tmp_path / "study"
    plan = out / "plan"
    launch("sweep", "--out", str(out), "--plan", str(plan), "--gpus-per-run", "0", *REAL, env=env)  # CPU lines
    job = subprocess.Popen(["sbatch", "--parsable", "--array=0-1%2", "slurm/array.sbatch", str(plan)], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           start_new_session=True)
    job_id = job.stdout.readline().strip()
    metrics, deadline = out / RUNS[0] / "metrics.csv", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (out / RUNS[0] / "done").exists()
    again = sh("scontrol", "requeue", job_id, env=env)
    assert f"resumed at step" in again.stdout and "exit code 0" in again.stderr
    for run in RUNS:
        assert metrics_without_time(out / run) == metrics_without_time(sequential / run), run
    sh("sbatch", "--dependency=afterany:" + job_id, "slurm/report.sbatch", str(plan), env=env)
    assert "| baseline |" in (out / "report" / "report.md").read_text()
    before, lines = (out / RUNS[0] / "metrics.csv").read_text(), plan.read_text()
    rewrite(plan, out, ["--lr", "0.2"])  # as the sweep writes it with '-- --lr 0.2' added
    p = launch("run-plan", str(plan), "--index", "0", env=env, check=False)
    assert p.returncode == 2 and "lr: 0.4 -> 0.2" in p.stderr and "refused the options" in p.stderr
    plan.write_text(lines)
    rewrite(plan, out, ["--checkpoint-every", "5"])  # not result-defining: train.py says the run is finished
    assert "is already finished" in launch("run-plan", str(plan), "--index", "0", env=env).stdout
    # ... and records these arguments as its own (argv_accepted): the line is done, as report and a rerun say
    assert "skip (done)" in launch("run-plan", str(plan), "--index", "0", env=env).stdout
    p = sh(sys.executable, "plan.py", "unfinished", str(plan), env=env, check=False)
    assert p.returncode == 1 and p.stderr.splitlines()[1:] == [f"  1 {out}/{RUNS[1]}"], p.stderr
    plan.write_text(lines)
    assert "skip (done)" in launch("run-plan", str(plan), "--index", "0", env=env).stdout
    assert (out / RUNS[0] / "metrics.csv").read_text() == before


def rewrite(plan, out, extra):
    """The plan written again, as a sweep with `extra` train.py flags writes it."""
    runs = [json.loads(line) for line in open(plan) if not line.startswith("#")]
    write_plan(plan, out, [(r["run_dir"], " ".join(r["argv"] + extra)) for r in runs])
