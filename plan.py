"""A study as a plan file, run line by line (a SLURM array task each), by workers that claim lines, or N at once.

    ./launch.sh sweep ... --plan FILE        writes FILE (plan.py write), runs nothing
    ./launch.sh run-plan FILE --index K      line K (counted from 0, as SLURM_ARRAY_TASK_ID)
    ./launch.sh run-plan FILE --next         claims line after line until none is left (several workers at once:
                                             one per SLURM job or allocation; started by hand on one machine, each
                                             GPU line takes free GPUs of its own, locked machine-wide against every
                                             plan's runs (gpu_locks()), or waits for them; CPU lines get no share
                                             of the cores: use --parallel there). It exits 0
                                             leaving lines that other workers hold to them: if one of those dies,
                                             its line waits for a rerun (report PLAN lists it)
    ./launch.sh run-plan FILE --parallel N   N workers here, each with its own GPUs or cores (as below)
    ./launch.sh sweep ... --parallel N       writes OUT/parallel.plan and runs it with N workers, each with its own
                                             GPUs (CUDA_VISIBLE_DEVICES: free ones, locked as --next's, unless a
                                             SLURM job's) or cores (taskset, OMP_NUM_THREADS)

A plan is '#' header lines (the sweep's command, the runs folder, the sha256 of every line after its own), then one
JSON object per run: index, run_dir, argv (train.py's complete arguments), gpus (torchrun processes; 0: one plain
process), nodes and, where argv names recipes or plug-ins, files ({path: sha256}: a line whose file changed since is
refused). A line is claimed by an flock on FILE.claims/<its run folder's hash> (which records the claimant's pid, host,
SLURM job and a random nonce, read back before and after the run: where flock does not reach across nodes, a second
claimant's record in its place fails the line), which the kernel drops when its worker dies, so a dead worker's line
is claimable again; a line whose run folder's lock is held (a train.py running it, started by anyone) is left alone.
Every line runs as a sweep runs it: skipped when done with the same arguments, else train.py --resume auto (resumes,
or names the result-defining options that differ).
No torch here: launch.sh calls this before any setup, and train.py imports placement()."""
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

from locks import lock_or_holder


class PlanError(Exception):
    """Bad input: one line, exit 2, nothing written."""


def placement(device_type, threads, gpu_count):
    """config.json's record of what a run had (not result-defining): the runs launched at once with it, its
    threads, the CPU cores it may use (its affinity) and the GPUs it saw."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(gpu_count)))
    return {"concurrent_runs": int(os.environ.get("TRAIN_CONCURRENT_RUNS") or 1), "threads": threads,
            "cores": ranges(cpus()), "gpus": gpus if device_type == "cuda" else None}


def cpus():
    """The CPU cores this process may use (taskset, cgroups), sorted; all of them where the OS cannot say."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def ranges(numbers):
    """[0, 1, 2, 5] -> '0-2,5' (taskset's list format)."""
    out, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n > start else f"{n}")
            start = None
    return ",".join(out)


# ---- the file ---------------------------------------------------------------------------------

def write(path, out, gpus, command, records):
    """records: (run_dir, argv string) in the sweep's order. Written whole or not at all; creates the runs folder."""
    if not records:
        raise PlanError("sweep: its options select no runs; no plan was written")
    if os.path.isdir(path):
        raise PlanError(f"sweep: --plan {path} is a folder; give the plan a file name, e.g. --plan "
                        f"{os.path.join(path, 'plan')}; no plan was written")
    held = claimed_line(path)
    if held:  # its lines would change under its workers: their --index K would run other runs
        raise PlanError(f"sweep: --plan {path} is being run (a line is held by {held}): write it again once its "
                        f"workers have ended, or write another file (--plan OTHER); no plan was written")
    lines = [f"# out: {out}\n"] + [json.dumps({"index": i, "run_dir": d, "argv": argv.split(), "gpus": gpus,
                                               "nodes": 1, **files(argv.split())}) + "\n"
                                    for i, (d, argv) in enumerate(records)]
    text = f"# command: {command}\n# sha256: {sha256(lines)}\n" + "".join(lines)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.makedirs(out, exist_ok=True)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.isfile(path + ".tmp"):
            os.remove(path + ".tmp")
        raise PlanError(f"sweep: cannot write the plan {path} ({e.strerror}: {e.filename}); no plan was written") \
            from None
    return len(records)


def sha256(lines):
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def named_files(argv, flags=("--config", "--plugins")):
    """The files argv names after these flags (--config F or --config=F), in order."""
    names = []
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in flags and (eq or i + 1 < len(argv)):
            names.append(value if eq else argv[i + 1])
    return names


def files(argv):
    """{"files": {path: sha256}} of the recipes and plug-ins argv names ({} where none): the plan's checksum covers
    the arguments, these cover what the files say (edited after the plan was written, the same argv runs other
    options)."""
    try:
        named = {path: file_sha256(path) for path in named_files(argv)}
    except OSError as e:
        raise PlanError(f"sweep: cannot read {e.filename} ({e.strerror}), named in the runs' arguments; no plan was "
                        f"written") from None
    return {"files": named} if named else {}


