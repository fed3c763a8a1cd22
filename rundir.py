"""The run directory (docs/run-format.md): config.json, metrics.csv, checkpoints/, done, and a lock.

Only rank 0 calls the writers. Files that must survive a crash are written to a temporary file,
fsynced and renamed into place; metrics.csv is appended and fsynced row by row. Every write that
fails (a full disk, a read-only folder) raises RunDirError with one line naming the file, after
removing its temporary file, so the previous version stays intact."""
import csv
import errno
import json
import os
import sys
import tempfile
import zipfile

import torch

from locks import lock_or_holder

METRICS_COLUMNS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "train_time_s",
                   "cycle", "cycle_end", "curve_cost_s", "images_per_s", "eval_time_s",
                   "skipped_steps", "peak_mem_gb", "startup_s", "train_loss_epoch", "train_flops",
                   "curve_cost_flops"]
RUN_FILES = ("config.json", "metrics.csv", "done", "checkpoints")


class RunDirError(RuntimeError):
    """A run directory that cannot be used or written; the message is one line naming the file and the fix."""


def holds_run(run_dir):
    return any(os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES)


def is_done(run_dir):
    return os.path.exists(os.path.join(run_dir, "done"))


def check_writable(run_dir):
    """Refuse, before any data or model is loaded, a --run-dir that cannot hold a run."""
    path = os.path.abspath(run_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"--run-dir {run_dir} is an existing file, not a directory; choose another --run-dir")
    parent = path
    while not os.path.exists(parent):  # the deepest folder that exists must be a writable directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"--run-dir {run_dir}: {parent} is a file, not a directory; choose another --run-dir")
    try:  # a real write: permission bits say nothing to root or about a read-only file system
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise RunDirError(f"--run-dir {run_dir}: {parent} is not writable ({e.strerror}); choose another --run-dir "
                          f"or fix its permissions") from None


def check_unlocked(run_dir):
    """RunDirError where another train.py holds run_dir's lock (train.py --check: the lock is tried, not kept, and
    nothing is created)."""
    path = os.path.join(run_dir, "lock")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            holder = lock_or_holder(f)
    except OSError:  # a file system without locks: the run itself says so (--no-lock)
        return
    if holder is not None:
        raise in_use(run_dir, holder)


def in_use(run_dir, holder):
    """The error of a --run-dir whose lock another train.py holds (pid `holder`)."""
    return RunDirError(f"--run-dir {run_dir} is in use by another train.py (pid {holder}); wait for it to finish, "
                       f"stop it, or choose another --run-dir")


def lock_run_dir(run_dir):
    """Create run_dir and hold an exclusive lock on run_dir/lock for the life of this process: one writer
    per run directory. Returns the open lock file (keep it referenced). The kernel drops the lock when the
    process dies, so a killed run never leaves it behind."""
    _guard(lambda: os.makedirs(run_dir, exist_ok=True), run_dir)
    path = os.path.join(run_dir, "lock")
    f = _guard(lambda: open(path, "a+"), path)
    try:
        holder = lock_or_holder(f)
    except OSError as e:  # Lustre or NFS mounted without lock support: ENOSYS, ENOLCK, EOPNOTSUPP
        f.close()
        raise RunDirError(f"--run-dir {run_dir}: its file system cannot lock files ({e.strerror or e}); pass "
                          f"--no-lock to run without the lock, and make sure yourself that no second train.py "
                          f"writes this folder (two would mix their rows and checkpoints)")
    if holder is not None:
        raise in_use(run_dir, holder)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    HELD[:] = [h for h in HELD if not h.closed] + [f]
    return f


# A forked child (a DataLoader worker) shares a lock through its copy of the descriptor and would hold it after this
# process is killed, until it noticed: after a fork the child points its copies of the locks still open here at
# /dev/null (the numbers stay valid for the file objects that own them), and the locks stay this process's.
HELD = []  # lock files lock_run_dir opened; closed ones are skipped (their numbers may belong to other files now)


def _release_in_child():
    open_locks = [f for f in HELD if not f.closed]
    if open_locks:
        null = os.open(os.devnull, os.O_RDONLY)
        for f in open_locks:
            os.dup2(null, f.fileno())
        os.close(null)
    HELD[:] = []


os.register_at_fork(after_in_child=_release_in_child)


def _guard(write, path):
    """Run write(); turn an OSError into RunDirError naming `path` (a full disk says so)."""
    try:
        return write()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise RunDirError(f"disk full while writing {path}; free space and resume with --resume") from None
        raise RunDirError(f"cannot write {path} ({e.strerror or e}); check the folder and resume with --resume") \
            from None


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(file) into path.tmp, fsync, rename over path: readers see the old file or the new, whole.
    On any failure the .tmp is removed, the old file is untouched and RunDirError names the file."""
    tmp = path + ".tmp"

    def attempt():
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    try:
        _guard(attempt, path)
    except RuntimeError as e:  # torch.save reports a full disk as "unexpected pos" / "file write failed"
        if isinstance(e, RunDirError):
            raise
        raise RunDirError(f"cannot write {path} ({str(e).splitlines()[0][:120]}); is the disk full? Free space "
                          f"and resume with --resume") from None


def write_config(run_dir, config):
    atomic_write(os.path.join(run_dir, "config.json"),
                 lambda f: f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode()))


def metrics_lines(run_dir):
    """metrics.csv as (header line, data lines), or None when the file is missing. One reading for counting and
    for keeping rows: a data line is a non-blank line ending in a newline; blank lines are not rows, and a last
    line without its newline (a write cut short by a kill) is not one either."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        return None
    with open(path, newline="", errors="replace") as f:
        lines = f.read().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n") and line.strip()]
    return (complete[0] if complete else ""), complete[1:]


