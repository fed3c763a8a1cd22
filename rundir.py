"""The run directory of ../shared/run-format.md: config.json, metrics.csv, checkpoints/, done.

Only rank 0 calls the writers. Files that must survive a crash are written to a temporary file,
fsynced and renamed into place; metrics.csv is appended and fsynced row by row."""
import csv
import json
import os
import sys

import torch

METRICS_COLUMNS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "train_time_s",
                   "cycle", "cycle_end", "images_per_s", "eval_time_s",
                   "skipped_steps", "peak_mem_gb"]
RUN_FILES = ("config.json", "metrics.csv", "done", "checkpoints")


def holds_run(run_dir):
    return any(os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(file) into path.tmp, fsync, rename over path: readers see the old file or the new, whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def write_config(run_dir, config):
    atomic_write(os.path.join(run_dir, "config.json"),
                 lambda f: f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode()))


class MetricsLog:
    """metrics.csv, one row per evaluation, each row flushed and fsynced as it is written."""

    def __init__(self, run_dir, keep_rows=None):
        """keep_rows=None starts a new file; an int keeps that many rows of an existing one (resume)."""
        self.path = os.path.join(run_dir, "metrics.csv")
        if keep_rows is None:
            atomic_write(self.path, lambda f: f.write((",".join(METRICS_COLUMNS) + "\n").encode()))
        else:
            with open(self.path, newline="") as f:
                lines = f.read().splitlines(keepends=True)
            atomic_write(self.path, lambda f: f.write("".join(lines[:1 + keep_rows]).encode()))
        self.rows = 0 if keep_rows is None else keep_rows

    def append(self, row):
        with open(self.path, "a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(["" if row.get(c) is None else row[c] for c in METRICS_COLUMNS])
            f.flush()
            os.fsync(f.fileno())
        self.rows += 1


def mark_done(run_dir):
    atomic_write(os.path.join(run_dir, "done"), lambda f: None)


# ---- checkpoints -----------------------------------------------------------------------------

def checkpoint_paths(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return os.path.join(d, "last.pt"), os.path.join(d, "prev.pt")


def save_checkpoint(run_dir, state):
    """last.pt is replaced only once the new one is complete; the one before is kept as prev.pt."""
    last, prev = checkpoint_paths(run_dir)
    os.makedirs(os.path.dirname(last), exist_ok=True)
    tmp = last + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(last):
        os.replace(last, prev)
    os.replace(tmp, last)
    _fsync_dir(os.path.dirname(last))


def load_checkpoint(run_dir, map_location="cpu"):
    """The newest checkpoint that loads, or None. A corrupt newest one falls back to the previous."""
    for path in checkpoint_paths(run_dir):
        if not os.path.exists(path):
            continue
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated or corrupt file: try the older one
            print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}); trying the previous one",
                  file=sys.stderr)
    return None
