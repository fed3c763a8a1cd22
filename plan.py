"""A study as a plan file, run line by line (a SLURM array task each), by workers that claim lines, or N at once.

    ./launch.sh sweep ... --plan FILE        writes FILE (plan.py write), runs nothing
    ./launch.sh run-plan FILE --index K      line K (counted from 0, as SLURM_ARRAY_TASK_ID)
    ./launch.sh run-plan FILE --next         claims line after line until none is left (several workers at once)
    ./launch.sh sweep ... --parallel N       writes OUT/parallel.plan and runs it with N workers, each with its own
                                             GPUs (CUDA_VISIBLE_DEVICES) or cores (taskset, OMP_NUM_THREADS)

A plan is '#' header lines (the sweep's command, the runs folder, the sha256 of every line after its own), then one
JSON object per run: index, run_dir, argv (train.py's complete arguments), gpus (torchrun processes; 0: one plain
process) and nodes. A line is claimed by an flock on FILE.claims/<its run folder's hash>, which the kernel drops when
its worker dies, so a dead worker's line is claimable again; a line whose run folder's lock is held (a train.py
running it, started by anyone) is left alone. Every line runs as a sweep runs it: skipped when done with the same
arguments, else train.py --resume auto (resumes, or names the result-defining options that differ).
No torch here: launch.sh calls this before any setup, and train.py imports placement()."""
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

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
    lines = [f"# out: {out}\n"] + [json.dumps({"index": i, "run_dir": d, "argv": argv.split(), "gpus": gpus,
                                               "nodes": 1}) + "\n" for i, (d, argv) in enumerate(records)]
    text = f"# command: {command}\n# sha256: {sha256(lines)}\n" + "".join(lines)
    os.makedirs(out, exist_ok=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return len(records)


def sha256(lines):
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def read(path):
    """(runs folder, run lines) of a plan that is whole, unedited and whose runs folder is where it says."""
    again = f"write it again with ./launch.sh sweep ... --plan {path}"
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise PlanError(f"run-plan: cannot read the plan {path} ({e.strerror}); {again}") from None
    sha = next((i for i, line in enumerate(lines) if line.startswith("# sha256: ")), None)
    if sha is None or not lines[sha + 1:sha + 2] or not lines[sha + 1].startswith("# out: "):
        raise PlanError(f"run-plan: {path} is not a plan (no '# sha256:' and '# out:' lines); {again}")
    if lines[sha].split()[-1] != sha256(lines[sha + 1:]):
        raise PlanError(f"run-plan: {path} was edited after it was written (its lines do not match its sha256); "
                        f"{again} (its first line is the command)")
    out, runs = lines[sha + 1][len("# out: "):].rstrip("\n"), [json.loads(line) for line in lines[sha + 2:]]
    if not os.path.isdir(out):
        raise PlanError(f"run-plan: the plan's runs folder {out} is missing (moved or deleted?); nothing was run: "
                        f"write the plan again for where the runs are (./launch.sh sweep ... --out NEW --plan FILE)")
    return out, runs


def same_argv(run_dir, argv):
    """True when the run recorded exactly these arguments and its recipes are unchanged: a sweep skips it as done.
    A plug-in file may have changed under the same argv: train.py compares its hash."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            c = json.load(f)
        recipes = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
        sha = [hashlib.sha256(open(r, "rb").read()).hexdigest() for r in recipes]
        return c.get("argv") == argv and not (recipes and c.get("recipe_sha256") != sha) and "--plugins" not in argv
    except (OSError, ValueError, AttributeError):
        return False


def finished(line):
    return os.path.exists(os.path.join(line["run_dir"], "done")) and same_argv(line["run_dir"], line["argv"])


# ---- claims ------------------------------------------------------------------------------------

def try_lock(path, create):
    """(open file holding an exclusive flock on path, None) or (None, what the holder wrote in it)."""
    if not create and not os.path.exists(path):
        return None, None
    f = open(path, "a+")
    holder = lock_or_holder(f)
    return (None, holder) if holder is not None else (f, None)


def claim(plan, line):
    """The line's claim (an open file to close when the run ends), or (None, the holder's pid)."""
    folder = plan + ".claims"
    os.makedirs(folder, exist_ok=True)
    name = hashlib.sha256(os.path.abspath(line["run_dir"]).encode()).hexdigest()[:16]
    f, holder = try_lock(os.path.join(folder, name), create=True)
    if f is None:
        return None, f"pid {holder.split()[0]} (run-plan)"
    run_lock, holder = try_lock(os.path.join(line["run_dir"], "lock"), create=False)  # train.py's own
    if run_lock is None and holder is not None:
        f.close()
        return None, f"pid {holder} (train.py)"
    if run_lock is not None:
        run_lock.close()
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {line['run_dir']}\n")
    f.flush()
    return f, None


# ---- running -----------------------------------------------------------------------------------

def visible_gpus():
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES where set (SLURM sets it), else nvidia-smi's list."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return p.stdout.split() if p.returncode == 0 else []


def slots(n, gpus_per_run):
    """The environment and cores (or None) of each of n runs at once: a slice of the GPUs each, a share of the cores
    each (pinned with taskset where present). PlanError where the machine has too few."""
    gpus, cores = visible_gpus(), cpus()
    width = max(gpus_per_run, 1)  # GPUs, or processes on a CPU, of one run
    if gpus and n * width > len(gpus):
        raise PlanError(f"--parallel {n} runs of {width} GPU(s) need {n * width} GPUs; this machine has {len(gpus)} "
                        f"({','.join(gpus)}): lower --parallel or --gpus-per-run")
    if not gpus and n * width > len(cores):
        raise PlanError(f"--parallel {n} runs of {width} process(es) need {n * width} cores; this machine has "
                        f"{len(cores)}: lower --parallel")
    share = len(cores) // n  # 0 on a GPU node with fewer cores than runs: then nothing is pinned
    threads = max(1, min(share // width, int(os.environ.get("OMP_NUM_THREADS") or share)))
    pin = share > 0 and shutil.which("taskset") is not None
    return [({"TRAIN_CONCURRENT_RUNS": str(n), "OMP_NUM_THREADS": str(threads),
              **({"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * width:(i + 1) * width])} if gpus else {})},
             ranges(cores[i * share:(i + 1) * share]) if pin else None) for i in range(n)]


def command(line):
    """The launcher and train.py's arguments, as launch.sh's sweep starts a run."""
    venv_python = os.path.join(os.environ.get("VENV", ".venv"), "bin", "python")
    python = venv_python if os.access(venv_python, os.X_OK) else sys.executable
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(line["gpus"]),
                "--max-restarts", os.environ.get("MAX_RESTARTS", "0")] if line["gpus"] > 0 else []
    return [python, *torchrun, "train.py", *line["argv"]]


class Runner:
    """Workers over one plan's lines: each claims the next line nobody holds, runs it, and goes on; every line is
    tried at most once here. A refusal of the options stops new claims (every run would be refused alike); a
    signal ends every child (train.py's checkpoint and rows stay: the run resumes) and stops."""

    def __init__(self, plan, out, lines, prefix):
        self.plan, self.out, self.lines, self.prefix = plan, out, lines, prefix
        self.tried, self.failed, self.busy, self.refused, self.signal = set(), [], {}, None, None
        self.children, self.lock = set(), threading.RLock()  # (the signal handler takes it too)

    def next_line(self):
        with open(self.plan + ".lock", "a") as pick:  # one worker picks at a time, on this machine or another
            fcntl.flock(pick, fcntl.LOCK_EX)
            for line in self.lines:
                with self.lock:
                    if self.refused or self.signal or line["index"] in self.tried:
                        continue
                if finished(line):
                    self.say(line, f"skip (done): {line['run_dir']}")
                    self.tried.add(line["index"])
                    continue
                held, holder = claim(self.plan, line)
                if held is None:
                    self.busy[line["index"]] = holder
                    continue
                self.busy.pop(line["index"], None)
                self.tried.add(line["index"])
                return line, held
        return None, None

    def work(self, env, cores):
        while True:
            line, held = self.next_line()
            if line is None:
                return
            with held:
                self.run(line, env, cores)

    def run(self, line, env, cores):
        cmd = (["taskset", "-c", cores] if cores else []) + command(line)
        self.say(line, "+ " + " ".join(cmd))
        fd, refusal = tempfile.mkstemp(prefix="refusal-")
        os.close(fd)
        pipe = subprocess.PIPE if self.prefix else None
        with self.lock:  # no child starts after a signal: the handler's loop ends the ones registered here
            if self.signal:
                os.remove(refusal)
                return
            p = subprocess.Popen(cmd, env={**os.environ, **env, "TRAIN_REFUSAL_FILE": refusal}, stdout=pipe,
                                 stderr=pipe, text=True)
            self.children.add(p)
        pumps = [threading.Thread(target=self.pump, args=(line, s, d)) for s, d in
                 ((p.stdout, sys.stdout), (p.stderr, sys.stderr)) if s is not None]
        for t in pumps:
            t.start()
        rc = p.wait()
        for t in pumps:
            t.join()
        with self.lock:
            self.children.discard(p)
            refused = rc != 0 and os.path.getsize(refusal) > 0
            os.remove(refusal)
            if refused and not self.signal:
                self.refused = self.refused or line["run_dir"]
            elif rc != 0 and not self.signal:
                self.failed.append((line["run_dir"], rc))
                print(f"launch.sh: FAILED (exit {rc}): {line['run_dir']}", file=sys.stderr, flush=True)

    def pump(self, line, source, sink):
        for text in source:
            self.say(line, text.rstrip("\n"), sink)

    def say(self, line, text, sink=sys.stdout):
        name = os.path.relpath(line["run_dir"], self.out) if self.prefix else ""
        with self.lock:
            print(f"[{name}] {text}" if name else text, file=sink, flush=True)

    def stop(self, signum, frame):
        first = self.signal is None
        self.signal = self.signal or signum
        self.kill(signal.SIGTERM if first else signal.SIGKILL)  # a second Ctrl-C does not wait

    def kill(self, sig):
        with self.lock:
            for p in self.children:  # torchrun passes it on to its workers
                p.send_signal(sig)

    def go(self, workers):
        """Run the workers [(env, cores)] to the end; the exit status (0, 1 failures, 2 refused, 128 + a signal)."""
        try:  # claims are flocks: a file system without them (NFS, Lustre mounted without) is one line here
            with open(self.plan + ".lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another worker is picking: it can lock
        except OSError as e:
            raise PlanError(f"run-plan: cannot lock {self.plan}.lock ({e.strerror}): the plan's folder must be on a "
                            f"file system with flock; write the plan elsewhere (--plan FILE)") from None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.stop)
        threads = [threading.Thread(target=self.work, args=w, daemon=True) for w in workers]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
            if self.signal:  # a child started just before the signal is ended on the next pass
                self.kill(signal.SIGTERM)
        return self.summary()

    def summary(self):
        if self.signal:
            print(f"launch.sh: stopped by signal {self.signal}: the runs it ended resume where they stopped when the "
                  f"plan is run again", file=sys.stderr)
            return 128 + self.signal
        if self.refused:
            print(f"launch.sh: stopped: {self.refused}: train.py refused the options (the reason above)",
                  file=sys.stderr)
            return 2
        busy = {i: h for i, h in self.busy.items() if i not in self.tried}
        if busy:
            print(f"launch.sh: {len(busy)} line(s) held by other workers, not run here: " +
                  ", ".join(f"{i} ({h})" for i, h in sorted(busy.items())))
        if self.failed:
            print(f"launch.sh: {len(self.failed)} run(s) failed, see their messages above:", file=sys.stderr)
            for run_dir, rc in self.failed:
                print(f"  {run_dir} (exit {rc})", file=sys.stderr)
            return 1
        return 0


def run_plan(args):
    """run PLAN --index K | --next: one line (the array task's) or, claimed one after another, all of them."""
    usage = "run-plan takes PLAN --index K (a line, from 0: SLURM_ARRAY_TASK_ID) or PLAN --next"
    if len(args) not in (2, 3) or args[1] not in ("--index", "--next") or len(args) != 2 + (args[1] == "--index"):
        raise PlanError(f"{usage}, got '{' '.join(args)}'")
    out, lines = read(args[0])
    if args[1] == "--index":
        k = args[2]
        if not k.isdigit() or int(k) >= len(lines):
            raise PlanError(f"run-plan: --index {k} is out of range: {args[0]} has {len(lines)} lines, "
                            f"0-{len(lines) - 1}")
        lines = [lines[int(k)]]
        need, have = lines[0]["gpus"], visible_gpus()
        if need > len(have) and "SLURM_JOB_ID" in os.environ:
            raise PlanError(f"run-plan: line {k} runs on {need} GPU(s); this task has {len(have)}: submit the array "
                            f"with --gpus-per-task={need}")
    runner = Runner(args[0], out, lines, prefix=False)
    rc = runner.go([({}, None)])
    if args[1] == "--index" and runner.busy:  # the array task's own line is another worker's: say so
        print(f"launch.sh: run-plan: line {args[2]} ({lines[0]['run_dir']}) is being run by "
              f"{runner.busy[lines[0]['index']]}; nothing was done here", file=sys.stderr)
        return 1
    return rc


def parallel(plan, n):
    out, lines = read(plan)
    return Runner(plan, out, lines, prefix=n > 1).go(slots(n, lines[0]["gpus"] if lines else 0))


def unfinished(plan):
    """List the lines without 'done' (after an array: what did not finish); exit 1 if any."""
    out, lines = read(plan)
    left = [line for line in lines if not os.path.exists(os.path.join(line["run_dir"], "done"))]
    if left:
        print(f"launch.sh: {len(left)} of {len(lines)} line(s) of {plan} did not finish (run them again: "
              f"./launch.sh run-plan {plan} --index K):", file=sys.stderr)
        for line in left:
            print(f"  {line['index']} {line['run_dir']}", file=sys.stderr)
    return 1 if left else 0


def main(argv):
    what, args = argv[0], argv[1:]
    if what == "write":  # PLAN OUT GPUS COMMAND; records "run_dir<TAB>argv" on stdin
        records = [line.rstrip("\n").split("\t", 1) for line in sys.stdin if line.strip()]
        n = write(args[0], args[1], int(args[2]), args[3], records)
        gpus = f" --gpus-per-task={args[2]}" if int(args[2]) > 0 else ""
        print(f"plan: {args[0]} ({n} runs, lines 0-{n - 1}); nothing was run. Run it:\n"
              f"  here, line by line:    ./launch.sh run-plan {args[0]} --index K   (or --next in each of N shells)\n"
              f"  as a SLURM job array:  sbatch --array=0-{n - 1}%M{gpus} slurm/array.sbatch {args[0]}   (M at once)\n"
              f"  then the report:       sbatch --dependency=afterany:JOBID slurm/report.sbatch {args[0]}")
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
    raise PlanError(f"plan.py: unknown command '{what}'")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except PlanError as e:
        print(f"launch.sh: {e}", file=sys.stderr)
        sys.exit(2)