def stale(line, plan):
    """Why the line must not run (a recipe or plug-in changed or gone since the plan was written), or None."""
    for path, sha in line.get("files", {}).items():  # (plans from before the field have none)
        try:
            if file_sha256(path) == sha:
                continue
            what = "changed"
        except OSError as e:
            what = f"cannot be read ({e.strerror})"
        return (f"run-plan: {path}, named in line {line['index']}'s arguments, {what} since the plan was written: "
                f"its runs would not be the plan's; put it back or write the plan again (./launch.sh sweep ... "
                f"--plan {plan})")
    return None


def whole(text):
    """A count in ASCII digits ('²'.isdigit() is True too, and int() refuses it)."""
    return text.isascii() and text.isdigit()


def read(path):
    """(runs folder, run lines) of a plan that is whole, unedited and whose runs folder is where it says."""
    again = f"write it again with ./launch.sh sweep ... --plan {path}"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise PlanError(f"run-plan: cannot read the plan {path} ({e.strerror}); {again}") from None
    except UnicodeDecodeError:
        raise PlanError(f"run-plan: {path} is not a plan (not UTF-8 text); {again}") from None
    sha = next((i for i, line in enumerate(lines) if line.startswith("# sha256: ")), None)
    if sha is None or not lines[sha + 1:sha + 2] or not lines[sha + 1].startswith("# out: "):
        raise PlanError(f"run-plan: {path} is not a plan (no '# sha256:' and '# out:' lines); {again}")
    if lines[sha].split()[-1] != sha256(lines[sha + 1:]):
        raise PlanError(f"run-plan: {path} was edited after it was written (its lines do not match its sha256); "
                        f"{again} (its first line is the command)")
    out, runs = lines[sha + 1][len("# out: "):].rstrip("\n"), [json.loads(line) for line in lines[sha + 2:]]
    if not runs:  # (written before empty plans were refused)
        raise PlanError(f"run-plan: {path} has no lines (a sweep of no runs); nothing to run")
    if not os.path.isdir(out):
        raise PlanError(f"run-plan: the plan's runs folder {out} is missing (moved or deleted?); nothing was run: "
                        f"write the plan again for where the runs are (./launch.sh sweep ... --out NEW --plan FILE)")
    return out, runs


def same_argv(run_dir, argv, files=None):
    """True when the run was asked for with exactly these arguments (config.json's argv, or one train.py took since
    as asking for this finished run: argv_accepted) and with recipes and plug-ins of these contents: a sweep skips it
    as done. files: {path: sha256} of the files argv names (a plan line's record); None: the files as they are now."""
    try:
        files = files if files is not None else {path: file_sha256(path) for path in named_files(argv)}
    except OSError:
        return False
    recipes = [files.get(path) for path in named_files(argv, ("--config",))]
    plugins = {f"sha256:{files.get(path)}" for path in named_files(argv, ("--plugins",))}
    c = config(run_dir)
    asked = [c] + [a for a in c.get("argv_accepted", []) if isinstance(a, dict)]
    # a plug-in method's hash is recorded by its name (of the selected methods only): each must be a file's here
    return (any(a.get("argv") == argv and not (recipes and a.get("recipe_sha256") != recipes) for a in asked)
            and set(c.get("plugins", {}).values()) <= plugins)


def config(run_dir):
    """The run's config.json ({} where it has none that reads)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            c = json.load(f)
        return c if isinstance(c, dict) else {}
    except (OSError, ValueError):
        return {}


# A run folder that two workers may have written at once (its line claimed twice, seen after its run): its 'done' is
# not to be trusted, so the line counts as not finished, and report, the analysis and a rerun name the file until
# someone checks the run (then deletes the folder to run it again, or this file to keep it).
CLAIMED_TWICE = "claimed-twice"


def suspect(run_dir):
    return os.path.exists(os.path.join(run_dir, CLAIMED_TWICE))


def finished(line, as_planned=False):
    """The line's run has 'done' (and is not suspect) and was asked for with the line's arguments and files
    (same_argv): as they are now (the sweep's test for skipping it), or as_planned, as the plan recorded them
    (report's: train.py refuses a line whose recipe changed since, so a run of the old one is not the line's)."""
    if not os.path.exists(os.path.join(line["run_dir"], "done")) or suspect(line["run_dir"]):
        return False
    return same_argv(line["run_dir"], line["argv"], line.get("files") if as_planned else None)


# ---- claims ------------------------------------------------------------------------------------

def try_lock(path, create, private=False):
    """(open file holding an exclusive flock on path, None) or (None, what the holder wrote in it). private: a file
    of this user's alone (0600), never followed through a symlink."""
    if not create and not os.path.exists(path):
        return None, None
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600), "a+") if private \
        else open(path, "a+")
    holder = lock_or_holder(f)
    return (None, holder) if holder is not None else (f, None)


