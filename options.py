"""train.py's options: the flags, their checks, what they imply (Setup), and the options that define a result.

Every check fails with one line naming the flag and the fix, before anything is written. Methods add their own
flags (methods.add_flags) and check their own options (methods/api.py: Method.check)."""
import argparse
import math
import os
import platform
import re
import sys
import textwrap
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import methods as methods_registry
import schedules
import trackers
from data import DATASETS
from methods import ALIAS_KEYS, MethodError
from models import SMALL_RESNET, parse_model_kwargs
from precision import auto_precision

# Options that define the result: a resume with any of them changed is refused. eval_every: the rows --metric max
# takes its peak from; tf32 and deterministic: the GPU's arithmetic; device_name: the speed of train_time_s;
# cooldown_version: wsd's cooldown formula (2: its last step at eta_min; runs without the key used 1); lamb_version:
# --opt lamb's trust ratio (LAMB_VERSION); methods:
# canonical specs with their non-default options; method_options: all their options (a changed default);
# plugins: the hash of each plug-in method's file.
RESULT_KEYS = ("dataset", "data_dir", "subset", "augment", "decode", "image_size", "model", "schedule", "epochs",
               "warmup_epochs", "t0", "t_mult", "eta_min", "batch_size", "grad_accum", "world_size", "lr", "momentum",
               "nesterov", "weight_decay", "amp", "methods", "method_options", "plugins", "seed", "compile",
               "cycle_decay", "cooldown_frac", "cooldown_shape", "sf_lr", "sf_warmup_epochs", "family_t0",
               "family_t_mult", "eval_every", "model_kwargs", "tf32", "deterministic", "device_name",
               "cooldown_version", "opt", "opt_betas", "opt_eps", "decay_exclusions", "clip_grad", "lamb_version")


# --opt: timm's optimizers that take momentum (sgdw) or betas (the others); weight decay is decoupled in all four
OPTIMIZERS = ("sgdw", "adamw", "lamb", "lion")
# 2: the trust ratio on every parameter (timm's always_adapt). 1 (runs without the key): timm's default, the ratio
# only where weight decay is on, so that --weight-decay 0 (and parameters spared decay) trained as plain Adam
LAMB_VERSION = 2


def parse_args(argv=None):
    """The options: the parser's defaults, then each --config recipe's values in order, then the flags given, each
    over the ones before. args.recipe holds the recipes' values as read (config.json records them with the
    options)."""
    p = build_parser()
    args = p.parse_args(argv)
    args.recipe = None
    args.recipe_sha256 = [file_sha256(path) for path in args.config]  # launch.sh: an edited recipe is not "done"
    if args.config:
        given = flags_given(p, argv)
        args.recipe = {}
        for path in args.config:
            layer = read_recipe(p, path)
            for dest, other in RESTATED.items():  # a later recipe's epochs replaces an earlier one's cycles
                if dest in layer:
                    args.recipe.pop(other, None)
            args.recipe.update(layer)
        chosen = method_dests() & set(args.recipe)
        if chosen and method_dests() & given:
            fail(f"--config sets {sorted(chosen)[0].replace('_', '-')} and the command line gives methods too: "
                 f"select the methods in one place", options=True)
        for dest, value in args.recipe.items():
            if dest not in given and RESTATED.get(dest) not in given:
                setattr(args, dest, value)
        if args.schedule == "constant" and "t_mult" not in given:  # the recipe's t_mult is its cyclic runs'
            args.t_mult = None
    return args


def file_sha256(path):
    import hashlib
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None  # read_recipe names the problem


RESTATED = {"epochs": "cycles", "cycles": "epochs"}  # one thing said two ways: the one given replaces the other
# per-run controls, not part of a recipe (in a sweep they would act on every run alike)
RUN_CONTROLS = ("config", "help", "help_all", "check", "run_dir", "resume", "overwrite", "print_amp",
                "allow_device_change", "no_lock", "print_compile")


def method_dests():
    """The options that select methods: --method, --plugins and the methods' alias flags."""
    return {"method", "plugin_files"} | {d for dests in ALIAS_KEYS.values() for d in dests}


def build_parser():
    p = argparse.ArgumentParser(description="Train one network and write one run directory (the run format: "
                                "docs/run-format.md).", allow_abbrev=False,  # launch.sh matches flags
                                formatter_class=DefaultsHelp,  # by their whole names
                                add_help=False)
    p.add_argument("-h", "--help", action=ShortHelp, help="the option groups, and where each is documented")
    p.add_argument("--help-all", action="help", help="every option, with its default")
    p.add_argument("--check", nargs="?", const="all", default=None, choices=("all", "shape"),
                   help="check a command as a run would before training (options, recipes, plug-ins, --run-dir and "
                        "--resume, the model with its methods on the data, the schedule), print one line and exit: "
                        "nothing is written or trained; 'shape': data that is not here is checked by its dataset's "
                        "shape and size (else it fails)")
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="a recipe: any of these options as 'name: value' lines (recipes/); repeatable, a later file "
                        "over an earlier one; flags given override them")
    add_data_flags(p)
    add_schedule_flags(p)
    add_optimisation_flags(p)
    methods_registry.add_flags(p)
    add_run_flags(p)
    return p


