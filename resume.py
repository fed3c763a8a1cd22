"""The resume decision, beside the run directory code (rundir.py): what --run-dir holds against the options asked for
(resume from its checkpoint, start fresh, exit 0 for a finished run, or refuse in one line), what a resumed run must
find again once built (its data's storage, its decay convention, its precision), and the hardware it trained on."""
import os
import sys
from dataclasses import replace

from options import RESULT_KEYS, fail, result_options
from rundir import (RunDirError, checkpoint_files, holds_run, is_done, load_checkpoint, metrics_rows, record_request,
                    recorded_options)
from runformat import ADDED_DEFAULTS, canonical_methods, is_legacy, method_options


def resume_decision(args, setup, master, argv=None):
    """Read run_dir and decide: (checkpoint to resume or None, whether to wipe the old run first).
    Exits 0 for a finished run of the same options under --resume (recording argv, the command line, as one that
    asked for it: config.json's argv_accepted), and fail()s on anything that would lose or mix results: other options,
    a damaged metrics.csv, a folder that is not provably an empty start of this run."""
    run_dir, options = setup.run_dir, result_options(args, setup)
    if not args.resume:
        if holds_run(run_dir) and not args.overwrite:
            fail(f"--run-dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                 f"or choose another --run-dir")
        return None, args.overwrite
    ckpt = load_checkpoint(run_dir, discard_corrupt=master) if os.path.isdir(run_dir) else None
    if ckpt is not None and ckpt.get("config") is None:
        fail(f"--resume: the checkpoint in {run_dir}/checkpoints does not record its options (written by "
             f"an older train.py); start the run again with --overwrite")
    # the checkpoint says what it was trained with (a stray config.json cannot mislead); config.json fills in the
    # keys an older checkpoint predates, and stands alone where there is no checkpoint
    from_config = api_names(recorded_options(run_dir))
    from_ckpt = api_names(ckpt["config"]) if ckpt is not None else {}
    recorded = None if ckpt is None and from_config is None else {**ADDED_DEFAULTS, **(from_config or {}), **from_ckpt}
    done = is_done(run_dir)
    if recorded is not None:
        # a finished run made elsewhere stays valid: the folder of a dataset that has one known content (not an
        # ImageFolder tree: there the folder is the dataset); --amp auto keeps the precision the run recorded
        # the hardware: tf32 follows it (CPU or GPU); each rank knows only its own GPU, so rank 0's decides
        hardware = ("device_name", "tf32")
        host = ((("data_dir",) * (args.dataset != "imagenet") + hardware if done else ())
                + ("amp",) * (args.amp == "auto") + ("compile",) * (args.compile == "auto")
                + hardware * args.allow_device_change
                + hardware * (not master))
        diffs = {k: f"{k}: {recorded[k]!r} -> {options[k]!r}" for k in RESULT_KEYS  # keys it predates: not compared
                 if k in recorded and k not in host and recorded[k] != options[k]}
        if diffs and set(diffs) <= set(hardware):  # this run's own problem: a sweep goes on with the others
            fail(f"--resume: {run_dir} was trained on other hardware ({'; '.join(diffs.values())}): its train_time_s "
                 f"would splice two speeds; start it again with --overwrite, or pass --allow-device-change to resume "
                 f"anyway (config.json then lists both)")
        if diffs:
            fail(f"--resume: these options differ from the {'finished ' * done}run in {run_dir}: "
                 f"{'; '.join(diffs.values())}; ask for the run's options, or use another --run-dir (a sweep: another "
                 f"--out)", options=True)
    if done:  # never redo a finished run (sweeps rely on this); --overwrite replaces it
        already_finished(args, run_dir, recorded, master, argv)
    if ckpt is None:
        if args.resume == "must":
            fail(f"--resume: no readable checkpoint in {run_dir}/checkpoints; start it without --resume "
                 f"(or with --resume auto)")
        return None, fresh_start_allowed(run_dir, recorded, master)
    rows = metrics_rows(run_dir)
    if rows is None:
        fail(f"--resume: {run_dir}/metrics.csv is missing, so the curve before the checkpoint is lost; "
             f"restore the file or start again with --overwrite")
    if rows < ckpt["metrics_rows"]:
        fail(f"--resume: {run_dir}/metrics.csv has {rows} whole rows but the checkpoint recorded "
             f"{ckpt['metrics_rows']}; restore the file or start again with --overwrite")
    return ckpt, False


def already_finished(args, run_dir, recorded, master, argv):
    """--resume of a finished run of the same options: exit 0, rank 0 recording argv as a command line that asked
    for it (config.json's argv_accepted); fail() where the finished run records no options to check."""
    if recorded is None:
        fail(f"--resume: {run_dir} is marked done but records no options (no config.json or checkpoint), so it "
             f"cannot be checked against this one; choose another --run-dir or --overwrite it")
    if master:
        if argv is not None:
            try:
                record_request(run_dir, argv, args.recipe_sha256)
            except RunDirError as e:  # the run stays finished; only launch.sh's record of the request is lost
                print(f"warning: {e}", file=sys.stderr)
        print(f"run {run_dir} is already finished (it has 'done'); nothing to do. Pass --overwrite "
              f"instead of --resume to train it again")
    sys.exit(0)


def api_names(options):
    """Recorded options with `methods` as the method API names them; each source (config.json, a checkpoint) is read
    on its own, since one may predate the API and the other not (a resume rewrites config.json first)."""
    if options is None or "methods" not in options:
        return options
    named = {**options, "methods": canonical_methods(options)}
    if "method_options" in options or is_legacy(options):  # (a checkpoint of 2026-12-01 morning has none)
        named["method_options"] = method_options(options)
    return named


def fresh_start_allowed(run_dir, recorded, master):
    """--resume auto without a checkpoint: start again only where nothing can be lost, i.e. the folder holds no
    run, or the start of this very run (its config.json, with the options already compared) that died before its
    first checkpoint: no checkpoint file of any kind and at most the one row written just before it. Anything else
    is refused, and nothing is removed."""
    if not holds_run(run_dir):
        return False
    files, rows = checkpoint_files(run_dir), metrics_rows(run_dir)
    ours = recorded is not None and all(k in recorded for k in ("schedule", "seed", "epochs", "lr"))
    bare = recorded is None and rows == 0 and not os.path.exists(os.path.join(run_dir, "done"))  # a header only
    if (ours or bare) and not files and (rows or 0) <= 1:
        if master:
            print(f"--resume auto: {run_dir} has no checkpoint (the run stopped before its first); starting it "
                  f"again, removing its " + " and ".join(["config.json"] * ours + [f"metrics.csv ({rows} row(s))"]
                                                         * (rows is not None)))
        return True
    held = ", ".join(([f"checkpoints/{', '.join(files)}"] if files else []) +
                     ([f"metrics.csv ({rows} rows)"] if rows is not None else []) +
                     (["config.json"] if os.path.exists(os.path.join(run_dir, "config.json")) else []))
    why = "no readable checkpoint" if ours else "no config.json of a train.py run"
    fail(f"--resume auto: {run_dir} holds {held or 'run files'} but {why}, so it cannot be resumed and nothing was "
         f"removed; start it again with --overwrite (deletes them), or use another --run-dir (a sweep: delete that "
         f"folder or use another --out)")


def device_history(setup, ckpt):
    """Every GPU or CPU model the run has trained on (more than one only through --allow-device-change)."""
    before = [] if ckpt is None else [ckpt["config"].get("device_name"),
                                      *(recorded_options(setup.run_dir) or {}).get("device_names", [])]
    return sorted({setup.device_name, *filter(None, before)})


def resumed_config(args, setup, ckpt, data):
    """config.json of the run resumed from `ckpt` ({} for a fresh start); fail()s where its images are not stored as
    when it started (shards prepared again, or a tree where shards were)."""
    recorded = (recorded_options(setup.run_dir) or {}) if ckpt is not None else {}
    stored = recorded.get("data_storage")  # None: not imagenet, or a run from before the key
    if stored is not None and stored != getattr(data, "storage", None):
        fail(f"--resume: the images in --data-dir {args.data_dir} are not stored as when {setup.run_dir} started "
             f"({stored} -> {data.storage}); resume with the data it started on, or start again with --overwrite",
             options=True)
    return recorded


def kept_precision(setup, ckpt, device):
    """--amp auto on a resume: setup with the precision the run recorded (never measured again); fail()s for fp16
    on a CPU."""
    setup = replace(setup, amp=ckpt["config"]["amp"])
    if setup.amp == "fp16" and device.type == "cpu":
        fail(f"--resume: {setup.run_dir} trained in fp16 on a GPU; a CPU has no fp16 training: resume it on a "
             f"GPU, or start it again with --overwrite")
    return setup


def check_decay_convention(args, setup, ckpt, exclusions):
    """fail()s on resuming a run from before --decay-exclusions (it decayed every parameter) where auto spares some."""
    if ckpt is not None and "decay_exclusions" not in ckpt["config"] and exclusions:
        fail(f"--resume: {setup.run_dir} predates --decay-exclusions and decayed every parameter, which auto no "
             f"longer does for {args.model}; resume it with --decay-exclusions off")