def claim(plan, line):
    """The line's claim (an open file to close when the run ends), or (None, who holds the line)."""
    folder = plan + ".claims"
    os.makedirs(folder, exist_ok=True)
    name = hashlib.sha256(os.path.abspath(line["run_dir"]).encode()).hexdigest()[:16]
    f, holder = try_lock(os.path.join(folder, name), create=True)
    if f is None:
        return None, f"{claimant_name(holder)} (run-plan)"
    holder = run_dir_holder(line)
    if holder is not None:
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_dir": line["run_dir"], "nonce": NONCE,
                        **{k: os.environ[k] for k in SLURM_IDS if os.environ.get(k)}}) + "\n")
    f.flush()
    return f, None


# Where flock does not reach across nodes, a second node's claim on a line succeeds and overwrites the first's record:
# each worker reads its record back before and after its run. NONCE: hosts may share a name (containers).
NONCE = secrets.token_hex(8)


def claimed_again(held):
    """Who replaced our record in the claim file held (a claimant on another node), or None while it is ours."""
    try:
        with open(held.name) as f:
            text = f.read().strip()
    except OSError:  # removed by hand: no second claimant to name
        return None
    try:
        record = json.loads(text)
        if record.get("nonce") == NONCE and record.get("pid") == os.getpid():
            return None
    except (ValueError, AttributeError):
        pass
    return claimant_name(text) if text else "unknown"


# Flocks do not reach across nodes on many network file systems: a claim records where its worker runs, so that a
# line held elsewhere names the node and the SLURM job to look at.
SLURM_IDS = ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID")


def claimant_name(text):
    """'pid 12 on node3 (SLURM_JOB_ID 45, SLURM_ARRAY_TASK_ID 6)' from a claim file ('pid 12': an older claim)."""
    try:
        c = json.loads(text)
        slurm = ", ".join(f"{k} {c[k]}" for k in SLURM_IDS if k in c)
        return f"pid {c['pid']} on {c['host']}" + (f" ({slurm})" if slurm else "")
    except (ValueError, TypeError, KeyError):
        return f"pid {text.split()[0]}"


def claimed_line(plan):
    """Who holds a line of the plan now ('pid 12 on node3'), or None. Tested under the plan's pick lock, where
    workers claim: a free claim flocked here for a moment would be taken by a claiming worker for a held line."""
    folder = plan + ".claims"
    if not os.path.isdir(folder):
        return None
    with contextlib.ExitStack() as stack:
        if os.path.exists(plan + ".lock"):  # (made before the first claim; opened to append, as NFS's flock, a
            # POSIX lock there, needs a file open for writing: nothing is written)
            fcntl.flock(stack.enter_context(open(plan + ".lock", "a")), fcntl.LOCK_EX)
        for name in sorted(os.listdir(folder)):
            f, holder = try_lock(os.path.join(folder, name), create=False)
            if f is not None:
                f.close()
            elif holder is not None:
                return claimant_name(holder)
    return None


def run_dir_holder(line):
    """Who holds the line's run folder (train.py's own lock: a run of the line started by anyone), or None."""
    f, holder = try_lock(os.path.join(line["run_dir"], "lock"), create=False)
    if f is not None:
        f.close()
    return None if holder is None else f"pid {holder} (train.py)"


# ---- running -----------------------------------------------------------------------------------