def metrics_rows(run_dir):
    """Number of data rows in run_dir/metrics.csv (as metrics_lines counts them), or None when it is missing."""
    lines = metrics_lines(run_dir)
    return None if lines is None else len(lines[1])


class MetricsLog:
    """metrics.csv, one row per evaluation, each row flushed and fsynced as it is written."""

    def __init__(self, run_dir, keep_rows=None):
        """keep_rows=None starts a new file; an int keeps that many rows of an existing one (resume): the rows
        after them, a last line cut short and blank lines are dropped. A kept row that is not a whole row (other
        than the header's number of fields) is refused with RunDirError naming its line."""
        self.path = os.path.join(run_dir, "metrics.csv")
        if keep_rows is None:
            atomic_write(self.path, lambda f: f.write((",".join(METRICS_COLUMNS) + "\n").encode()))
            return
        header, rows = metrics_lines(run_dir)
        columns = next(csv.reader([header]), [])
        for i, fields in enumerate(csv.reader(rows[:keep_rows])):
            if len(fields) != len(columns):
                raise RunDirError(f"--resume: {self.path} data row {i + 1} has {len(fields)} fields, not the "
                                  f"header's {len(columns)}: the file is damaged; restore it or start again with "
                                  f"--overwrite")
        kept = rows[:keep_rows]
        if columns != METRICS_COLUMNS and columns == METRICS_COLUMNS[:len(columns)]:  # an older train.py's columns:
            pad = "," * (len(METRICS_COLUMNS) - len(columns))  # the new ones are empty in its rows
            header, kept = ",".join(METRICS_COLUMNS) + "\n", [line[:-1] + pad + "\n" for line in kept]
        elif columns != METRICS_COLUMNS:
            raise RunDirError(f"--resume: {self.path} has columns train.py does not write ({header.strip()}); "
                              f"restore the file or start again with --overwrite")
        atomic_write(self.path, lambda f: f.write("".join([header] + kept).encode()))

    def append(self, row):
        def write():
            with open(self.path, "a", newline="") as f:
                csv.writer(f, lineterminator="\n").writerow(["" if row.get(c) is None else row[c]
                                                             for c in METRICS_COLUMNS])
                f.flush()
                os.fsync(f.fileno())
        _guard(write, self.path)


def mark_done(run_dir):
    atomic_write(os.path.join(run_dir, "done"), lambda f: None)


def remove_run(run_dir):
    """Delete a run's files (for --overwrite); the lock and anything else in the folder stay. config.json goes
    last, so that a folder killed half-way still says whose it is."""
    import shutil
    for name in ("done", "checkpoints", "tensorboard", "wandb", "metrics.csv", "config.json"):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


# ---- checkpoints: save and restore side by side -----------------------------------------------

def checkpoint_paths(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return os.path.join(d, "last.pt"), os.path.join(d, "prev.pt")


def save_checkpoint(run_dir, state):
    """The new checkpoint is written whole to last.pt.new, then last.pt becomes prev.pt and last.pt.new
    becomes last.pt. A kill between those renames leaves last.pt.new, complete and newest: load_checkpoint
    reads it first."""
    last, prev = checkpoint_paths(run_dir)
    _guard(lambda: os.makedirs(os.path.dirname(last), exist_ok=True), os.path.dirname(last))
    new = last + ".new"
    atomic_write(new, lambda f: torch.save(state, f))
    if os.path.exists(last):
        os.replace(last, prev)
    os.replace(new, last)
    fsync_dir(os.path.dirname(last))


def verify_checkpoint(path):
    """Raise ValueError unless every record of the zip file torch.save wrote matches its CRC-32: torch.load does
    not check them, and a checkpoint with flipped bytes would load silently with damaged weights."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"not a whole checkpoint ({e})") from None
    if bad is not None:
        raise ValueError(f"record {bad} fails its CRC check")


def load_checkpoint(run_dir, map_location="cpu", discard_corrupt=False):
    """The newest checkpoint that passes verify_checkpoint and loads, or None. A corrupt newest one falls back to
    the previous; with discard_corrupt (rank 0 only) the corrupt file is renamed to *.corrupt, so that the next
    save cannot rotate it over the good one."""
    last, prev = checkpoint_paths(run_dir)
    for path in (last + ".new", last, prev):
        if not os.path.exists(path):
            continue
        try:
            verify_checkpoint(path)
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated or corrupt file: try the older one
            print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); trying the "
                  f"previous one", file=sys.stderr)
            if discard_corrupt:
                os.replace(path, path + ".corrupt")
    return None


def checkpoint_files(run_dir):
    """The checkpoint files in run_dir/checkpoints, readable or not (*.corrupt included; not a save's .tmp)."""
    d = os.path.join(run_dir, "checkpoints")
    return sorted(f for f in os.listdir(d) if not f.endswith(".tmp")) if os.path.isdir(d) else []


def record_request(run_dir, argv, recipe_sha256):
    """A finished run asked for again by arguments that differ from its own only in options that do not define the
    result (--checkpoint-every, --data-dir, ...): config.json's argv_accepted gains them (with their recipes'
    hashes), once, so that launch.sh and a plan's report count the run as theirs. Nothing where config.json does not
    read."""
    config = recorded_options(run_dir)
    request = {"argv": argv, "recipe_sha256": recipe_sha256}
    if config is None or request in [{k: config.get(k) for k in request}] + config.get("argv_accepted", []):
        return
    write_config(run_dir, {**config, "argv_accepted": config.get("argv_accepted", []) + [request]})


def recorded_options(run_dir):
    """config.json's options as a dict, or None when it is missing or not a JSON object."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