def add_data_flags(p):
    g = p.add_argument_group("data and model")
    g.add_argument("--data", dest="dataset", default="fashion-mnist", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data-dir", default=None, help="dataset folder (default for fashion-mnist: Debian's package)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-dir")
    g.add_argument("--subset", type=int, default=0, help="train on N images only (0: all)")
    g.add_argument("--augment", default="standard",
                   help="training augmentation: standard (the dataset's crop and flip) | none (images as evaluated)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per rank (imagenet; default: this process's CPUs shared by the node's "
                        "ranks, minus one for each rank's main process)")
    g.add_argument("--image-size", type=int, default=224,
                   help="imagenet: training and validation crops of this size (FFCV's low-resolution training: 160)")
    g.add_argument("--decode", default="cpu", help="imagenet: cpu (the workers decode) | cuda (the workers read the "
                   "files, the GPU decodes each batch with nvJPEG)")
    g.add_argument("--model", default=SMALL_RESNET, help=f"{SMALL_RESNET} or any timm model name")
    g.add_argument("--model-kwargs", default="", metavar="K=V,...",
                   help="options for timm.create_model, e.g. drop_rate=0.1,drop_path_rate=0.1,img_size=32")


def add_schedule_flags(p):
    g = p.add_argument_group("schedule (periods in epochs, applied per optimizer step)")
    g.add_argument("--schedule", default="cyclic", help=" | ".join(schedules.SCHEDULES))
    g.add_argument("--epochs", type=float, default=None, help="total epochs (all but standard: must end a cycle)")
    g.add_argument("--cycles", type=int, default=None, help="number of cycles (budgets), instead of --epochs (3)")
    g.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warmup from 0 to --lr, in epochs")
    g.add_argument("--t0", type=float, default=0.5, help="first cycle's period")
    g.add_argument("--t-mult", type=int, default=None, help="period multiplier (default 2; constant: 1)")
    g.add_argument("--eta-min", type=float, default=0.0, help="the LR at the end of each cosine period")
    g.add_argument("--cycle-decay", type=float, default=0.7, metavar="GAMMA",
                   help="cyclic-decay: peak of cycle i is lr * GAMMA^i")
    g.add_argument("--cooldown-frac", type=float, default=0.2, metavar="F",
                   help="wsd: each budget T's cooldown branch starts at (1 - F) T")
    g.add_argument("--cooldown-shape", default="1-sqrt", help="wsd: 1-sqrt | linear")
    g.add_argument("--sf-lr", type=float, default=None, help="schedule-free: its LR (default 5 x --lr)")
    g.add_argument("--sf-warmup-epochs", type=float, default=None,
                   help="schedule-free: its linear warmup (default --warmup-epochs)")


def add_optimisation_flags(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256, help="global batch per optimizer step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--opt", default="sgdw", help=f"optimizer from timm: {' | '.join(OPTIMIZERS)}")
    g.add_argument("--opt-betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="adamw, lamb, lion: betas (default: the optimizer's own)")
    g.add_argument("--opt-eps", type=float, default=None, help="adamw, lamb: epsilon (default: the optimizer's own)")
    g.add_argument("--decay-exclusions", default="auto", help="auto | on | off: no weight decay on biases and "
                   "normalisation weights (timm's convention); auto: on iff the model has no BatchNorm (ViTs, also "
                   "ConvNeXt, NFNets); off for BatchNorm models, as all runs before the flag")
    g.add_argument("--clip-grad", type=float, default=0.0, metavar="NORM",
                   help="clip the global gradient norm to NORM (after fp16 unscaling, on the all-reduced gradient); "
                        "0: off")
    g.add_argument("--lr", type=float, default=0.4, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum (sgdw)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="Nesterov momentum (sgdw)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="decoupled: per-step decay is wd * lr / peak lr")
    g.add_argument("--amp", default="auto", help="auto | none | bf16 | fp16; auto: on a CPU with native bf16 the faster "
                   "of fp32 and bf16 for this model, timed over a few steps; on a GPU bf16 where native, else fp16")
    g.add_argument("--print-amp", action="store_true",
                   help="print the precision --amp would use here and exit (sweeps pass it to all their runs)")
    g.add_argument("--compile", nargs="?", const="on", default="off", metavar="off|on|auto",
                   help="torch.compile the model's training passes (bare --compile: on); auto: compile only where a "
                        "few timed steps of this model train >= 1.1x faster (compile_choice.py)")
    g.add_argument("--print-compile", nargs="?", const=1, type=int, metavar="WORLD_SIZE",
                   help="print what --compile would do here (on or off) and exit: launch.sh sweep asks it once per "
                        "method set, as that set's first run trains, and passes the answer to the set's runs; "
                        "measured on one rank's share of the batch at WORLD_SIZE ranks (default 1)")
    g.add_argument("--deterministic", action="store_true",
                   help="GPU: no TF32, no cudnn autotuning, deterministic kernels (slower; bitwise-exact resume)")
    g.add_argument("--seed", type=int, default=0, help="the run's seed: weights, data order, augmentation, methods")


def add_run_flags(p):
    g = p.add_argument_group("run directory and logging")
    g.add_argument("--run-dir", default=None,
                   help="default: runs/<dataset>_<model>_<schedule>-e<epochs>_<methods>_s<seed>")
    g.add_argument("--resume", nargs="?", const="must", default=None, metavar="auto",
                   help="continue the run in --run-dir; 'auto' starts fresh when there is no checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    g.add_argument("--eval-every", type=float, default=None,
                   help="epochs between extra evaluations (default: 1 for resident datasets, else curve points only)")
    g.add_argument("--checkpoint-every", type=float, default=30.0, metavar="MINUTES",
                   help="also checkpoint (and check for non-finite loss) this often between evaluations; 0: never")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--allow-device-change", action="store_true",
                   help="resume on another GPU or CPU model (its train_time_s then mixes two speeds)")
    g.add_argument("--no-lock", action="store_true",
                   help="no lock on --run-dir (for file systems without flock); nothing then stops a second writer")
    g.add_argument("--log", action="append", default=[], metavar="TRACKER",
                   help="also log to tensorboard and/or wandb (comma-separated or repeated; W&B offline unless "
                        "WANDB_MODE=online); metrics.csv is always written")
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N optimizer steps whose loss is NaN/inf instead of stopping (checks every step)")


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help-all: each option's default where it has one to show (not None, off, empty, or said in its help)."""

    def _get_help_string(self, action):
        if action.default in (None, False, "", []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ShortHelp(argparse.Action):
    """--help: the usage, each option group in a line (its first flags), and where the manual is; --help-all has
    every option."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        lines = [parser.description, "", "usage: python train.py [options]   (torchrun --nproc_per_node=N train.py ... "
                 "for DDP)", ""]
        for group in parser._action_groups[2:]:  # after argparse's own positional and optional groups
            flags = [a.option_strings[0] for a in group._group_actions if a.help != argparse.SUPPRESS]
            lines += [f"{group.title}:"] + textwrap.wrap(" ".join(flags), 100, initial_indent="  ",
                                                         subsequent_indent="  ", break_on_hyphens=False)
        lines += ["", "  python train.py --schedule standard --epochs 4 --method label_smoothing   # one standard run",
                  "  python train.py --config recipes/vit-fmnist.yaml --check                  # check a command",
                  "", "--help-all: every option with its default and what it does", "the manual: docs/training.md "
                  "(flags by group, recipes, trackers, precision), docs/methods.md (the methods)"]
        print("\n".join(lines))
        parser.exit()


def flags_given(parser, argv):
    """The dests that argv sets: parsed again with every default suppressed, so only given flags appear."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]


def read_recipe(parser, path):
    """{dest: value} from a YAML recipe of option names (as flags without '--', or with '_'), each value read as
    text and converted as its flag's would be (YAML's own typing would read 010 as 8 and 1:30 as 90); fail()s in
    one line on an unknown key, a value of the wrong kind or a key given twice."""
    import difflib
    where = f"--config {path}"
    text, recipe = load_yaml(path, where)
    if recipe in (None, ""):
        return {}
    if not isinstance(recipe, dict):
        fail(f"{where}: a recipe is 'option: value' lines, not a {type(recipe).__name__}", options=True)
    actions = {}
    for a in parser._actions:
        for flag in a.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--help-all"):
                actions[flag[2:]] = a
                actions[flag[2:].replace("-", "_")] = a
    out = {}
    for key, value in recipe.items():
        line = next((n for n, t in enumerate(text.splitlines(), 1) if t.split(":")[0].strip() == key), "?")
        if key not in actions:
            names = [k for k in actions if "-" not in k and actions[k].dest not in RUN_CONTROLS]
            close = sorted(k for k in names if k.startswith(key.replace("-", "_"))) or \
                difflib.get_close_matches(key.replace("-", "_"), names, n=1)  # warmup -> warmup_epochs
            hint = f"; did you mean '{close[0]}'?" if close else "; see python train.py --help"
            fail(f"{where}, line {line}: unknown option '{key}'{hint}", options=True)
        a = actions[key]
        if isinstance(a, argparse.BooleanOptionalAction) and key.startswith(("no-", "no_")):
            fail(f"{where}, line {line}: write {a.dest}: false, not {key}", options=True)
        if a.dest in RUN_CONTROLS:
            fail(f"{where}, line {line}: {key} controls one run, not a recipe: give it as a flag", options=True)
        if a.dest in out:
            fail(f"{where}, line {line}: '{key}' sets {a.dest} a second time; give it once", options=True)
        try:
            out[a.dest] = recipe_value(a, value)
        except (TypeError, ValueError) as e:
            fail(f"{where}, line {line}: {key}: {e}", options=True)
    return out


def load_yaml(path, where):
    """(text, value) of the YAML file at `path`, every scalar as its text; fail()s in one line (naming `where`) on an
    unreadable file, text that is not YAML, a key given twice, or aliases that expand past MAX_RECIPE_VALUES."""
    import yaml  # timm's dependency

    class Loader(yaml.BaseLoader):  # every scalar as its text; two equal keys refused (PyYAML keeps the last)
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            twice = next((i for i, k in enumerate(keys) if k in keys[:i]), None)
            if twice is not None:
                fail(f"{where}, line {node.value[twice][0].start_mark.line + 1}: '{keys[twice]}' is given twice; "
                     f"give it once", options=True)
            return super().construct_mapping(node, deep)

        def construct_document(self, node):  # before any value is built: aliases may make it exponentially large
            sizes = {}
            if expanded_size(node, sizes) > MAX_RECIPE_VALUES:
                top = node.value if isinstance(node, yaml.MappingNode) else [(node, node)]
                big = max(top, key=lambda kv: sizes[id(kv[1])])[0]  # the option whose value explodes
                fail(f"{where}, line {big.start_mark.line + 1}: over {MAX_RECIPE_VALUES} values once its YAML "
                     f"aliases (*name) are expanded; write the options out", options=True)
            return super().construct_document(node)

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        recipe = yaml.load(text, Loader=Loader)
    except OSError as e:
        fail(f"{where}: cannot read it ({e.strerror})", options=True)
    except UnicodeDecodeError as e:
        fail(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})", options=True)
    except RecursionError:  # PyYAML composes nested values recursively
        fail(f"{where}: values nested too deeply to be a recipe; write the options out", options=True)
    except yaml.YAMLError as e:
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)  # where the broken item starts
        fail(f"{where}{f', line {mark.line + 1}' if mark else ''}: not YAML ({getattr(e, 'problem', None) or e})",
             options=True)
    return text, recipe


MAX_RECIPE_VALUES = 10_000  # a recipe's nodes, each alias counted as what it stands for: a real one has dozens


def expanded_size(node, sizes):
    """The YAML nodes under `node` (itself included) with every alias expanded, counted in one pass over the
    distinct nodes (`sizes`: id -> count). A node inside itself adds nothing here: PyYAML refuses it when building."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # until counted
        children = node.value if isinstance(node.value, list) else []
        sizes[id(node)] = 1 + sum(expanded_size(n, sizes) for child in children
                                  for n in (child if isinstance(child, tuple) else (child,)))
    return sizes[id(node)]


# what launch.sh's sweep takes from recipes (--config) as its own options' defaults: the cyclic shape that fixes its
# standard runs' budgets, the model and data of its run folders, and a precision (and --compile) it must not decide
# itself.
# dest -> (the sweep's flag, its variable)
SWEEP_KEYS = {"warmup_epochs": ("--warmup", "WARMUP"), "t0": ("--t0", "T0"), "t_mult": ("--t-mult", "T_MULT"),
              "cycles": ("--cycles", "CYCLES"), "model": ("--model", "MODEL"), "dataset": ("--data", "DATA"),
              "data_dir": ("--data-dir", "DATA_DIR"), "amp": ("--amp", "RECIPE_AMP"),
              "compile": ("--compile", "RECIPE_COMPILE")}


def sweep_defaults(paths):
    """'flag variable value' lines of the SWEEP_KEYS the recipes at `paths` set (a later recipe over an earlier
    one), for launch.sh's sweep. A recipe that selects methods is refused: a sweep's method sets come from its
    --methods (a recipe's would join some sets and be replaced in others)."""
    parser, recipe = build_parser(), {}
    for path in paths:
        layer = read_recipe(parser, path)
        chosen = method_dests() & set(layer)
        if chosen:
            fail(f"--config {path} sets {sorted(chosen)[0]}: a sweep's methods come from its --methods; take it out "
                 f"of the recipe", options=True)
        per_run = sorted({"epochs", "schedule", "seed"} & set(layer))
        if per_run:
            fail(f"--config {path} sets {per_run[0]}, which a sweep sets for each run (its --cycles, --schedules, "
                 f"--seeds); take it out of the recipe", options=True)
        spaced = next((k for k in SWEEP_KEYS if k in layer and any(c.isspace() for c in str(layer[k]))), None)
        if spaced:
            fail(f"--config {path}: {spaced} has white space, which a sweep cannot pass on", options=True)
        recipe.update(layer)
    return "\n".join(f"{flag} {var} {recipe[k]}" for k, (flag, var) in SWEEP_KEYS.items() if recipe.get(k) is not None)


def recipe_value(action, value):
    """A recipe's value (text, or lists and mappings of text) as the flag's parser would give it: the flag's type
    applied, a list for repeatable and multi-value flags, true/false for switches, 'k=v,...' for a mapping
    (--model-kwargs), the flag's default for null or an empty value."""
    if value in NULL:
        return [] if isinstance(action, argparse._AppendAction) else action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, str) or value.lower() not in SWITCH:
            raise ValueError(f"takes true or false, got {value!r}")
        return SWITCH[value.lower()]
    if action.nargs == "?" and isinstance(value, str) and value.lower() in SWITCH:  # --label-smoothing alone: its
        return action.const if SWITCH[value.lower()] else action.default          # own value; false: off
    kind = {int: "an integer", float: "a number"}.get(action.type, "a value")

    def convert(v):
        if isinstance(v, dict):
            return ",".join(f"{k}={x}" for k, x in v.items())
        if isinstance(v, list) or v in NULL:
            raise ValueError(f"takes one value, got {v!r}")
        try:
            return action.type(v) if action.type else v
        except ValueError:
            raise ValueError(f"takes {kind}, got {v!r}") from None

    if isinstance(action, argparse._AppendAction) or action.nargs not in (None, "?"):
        values = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise ValueError(f"takes {action.nargs} values, got {len(values)}")
        return [convert(v) for v in values]
    return convert(value)


NULL = ("", "~", "null", "Null", "NULL")  # YAML's nulls, as text
SWITCH = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class Setup:
    """What the options imply, derived once; config.json records these over the options of the same name."""
    epochs: float
    cycles: int
    t0: float  # as recorded: a standard run's one cosine period
    t_mult: int
    family_t0: float  # the cyclic shape whose budgets the run samples (a standard run's t0/t_mult as given)
    family_t_mult: int
    amp: str
    methods: list  # canonical specs, sorted: [] is the baseline
    method_options: dict  # method name -> every option, defaults included
    plugins: dict  # plug-in method name -> its file's sha256
    world_size: int
    eval_every: float
    run_dir: str
    sf_lr: float
    sf_warmup_epochs: float
    model_kwargs: dict  # --model-kwargs parsed
    tf32: bool  # matmuls and convolutions in TF32 (CUDA unless --deterministic): a precision of its own
    device_name: str  # the GPU's or the CPU's model: what the time axis was measured on
    cooldown_version: int  # wsd: schedules.COOLDOWN_VERSION; None for the other schedules
    lamb_version: int  # --opt lamb: LAMB_VERSION; None for the other optimizers
    compile: bool  # --compile resolved: on, or what auto measured (train.py, compile_choice.choose)


def fail(message, code=2, every_rank=False, options=False):
    """One line on stderr naming the flag and the fix, a non-zero exit; nothing written. options=True marks a
    refusal of the options themselves (a bad value, a run of other options): it would refuse every run of a sweep,
    so it is also written to $TRAIN_REFUSAL_FILE where launch.sh set one (torchrun turns every exit code into 1)."""
    rank = int(os.environ.get("RANK", 0))
    if rank == 0 or every_rank:
        where = f"rank {rank}: " if every_rank and int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"train.py: error: {where}{message}", file=sys.stderr)
    if options and os.environ.get("TRAIN_REFUSAL_FILE"):  # every rank: whichever the agent stops last
        with open(os.environ["TRAIN_REFUSAL_FILE"], "a") as f:
            f.write(message + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


def micro_batch_size(cfg, world_size):
    """Images per forward pass on one rank (before --grad-accum is validated, 0 counts as 1)."""
    return cfg.batch_size // (world_size * max(cfg.grad_accum, 1))


def resolve(args, world_size, device):
    """Validate every flag and derive (Setup, the run's MethodList); fail() on the first bad one."""
    a = args
    threads = os.environ.get("OMP_NUM_THREADS") or "1"  # configure_device's thread count: a number or nothing
    for name, value in sorted(vars(a).items()):  # before anything is written: inf and nan pass every bound below
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}", options=True)
    # all made, then the first failing reported: in order
    checks = (environment_checks(threads) + optimizer_checks(a) + schedule_checks(a, world_size)
              + data_checks(a, device) + run_checks(a, device, world_size))
    for ok, message in checks:
        if not ok:
            fail(message, options=True)
    prepare_services(a)
    epochs, cycles, t_mult = budget(a)
    amp = auto_precision(device) if a.amp == "auto" else a.amp
    methods, plugins, model_kwargs = selected_methods(a)
    standard = a.schedule == "standard"  # recorded shape: one cosine period over the rest of the run
    setup = Setup(epochs=epochs, cycles=cycles, t0=epochs - a.warmup_epochs if standard else a.t0,
                  t_mult=1 if standard else t_mult, family_t0=a.t0, family_t_mult=t_mult, amp=amp,
                  methods=methods.specs, plugins=plugins,
                  method_options={m.name: {k: getattr(m, k) for k in m.options} for m in methods.all},
                  world_size=world_size, eval_every=a.eval_every if a.eval_every is not None else
                  (0.0 if a.dataset == "imagenet" else 1.0),
                  run_dir=a.run_dir or default_run_dir(a, epochs, methods),
                  sf_lr=a.sf_lr or 5 * a.lr, sf_warmup_epochs=a.warmup_epochs if a.sf_warmup_epochs is None
                  else a.sf_warmup_epochs, model_kwargs=model_kwargs,
                  tf32=device.type == "cuda" and not a.deterministic, device_name=hardware_name(device),
                  cooldown_version=schedules.COOLDOWN_VERSION if a.schedule == "wsd" else None,
                  lamb_version=LAMB_VERSION if a.opt == "lamb" else None, compile=a.compile == "on")
    return setup, methods


# ---- the flag checks, by concern: (holds, the one line that names the flag and the fix) each ---------------

def environment_checks(threads):
    """What the environment sets: OMP_NUM_THREADS, configure_device's thread count (`threads`: its value, or 1)."""
    return [(re.fullmatch("[1-9][0-9]*", threads),
             f"OMP_NUM_THREADS='{threads}' is no number of threads: set it to 1, 2, ... or unset it")]


def optimizer_checks(a):
    """The names of the dataset, schedule and precision, then the optimizer's flags and the LR."""
    return [
        (a.dataset in DATASETS, f"--data: unknown dataset '{a.dataset}'; choose one of {', '.join(DATASETS)}"),
        (a.schedule in schedules.SCHEDULES,
         f"--schedule: unknown '{a.schedule}'; choose one of {', '.join(schedules.SCHEDULES)}"),
        (a.amp in ("auto", "none", "bf16", "fp16"), f"--amp: unknown '{a.amp}'; choose auto, none, bf16 or fp16"),
        (a.lr > 0, f"--lr must be a positive number, got {a.lr}"),
        (0 <= a.momentum < 1, f"--momentum must be in [0, 1), got {a.momentum}"),
        (a.opt in OPTIMIZERS, f"--opt: unknown '{a.opt}'; choose one of {', '.join(OPTIMIZERS)}"),
        (a.opt_betas is None or all(0 <= b < 1 for b in a.opt_betas),
         f"--opt-betas must be in [0, 1), got {a.opt_betas}"),
        (a.opt_betas is None or a.opt != "sgdw", "--opt-betas: sgdw has momentum, not betas; use --momentum"),
        (not (a.nesterov and a.opt != "sgdw"), f"--nesterov is sgdw's; {a.opt} takes --opt-betas"),
        (not (a.schedule == "schedule-free" and a.opt == "adamw" and a.opt_betas and a.opt_betas[0] == 0),
         "--opt-betas: schedule-free AdamW averages with beta1: it must be > 0"),
        (a.opt_eps is None or a.opt_eps > 0, f"--opt-eps must be positive, got {a.opt_eps}"),
        (a.opt_eps is None or a.opt in ("adamw", "lamb"), f"--opt-eps: {a.opt} takes no epsilon"),
        (a.decay_exclusions in ("auto", "on", "off"),
         f"--decay-exclusions: unknown '{a.decay_exclusions}'; choose auto, on or off"),
        (a.clip_grad >= 0, f"--clip-grad must be >= 0 (0: off), got {a.clip_grad}"),
        (not (a.schedule == "schedule-free" and a.opt not in ("sgdw", "adamw")),
         f"--schedule schedule-free has an SGD and an AdamW variant: use --opt sgdw or adamw, not {a.opt}"),
        (not (a.nesterov and a.momentum == 0), "--nesterov needs --momentum > 0"),
        (a.weight_decay >= 0, f"--weight-decay must be >= 0, got {a.weight_decay}"),
        (0 <= a.eta_min < a.lr, f"--eta-min must be in [0, --lr), got {a.eta_min}"),
    ]


def schedule_checks(a, world_size):
    """The batch and its split over ranks and micro-steps, then the schedule's periods and its own options."""
    return [
        (a.batch_size > 0, f"--batch-size must be positive, got {a.batch_size}"),
        (a.grad_accum > 0, f"--grad-accum must be positive, got {a.grad_accum}"),
        (a.batch_size % (world_size * max(a.grad_accum, 1)) == 0,
         f"--batch-size {a.batch_size} is not divisible by world size {world_size} x --grad-accum {a.grad_accum}; "
         f"use a multiple of {world_size * max(a.grad_accum, 1)}"),
        (a.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {a.warmup_epochs}"),
        (a.t0 > 0, f"--t0 must be positive, got {a.t0}"),
        (a.t_mult is None or a.t_mult >= 1, f"--t-mult must be an integer >= 1, got {a.t_mult}"),
        (not (a.schedule == "constant" and a.t_mult not in (None, 1)),
         "--t-mult: a constant schedule has t_mult 1; drop --t-mult or use --schedule cyclic"),
        (a.cycles is None or a.cycles >= 1, f"--cycles must be >= 1, got {a.cycles}"),
        (a.epochs is None or a.epochs > 0, f"--epochs must be positive, got {a.epochs}"),
        (0 < a.cycle_decay <= 1, f"--cycle-decay must be in (0, 1], got {a.cycle_decay}"),
        (0 < a.cooldown_frac < 1, f"--cooldown-frac must be in (0, 1), got {a.cooldown_frac}"),
        (a.cooldown_shape in schedules.COOLDOWN_SHAPES,
         f"--cooldown-shape: unknown '{a.cooldown_shape}'; choose {' or '.join(schedules.COOLDOWN_SHAPES)}"),
        (a.sf_lr is None or a.sf_lr > 0, f"--sf-lr must be positive, got {a.sf_lr}"),
        (a.sf_warmup_epochs is None or a.sf_warmup_epochs >= 0,
         f"--sf-warmup-epochs must be >= 0, got {a.sf_warmup_epochs}"),
        (not (a.schedule == "schedule-free" and a.opt == "sgdw" and a.momentum == 0),
         "--schedule schedule-free needs --momentum > 0"),
    ]


def data_checks(a, device):
    """The data's own flags: subset, augmentation, workers, decoding, image size."""
    return [
        (a.subset >= 0, f"--subset must be >= 0, got {a.subset}"),
        (a.augment in ("standard", "none"), f"--augment: unknown '{a.augment}'; choose standard or none"),
        (a.workers is None or a.workers >= 0, f"--workers must be >= 0, got {a.workers}"),
        (a.decode in ("cpu", "cuda"), f"--decode: unknown '{a.decode}'; choose cpu or cuda"),
        (a.decode == "cpu" or device.type == "cuda", "--decode cuda needs a CUDA device; use --decode cpu"),
        (a.decode == "cpu" or a.dataset == "imagenet", "--decode cuda is for --data imagenet (the others are "
                                                        "decoded once, into memory)"),
        (a.image_size >= 8, f"--image-size must be >= 8 pixels, got {a.image_size}"),
        (a.image_size == 224 or a.dataset == "imagenet", "--image-size is for --data imagenet (the resident "
                                                         "datasets train at their own size)"),
    ]


def run_checks(a, device, world_size):
    """The run's cadences, its precision on this device, --resume against --overwrite, and --compile."""
    return [
        (a.eval_every is None or a.eval_every >= 0, f"--eval-every must be >= 0, got {a.eval_every}"),
        (a.checkpoint_every >= 0, f"--checkpoint-every must be >= 0 minutes, got {a.checkpoint_every}"),
        (a.skip_nonfinite >= 0, f"--skip-nonfinite must be >= 0, got {a.skip_nonfinite}"),
        (not (a.amp == "fp16" and device.type == "cpu"),
         "--amp fp16 needs a CUDA device; use --amp bf16 or none on CPU"),
        (not (a.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported()),
         "--amp bf16: this GPU has no bf16; use --amp fp16 (or auto)"),
        (not (a.resume and a.overwrite), "--resume and --overwrite exclude each other; pick one"),
        (a.compile in ("off", "on", "auto"), f"--compile: unknown '{a.compile}'; choose off, on or auto"),
        (a.print_compile is None or a.print_compile >= 1,
         f"--print-compile takes the runs' world size (1, 2, ...), got {a.print_compile}"),
        (not (a.compile == "auto" and world_size > 1 and not a.print_compile), "--compile auto measures in one "
         "process (ranks could pick differently): under torchrun give --compile on or off (launch.sh sweep measures "
         "once and passes it on)"),
        (a.resume in (None, "must", "auto"), f"--resume takes no value or 'auto', got '{a.resume}'"),
    ]


# ---- what the checked flags imply ----------------------------------------------------------------

def prepare_services(a):
    """The DataLoader workers' default, the trackers (each installed), and schedule-free's package: fail()s in one
    line where one is missing."""
    if a.workers is None:
        a.workers = default_workers()
    try:
        a.log = trackers.parse_names(a.log)
    except ValueError as e:
        fail(str(e), options=True)
    if trackers.missing(a.log):
        fail(trackers.missing(a.log), options=True)
    if a.schedule == "schedule-free":
        try:
            import schedulefree  # noqa: F401
        except ImportError:
            fail("--schedule schedule-free needs the schedulefree package: pip install -r requirements.txt",
                 options=True)


def budget(a):
    """(epochs, cycles, t_mult) of the run from --epochs or --cycles (a standard run: the epochs of the cyclic run
    of those cycles); fail()s where they disagree, or the warmup does not fit."""
    t_mult = 1 if a.schedule == "constant" else (a.t_mult or 2)
    if a.schedule == "standard":  # the epochs of the cyclic run's cycles, if given as --cycles
        epochs, cycles = a.epochs or schedules.cyclic_epochs(a.warmup_epochs, a.t0, t_mult, a.cycles or 3), 1
    elif a.epochs is None:
        cycles = a.cycles or 3
        epochs = schedules.cyclic_epochs(a.warmup_epochs, a.t0, t_mult, cycles)
    else:
        epochs = a.epochs
        try:
            cycles = schedules.cycles_for_epochs(a.warmup_epochs, a.t0, t_mult, a.epochs)
        except ValueError as e:
            fail(str(e), options=True)
        if a.cycles not in (None, cycles):
            fail(f"--cycles {a.cycles} disagrees with --epochs {a.epochs:g} ({cycles} cycles); give only one of them",
                 options=True)
    if a.warmup_epochs >= epochs:
        fail(f"--warmup-epochs {a.warmup_epochs:g} must be shorter than the run ({epochs:g} epochs)", options=True)
    if a.schedule == "schedule-free" and (a.sf_warmup_epochs or 0) >= epochs:
        fail(f"--sf-warmup-epochs {a.sf_warmup_epochs:g} must be shorter than the run ({epochs:g} epochs): the LR "
             f"would never reach its peak", options=True)
    return epochs, cycles, t_mult


def selected_methods(a):
    """(MethodList, plug-ins' file hashes, --model-kwargs parsed); fail()s on a bad method or model option, or an
    option of the model that a method sets too."""
    try:
        model_kwargs = parse_model_kwargs(a.model_kwargs)
        methods, plugins = methods_registry.selected(a)
        clash = sorted(set(model_kwargs) & set(methods.model_kwargs()))
        if clash:
            raise MethodError(f"--model-kwargs {clash[0]} is also set by a --method; give it in one place")
    except ValueError as e:  # MethodError too
        fail(str(e), options=True)
    return methods, plugins, model_kwargs


def default_workers():
    """DataLoader workers per rank when --workers is not given: the CPUs this process may use, shared by the node's
    ranks (torchrun's LOCAL_WORLD_SIZE), one left to each rank's main process; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


def hardware_name(device):
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo; the platform's words elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def default_run_dir(args, epochs, methods):
    label = "+".join(m.label for m in sorted(methods.all, key=lambda m: m.spec)) or "baseline"
    return os.path.join("runs", f"{args.dataset}_{args.model}_{args.schedule}-e{epochs:g}_{label}_s{args.seed}")


def result_options(args, setup):
    merged = {**vars(args), **asdict(setup)}
    return {k: merged[k] for k in RESULT_KEYS}


def method_config(methods, args, setup):
    """What the methods record of themselves in config.json (methods.config()); fail()s where a method's key is an
    option of the run, which it would overwrite (the paper's methods may record their own old flags' options)."""
    own = methods.config()
    reserved = set(RESULT_KEYS) | set(asdict(setup)) | set(vars(args)) | {"argv"}
    clash = sorted(k for m in methods.all for k in set(m.config()) & reserved
                   - ALIAS_KEYS.get(m.name, set()))
    if clash:
        fail(f"--method: a method's config() returns '{clash[0]}', an option of the run; rename it", options=True)
    return own