def visible_gpus():
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES where set (SLURM sets it), else nvidia-smi's list, else
    (no nvidia-smi: a container, say) torch's count in the runs' python; [] where none says any."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=60)
        if p.returncode == 0:
            return p.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:  # in a process of its own: no torch here
        p = subprocess.run([python(), "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True,
                           text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return []
    count = p.stdout.strip()
    return [str(i) for i in range(int(count))] if p.returncode == 0 and whole(count) else []


def gpu_locks():
    """This machine's GPU locks: a file per GPU, flocked by the run on it, whichever plan or worker started it
    (a machine-wide pick lock beside them). CYCLIC_GPU_LOCKS, else /tmp/cyclic-tradeoff-gpus-UID: /tmp, not
    $TMPDIR, since every worker of the machine must find the one folder and TMPDIR differs between shells and jobs;
    per user, since another user's files there would not open for writing (their runs are the scheduler's to
    keep apart)."""
    return os.environ.get("CYCLIC_GPU_LOCKS") or f"/tmp/cyclic-tradeoff-gpus-{os.getuid()}"


def private_folder(folder):
    """Create the GPU lock folder as this user's alone (0700), and refuse one that is a symlink or another user's (in
    /tmp anyone may make it first, and a lock file there could be pointed at another file)."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PlanError(f"run-plan: the GPU lock folder {folder} is not a folder of this user's alone (a symlink, "
                        f"another user's, or writable by others); remove it, or set CYCLIC_GPU_LOCKS to one")


def gpu_file(gpu):
    """A GPU's lock file name: its id (an index, or a UUID) with what a file name cannot hold replaced."""
    return "gpu-" + "".join(c if c.isalnum() or c in "-." else "_" for c in gpu)


def scheduled_gpus():
    """Whether a scheduler gave this process its GPUs (a SLURM job's CUDA_VISIBLE_DEVICES): they are its own, and
    numbered within the job (another job's GPU 0 may be another GPU), so they are taken as given, unlocked."""
    return bool(os.environ.get("SLURM_JOB_ID")) and "CUDA_VISIBLE_DEVICES" in os.environ


def json_or_none(text):
    """The object a lock file's holder wrote, or None (nothing, or not a JSON object)."""
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def slots(n, gpus_per_run, gpus=None):
    """The environment and cores (or None) of each of n runs at once: a slice of the GPUs (visible_gpus() unless
    given) each, a share of the cores each (pinned with taskset where present). PlanError where the machine has too
    few."""
    omp = os.environ.get("OMP_NUM_THREADS") or ""
    if omp and not whole(omp):
        raise PlanError(f"OMP_NUM_THREADS={omp} is not a number of threads: set a whole number (each run's threads "
                        f"at most) or unset it")
    gpus, cores = visible_gpus() if gpus is None else gpus, cpus()
    width = max(gpus_per_run, 1)  # GPUs, or processes on a CPU, of one run
    if gpus_per_run > 0 and not gpus:
        raise PlanError(f"--parallel {n} runs of {gpus_per_run} GPU(s): this machine has no GPU (none in "
                        f"CUDA_VISIBLE_DEVICES, nvidia-smi or torch): run on a GPU node, or without --gpus-per-run")
    if gpus and n * width > len(gpus):
        raise PlanError(f"--parallel {n} runs of {width} GPU(s) need {n * width} GPUs; this machine has {len(gpus)} "
                        f"({','.join(gpus)}): lower --parallel or --gpus-per-run")
    if not gpus and n * width > len(cores):
        raise PlanError(f"--parallel {n} runs of {width} process(es) need {n * width} cores; this machine has "
                        f"{len(cores)}: lower --parallel")
    share = len(cores) // n  # 0 on a GPU node with fewer cores than runs: then nothing is pinned
    threads = max(1, min(share // width, int(omp or share)))
    pin = share > 0 and shutil.which("taskset") is not None
    return [({"TRAIN_CONCURRENT_RUNS": str(n), "OMP_NUM_THREADS": str(threads),
              **({"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * width:(i + 1) * width])} if gpus else {})},
             ranges(cores[i * share:(i + 1) * share]) if pin else None) for i in range(n)]


def python():
    """The python the runs use: launch.sh's venv's where there is one, else this one."""
    venv_python = os.path.join(os.environ.get("VENV", ".venv"), "bin", "python")
    return venv_python if os.access(venv_python, os.X_OK) else sys.executable


def command(line):
    """The launcher and train.py's arguments, as launch.sh's sweep starts a run."""
    if line["gpus"] == 0:
        return [python(), "train.py", *line["argv"]]
    return ["env", f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={shutdown_timeout()}", python(), "-m", "torch.distributed.run",
            "--standalone", "--nproc_per_node", str(line["gpus"]), "--max-restarts",
            os.environ.get("MAX_RESTARTS", "0"), "train.py", *line["argv"]]


def shutdown_timeout():
    """torchrun's grace between its SIGTERM to its workers and their SIGKILL (torch's default: 30 s): 120 s for
    train.py's stop checkpoint (the next vote, every 25 steps, an evaluation falling due in between, the save),
    inside SLURM's 300 s early warning (slurm/*.sbatch); TORCH_ELASTIC_SHUTDOWN_TIMEOUT where set. An environment
    variable, not --shutdown-timeout: torchrun before that flag fails on it, and ignores the variable."""
    seconds = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or "120"
    if not whole(seconds):
        raise PlanError(f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={seconds} is not a number of seconds (torchrun's grace for "
                        f"its workers' stop): set a whole number or unset it (120)")
    return seconds


def take_gpus(gpus, plan, lock, give_up):
    """(environment, ExitStack holding their locks) for one line of a worker that picks its GPUs (none given by
    a scheduler): the first free ones of gpus (ids, per line, runs at once at least), each locked machine-wide
    (gpu_locks()) for the line, as
    CUDA_VISIBLE_DEVICES, and the runs on this machine's GPUs then, itself included, as TRAIN_CONCURRENT_RUNS.
    Too few free (other workers of this plan or another, --parallel or by hand): it waits, said once. ({}, None)
    without GPUs to pick; (None, None) once give_up() (a signal came, or every line was tried: nothing to wait for).
    lock: the runner's, held to print."""
    if not gpus:
        return {}, None
    ids, width, at_least = gpus
    folder, waiting = gpu_locks(), False
    private_folder(folder)
    while not give_up():
        with open(os.path.join(folder, "pick"), "a") as pick:  # one taker of the machine looks at a time
            fcntl.flock(pick, fcntl.LOCK_EX)
            files = {g: try_lock(os.path.join(folder, gpu_file(g)), create=True, private=True) for g in ids}
            free = [g for g, (f, _) in files.items() if f is not None]
            take = free[:width] if len(free) >= width else []
            for g in free:
                if g not in take:  # (locked to see whether it was free)
                    files[g][0].close()
            held = [json_or_none(holder) or {} for f, holder in files.values() if f is None]
            taken = contextlib.ExitStack()
            taken.files = [files[g][0] for g in take]  # the run inherits them (Runner.start): its lock, not ours
            for g in take:
                f = taken.enter_context(files[g][0])
                f.seek(0)
                f.truncate()
                f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "plan": plan,
                                    "taker": f"{os.getpid()}.{threading.get_ident()}"}) + "\n")
                f.flush()
        if take:
            runs = len({h.get("taker") for h in held}) + 1
            return ({"CUDA_VISIBLE_DEVICES": ",".join(take), "TRAIN_CONCURRENT_RUNS": str(max(runs, at_least))},
                    taken)
        if not waiting:
            waiting = True
            names = sorted({f"pid {h.get('pid')} on {h.get('host')} ({h.get('plan')})" for h in held})
            with lock:
                print(f"launch.sh: run-plan: waiting for {width} free GPU(s) of {','.join(ids)}, held by "
                      f"{', '.join(names)}", file=sys.stderr, flush=True)
        time.sleep(0.5)
    return None, None


def check_flock(plan):
    """Claims are flocks: a file system without them (NFS, Lustre mounted without) is one line (PlanError)."""
    try:
        with open(plan + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # another worker is picking: it can lock
    except OSError as e:
        raise PlanError(f"run-plan: cannot lock {plan}.lock ({e.strerror}): the plan's folder must be on a file "
                        f"system with flock; write the plan elsewhere (--plan FILE)") from None


class ChildProcesses:
    """A Runner's child processes and the signals that end them: each child started unless a signal came first,
    its output passed on (prefixed with its run's folder where several run at once), and a signal's handling."""

    def __init__(self, out, prefix):
        self.out, self.prefix = out, prefix
        self.signal, self.signalled_at, self.killed, self.wakeup = None, None, False, None
        self.children, self.lock = {}, threading.RLock()  # child -> started as a signal came (the handler takes it)

    def start(self, line, cmd, env, keep=()):
        """Run cmd to its end: its exit status, or None where a signal came first (nothing started). keep: open files
        the child holds too (its GPUs' locks: a worker killed mid-run leaves them held by the run)."""
        pipe = subprocess.PIPE if self.prefix else None
        with self.lock:  # no child starts after the handler ran; one started as the signal came is marked for it
            if self.signal:
                return None
            p = subprocess.Popen(cmd, env=env, stdout=pipe, stderr=pipe, text=True, pass_fds=[f.fileno() for f in keep])
            self.children[p] = bool(select.select([self.wakeup], [], [], 0)[0]) if self.wakeup else False
        pumps = [threading.Thread(target=self.pump, args=(line, s, d)) for s, d in
                 ((p.stdout, sys.stdout), (p.stderr, sys.stderr)) if s is not None]
        for t in pumps:
            t.start()
        rc = p.wait()
        for t in pumps:
            t.join()
        with self.lock:
            del self.children[p]
        return rc

    def pump(self, line, source, sink):
        for text in source:
            self.say(line, text.rstrip("\n"), sink)

    def say(self, line, text, sink=sys.stdout):
        name = os.path.relpath(line["run_dir"], self.out) if self.prefix else ""
        with self.lock:
            print(f"[{name}] {text}" if name else text, file=sink, flush=True)

    def stop(self, signum, frame):
        """Each child gets one signal per request: a first signal ends them (SIGTERM, but for a Ctrl-C, which the
        terminal sent to our whole process group, children included), a second more than 2 s later kills them.
        Signals in between add nothing: launch.sh passes a Ctrl-C on as SIGTERM a moment after it, and train.py
        takes a second SIGINT as 'die now' (no checkpoint). The kill reaches each child's whole tree (torchrun's
        workers, in sessions of their own, would live on holding the GPU and the run's lock)."""
        now = time.monotonic()
        with self.lock:
            if self.signal is None:
                self.signal, self.signalled_at = signum, now
                got_it = from_terminal(signum)
                for p, late in self.children.items():  # late: started after the signal had reached us
                    if late or not got_it:
                        p.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
            elif now - self.signalled_at > 2 and not self.killed:
                self.killed = True
                # each child's whole tree, found before any of it dies (an orphan's parent is no longer the child);
                # none under a child already reaped, whose pid may be another process's by now
                trees = {p: descendants(p.pid) for p in self.children if p.returncode is None}
                for p, tree in trees.items():
                    p.kill()
                    for pid in tree:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass


class Runner(ChildProcesses):
    """Workers over one plan's lines: each claims the next line nobody holds, runs it, and goes on; every line is
    tried at most once here. A refusal of the options, or a recipe changed since the plan was written, stops new
    claims (every run would be refused alike); a signal ends every child (train.py's checkpoint and rows stay: the
    run resumes) and stops. own=True (--index K): the lines are this task's, so one held elsewhere is an error."""

    def __init__(self, plan, out, lines, prefix, own=False, gpus=None):
        super().__init__(out, prefix)
        self.plan, self.lines, self.own = plan, lines, own
        self.gpus = gpus  # (ids, per line, runs at once at least): the GPUs its workers pick from, or None
        self.tried, self.failed, self.busy, self.refused, self.stale = set(), [], {}, None, None
        self.stopped = None  # (run folder, exit status) of a run stopped by a signal sent to it alone

    def next_line(self):
        with open(self.plan + ".lock", "a") as pick:  # one worker picks at a time, on this machine or another
            fcntl.flock(pick, fcntl.LOCK_EX)
            for line in self.lines:
                with self.lock:
                    if self.refused or self.stale or self.signal or self.stopped or line["index"] in self.tried:
                        continue
                if finished(line):
                    self.skip(line)
                    continue
                held, holder = claim(self.plan, line)
                if held is None:
                    self.busy[line["index"]] = holder
                    continue
                if finished(line):  # its holder finished it between the test above and our claim
                    held.close()
                    self.skip(line)
                    continue
                self.busy.pop(line["index"], None)
                self.tried.add(line["index"])
                why = stale(line, self.plan)
                if why:
                    held.close()
                    with self.lock:
                        self.stale = why
                    return None, None
                return line, held
        return None, None

    def skip(self, line):
        self.say(line, f"skip (done): {line['run_dir']}")
        self.tried.add(line["index"])
        self.busy.pop(line["index"], None)

    def work(self, env, cores):
        """One worker. An error of its own (not its run's: a line that cannot be started, a full /tmp) fails its
        line, named, and the worker goes on; one while picking a line ends the worker."""
        while True:
            try:
                gpus, slot = self.gpu_slot()  # before the line: a worker waiting for GPUs holds no line
                line, held = self.next_line() if gpus is not None else (None, None)
            except Exception as e:
                return self.fail(None, f"{type(e).__name__}: {e}")
            with slot or contextlib.nullcontext():  # the slot's GPUs are this line's until it ends
                if line is None:
                    return
                try:
                    with held:
                        self.run(line, {**env, **gpus}, cores, held, getattr(slot, "files", ()))
                except Exception as e:
                    self.fail(line, f"{type(e).__name__}: {e}")

    def gpu_slot(self):
        """take_gpus for this worker: (None, None) once a signal came, or every line was tried here."""
        return take_gpus(self.gpus, self.plan, self.lock, lambda: self.signal or all(
            line["index"] in self.tried for line in self.lines))

    def run(self, line, env, cores, held, keep=()):
        cmd = (["taskset", "-c", cores] if cores else []) + command(line)
        if suspect(line["run_dir"]):
            marker = os.path.join(line["run_dir"], CLAIMED_TWICE)
            return self.fail(line, f"suspect: {marker} says two workers may have written it at once: check the run, "
                                   f"then delete its folder to run the line again, or the file to keep the run")
        if self.claimed_twice(line, held):
            return
        self.say(line, "+ " + " ".join(cmd))
        fd, refusal = tempfile.mkstemp(prefix="refusal-")
        os.close(fd)
        try:
            rc = self.start(line, cmd, {**os.environ, **env, "TRAIN_REFUSAL_FILE": refusal}, keep)
            refused = bool(rc) and os.path.getsize(refusal) > 0
        finally:
            os.remove(refusal)
        if self.claimed_twice(line, held, ran=True):
            return
        with self.lock:
            if not rc or self.signal:
                return
            if refused:
                self.refused = self.refused or line["run_dir"]
                return
            if rc in STOPPED:  # its checkpoint saved on a signal we did not get: its job is ending, or someone
                # stops it; no new line starts (torchrun's lines exit 1 whatever their workers' status: failures)
                self.stopped = self.stopped or (line["run_dir"], rc)
                print(f"launch.sh: stopped ({STOPPED[rc]}, exit {rc}; resumable from its last checkpoint): "
                      f"{line['run_dir']}", file=sys.stderr, flush=True)
                return
        holder = run_dir_holder(line)  # a train.py started by hand took the folder first: it runs the line
        if holder is not None:
            self.busy[line["index"]] = holder
            self.say(line, f"left to {holder}, which holds {line['run_dir']}", sys.stderr)
            return
        self.fail(line, f"exit {rc}")

    def claimed_twice(self, line, held, ran=False):
        """Fails the line where another claimant's record replaced ours (its run may have run on two nodes at once);
        ran: after our run, whose folder both may have written, which is then marked suspect."""
        other = claimed_again(held)
        if other is None:
            return False
        why = (f"flock on {self.plan}.claims is not shared across nodes: line {line['index']} claimed twice, also by "
               f"{other}")
        if ran and os.path.isdir(line["run_dir"]):
            marker = os.path.join(line["run_dir"], CLAIMED_TWICE)
            with open(marker, "w") as f:
                f.write(why + "\n")
            why += f"; marked suspect: {marker}"
        self.fail(line, why)
        return True

    def fail(self, line, why):
        name = line["run_dir"] if line else f"a worker of {self.plan}"
        with self.lock:
            self.failed.append((name, why))
            print(f"launch.sh: FAILED ({why}): {name}", file=sys.stderr, flush=True)

    def go(self, workers):
        """Run the workers [(env, cores)] to the end; the exit status (0, 1 failures, 2 refused, 128 + a signal)."""
        check_flock(self.plan)
        if self.gpus:  # before any worker: a lock folder of others is one line, not a failure per worker
            private_folder(gpu_locks())
        # a signal's C handler writes this pipe at once; ours runs later, in this thread: a child started in between
        # did not get a terminal's signal
        self.wakeup, written = os.pipe()
        os.set_blocking(written, False)
        signal.set_wakeup_fd(written, warn_on_full_buffer=False)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.stop)
        threads = [threading.Thread(target=self.work, args=w, daemon=True) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        return run_summary(self)


def run_summary(r):
    """The end of a Runner's work (Runner.go): its summary on stderr, and the exit status: 128 + a signal, 2 a
    stale plan or refused options, the stopped run's status, 1 failures or a task's line held elsewhere, else 0."""
    if r.signal:
        print(f"launch.sh: stopped by signal {r.signal}: the runs it ended resume where they stopped when the "
              f"plan is run again", file=sys.stderr)
        return 128 + r.signal
    if r.stale:
        print(f"launch.sh: {r.stale}", file=sys.stderr)
        return 2
    if r.refused:
        print(f"launch.sh: stopped: {r.refused}: train.py refused the options (the reason above)",
              file=sys.stderr)
        return 2
    if r.failed:
        print(f"launch.sh: {len(r.failed)} run(s) failed, see their messages above:", file=sys.stderr)
        for name, why in r.failed:
            print(f"  {name} ({why})", file=sys.stderr)
    if r.stopped:  # (a sweep's exit status: not 0, not 1, so launch.sh writes no report)
        print("launch.sh: stopped by a signal: no run was started after it; run the same command again to resume "
              "it", file=sys.stderr)
        return 1 if r.failed else r.stopped[1]
    if r.busy and r.own:  # an array task that ran nothing must not look like one that ran its line
        (i, holder), = r.busy.items()
        print(f"launch.sh: run-plan: line {i} ({r.lines[0]['run_dir']}) is held elsewhere, by {holder}: "
              f"nothing was run here (if it is not running there, run this line again)", file=sys.stderr)
        return 1
    if r.busy:  # fine (other workers run them), but the plan is not complete
        held = ", ".join(f"{i} ({h})" for i, h in sorted(r.busy.items()))
        print(f"launch.sh: run-plan: {len(r.busy)} line(s) left to other workers, which hold them: {held}; the "
              f"plan is complete when they finish (./launch.sh report {r.plan} names what did not)",
              file=sys.stderr)
    return 1 if r.failed else 0




# train.py's exit statuses where a signal stopped it at a checkpoint (128 + the signal): resumable, not failed
STOPPED = {128 + signal.SIGINT: "SIGINT", 128 + signal.SIGTERM: "SIGTERM"}


def descendants(pid):
    """The processes below pid (children, theirs, ...), from /proc's parent links: torchrun starts its workers in
    sessions of their own, out of reach of a signal to its process group. [] without /proc."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{int(entry)}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, ppid
        except (OSError, ValueError, IndexError):  # not a process (/proc/self, /proc/cpuinfo), or one that ended
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def from_terminal(signum):
    """Whether the signal came from a terminal to our whole process group (children included): a Ctrl-C while our
    group is its foreground group. A SIGTERM (kill, launch.sh passing a signal on, a scheduler) is taken as ours."""
    if signum != signal.SIGINT:
        return False
    try:
        fd = os.open("/dev/tty", os.O_RDONLY)
    except OSError:  # no controlling terminal: sent by kill, to us
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def run_plan(args):
    """run PLAN --index K | --next | --parallel N: one line (the array task's) or, claimed one after another, all of
    them, by this worker or N at once."""
    usage = "run-plan takes PLAN --index K (a line, from 0: SLURM_ARRAY_TASK_ID), PLAN --next or PLAN --parallel N"
    if len(args) not in (2, 3) or args[1] not in ("--index", "--next", "--parallel") \
            or len(args) != 2 + (args[1] != "--next"):
        raise PlanError(f"{usage}, got '{' '.join(args)}'")
    out, lines = read(args[0])
    what = args[0]
    if args[1] == "--parallel" and not (whole(args[2]) and int(args[2]) > 0):
        raise PlanError(f"run-plan: --parallel takes the number of runs at once (1, 2, ...), got '{args[2]}'")
    if args[1] == "--index":
        k = args[2]
        if not whole(k) or int(k) >= len(lines):
            raise PlanError(f"run-plan: --index {k} is out of range: {args[0]} has {len(lines)} lines, "
                            f"0-{len(lines) - 1}")
        lines, what = [lines[int(k)]], f"line {k}"
    why = next(filter(None, (stale(line, args[0]) for line in lines)), None)
    if why:  # before any claim or lock is made: a refused plan is left as it was
        raise PlanError(why)
    need = max(line["gpus"] for line in lines)
    have = visible_gpus() if need > 0 else []
    if need > 0 and not have:
        raise PlanError(f"run-plan: {what}: runs on {need} GPU(s), and none is visible here (CUDA_VISIBLE_DEVICES, "
                        f"nvidia-smi, torch): run it on a GPU node")
    if need > len(have) and args[1] == "--index" and "SLURM_JOB_ID" in os.environ:
        raise PlanError(f"run-plan: line {k} runs on {need} GPU(s); this task has {len(have)}: submit the array "
                        f"with --gpus-per-task={need}")
    if args[1] == "--parallel":
        return parallel(args[0], int(args[2]), (out, lines))
    gpus = None  # GPUs not a scheduler's: this worker picks them, each locked for its line against every other run
    if need > 0 and not scheduled_gpus():
        if need > len(have):
            raise PlanError(f"run-plan: {what}: runs on {need} GPU(s); this machine has {len(have)} "
                            f"({','.join(have)}): run it on a node with {need}")
        gpus = (have, need, 1)
    return Runner(args[0], out, lines, prefix=False, own=args[1] == "--index", gpus=gpus).go([({}, None)])


def parallel(plan, n, read_plan=None):
    """n workers here, each with its share of the cores; GPUs (a plain process takes one) picked per line from
    the machine's, locked, unless a scheduler gave them (then sliced as slots() says)."""
    out, lines = read_plan or read(plan)
    ids = visible_gpus()
    workers = slots(n, lines[0]["gpus"], ids)
    gpus = (ids, max(lines[0]["gpus"], 1), n) if ids and not scheduled_gpus() else None
    return Runner(plan, out, lines, prefix=n > 1, gpus=gpus).go(workers)


def unfinished(plan):
    """List the lines not finished (no 'done', or done with other arguments: a line refused); exit 1 if any."""
    out, lines = read(plan)
    left = [line for line in lines if not finished(line, as_planned=True)]
    if left:
        print(f"launch.sh: {len(left)} of {len(lines)} line(s) of {plan} did not finish (run them again: "
              f"./launch.sh run-plan {plan} --index K):", file=sys.stderr)
        for line in left:
            marker = os.path.join(line["run_dir"], CLAIMED_TWICE)
            note = f" (suspect: claimed twice, two workers may have written it; see {marker})" if suspect(
                line["run_dir"]) else ""
            print(f"  {line['index']} {line['run_dir']}{note}", file=sys.stderr)
    return 1 if left else 0


def main(argv):
    what, args = argv[0], argv[1:]
    if what == "write":  # PLAN OUT GPUS COMMAND; records "run_dir<TAB>argv" on stdin
        records = [line.rstrip("\n").split("\t", 1) for line in sys.stdin if line.strip()]
        n = write(args[0], args[1], int(args[2]), args[3], records)
        gpus = f" --gpus-per-task={args[2]}" if int(args[2]) > 0 else ""
        print(f"plan: {args[0]} ({n} runs, lines 0-{n - 1}); nothing was run. Run it:\n"
              f"  here, N at once:       ./launch.sh run-plan {args[0]} --parallel N   (each run its own GPUs or "
              f"cores)\n"
              f"  here, one line:        ./launch.sh run-plan {args[0]} --index K\n"
              f"  as a SLURM job array:  sbatch --array=0-{n - 1}%M{gpus} slurm/array.sbatch {args[0]}   (M at once)\n"
              f"  then the report:       sbatch --dependency=afterany:JOBID slurm/report.sbatch {args[0]}\n"
              f"  (or --next, one worker per SLURM job or allocation: it claims line after line)")
        return 0
    if what == "run":
        return run_plan(args)
    if what == "parallel":
        return parallel(args[0], int(args[1]))
    if what == "check-parallel":  # N GPUS_PER_RUN: refuse before the sweep writes anything
        slots(int(args[0]), int(args[1]))
        return 0
    if what == "same-argv":
        return 0 if same_argv(args[0], args[1:]) else 1
    if what == "out":
        print(read(args[0])[0])
        return 0
    if what == "unfinished":
        return unfinished(args[0])
    if what == "gpus":
        print(len(visible_gpus()))
        return 0
    if what == "shutdown-timeout":
        print(shutdown_timeout())
        return 0
    raise PlanError(f"plan.py: unknown command '{what}'")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except PlanError as e:
        print(f"launch.sh: {e}", file=sys.stderr)
        sys.exit(2)
