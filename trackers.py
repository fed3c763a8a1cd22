"""Experiment trackers, optional: TensorBoard and Weights & Biases mirror a run's metrics.csv rows (the contract,
which stays the record), its config, and the learning rate of every optimizer step.

Steps on their x-axis are optimizer steps taken by the run (1-based, as metrics.csv's `step` counts them; a wsd
run counts its branches too). Only rank 0 writes. A resumed run hides what the killed process logged after its
checkpoint (TensorBoard's purge_step); W&B resumes the same run id and keeps what it already has: it drops a
step logged again, so after a resume its curve holds the killed process's values up to where that process got."""
import importlib
import os
import shutil

TRACKERS = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def parse_names(values):
    """--log values (repeatable, comma-separated) as a list of tracker names; ValueError names a bad one."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    for n in names:
        if n not in TRACKERS:
            raise ValueError(f"--log: unknown tracker '{n}'; choose {' or '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def missing(names):
    """The first tracker whose package is absent, as a one-line message with what to install; None if all load."""
    modules = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
    for n in names:
        try:
            importlib.import_module(modules[n])
        except ImportError:
            return f"--log {n}: the {n} package is not installed; {INSTALL[n]} (or drop --log {n})"
    return None


def numeric(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class Trackers:
    """The trackers of one run, opened on rank 0 (every call is a no-op with no names)."""

    def __init__(self, names, run_dir, config, resumed_at=0):
        self.writers, self.pending = [], []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            folder = os.path.join(run_dir, "tensorboard")
            if not resumed_at:  # a fresh start (train.py allows one only in an empty start of this run): no old events
                shutil.rmtree(folder, ignore_errors=True)
            tb = SummaryWriter(folder, purge_step=resumed_at + 1 if resumed_at else None)
            if not resumed_at:
                import json
                tb.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
            self.writers.append(TensorBoardWriter(tb))
        if "wandb" in names:
            import wandb
            # offline unless the user configured W&B (WANDB_MODE=online, or `wandb online` which sets it)
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tradeoff-curves"),
                             name=os.path.basename(os.path.normpath(run_dir)), dir=run_dir, config=config,
                             id=wandb_run_id(run_dir, resumed_at), resume="allow",
                             mode=os.environ.get("WANDB_MODE", "offline"))
            self.writers.append(WandbWriter(run))

    def lr(self, step, lr):
        """The LR optimizer step `step` (1-based) used: kept until flush(), which train.py calls off the clock (the
        time axis must not pay for logging)."""
        if self.writers:
            self.pending.append((step, lr))

    def flush(self, row=None):
        """Write the buffered LRs (then a row's values, at its step: W&B takes steps in order), and everything to
        disk (a user watching the run sees it up to here)."""
        for step, lr in self.pending:
            for w in self.writers:
                w.scalars({"lr": lr}, step)
        self.pending = []
        for w in self.writers:
            if row is not None:
                w.scalars(*row)
            w.flush()

    def row(self, step, row):
        """A metrics.csv row (its numeric columns), logged at the run's optimizer step `step`."""
        values = {f"metrics/{k}": numeric(v) for k, v in row.items()}
        self.flush(({k: v for k, v in values.items() if v is not None}, step))

    def close(self, exit_code=0):
        """Flush and close every writer; exit_code: the process's (128 + the signal of a stop: W&B marks the run
        preempted, resumable, not finished)."""
        self.flush()
        for w in self.writers:
            w.close(exit_code)
        self.writers = []


def wandb_run_id(run_dir, resumed_at):
    """The W&B run id of this run directory: new at a fresh start, the recorded one on a resume."""
    import uuid
    path = os.path.join(run_dir, "wandb", "run-id")
    if resumed_at and os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    run_id = uuid.uuid4().hex[:16]
    with open(path, "w") as f:
        f.write(run_id + "\n")
    return run_id


class TensorBoardWriter:
    def __init__(self, writer):
        self.writer = writer

    def scalars(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self):
        self.writer.flush()

    def close(self, exit_code=0):
        self.writer.close()


class WandbWriter:
    def __init__(self, run):
        self.run = run

    def scalars(self, values, step):
        self.run.log(values, step=step)

    def flush(self):
        pass  # W&B writes on its own

    def close(self, exit_code=0):
        if exit_code and hasattr(self.run, "mark_preempting"):
            self.run.mark_preempting()  # stopped at a checkpoint: W&B shows it preempted, and a resume continues it
        self.run.finish(exit_code=exit_code)
