"""Recipes (--config FILE.yaml): the same run as its flags, flags over the recipe, one-line refusals, the shipped
recipes, and launch.sh's sweep taking its shape from a recipe."""
import json
import os
import subprocess

import pytest

import options
from conftest import ENV, ROOT, TINY, run_train

RESULT = options.RESULT_KEYS


def recorded(run):
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


def write(path, text):
    path.write_text(text)
    return str(path)


def test_a_recipe_gives_the_config_json_of_its_flags(tmp_path):
    recipe = write(tmp_path / "r.yaml", "data: synthetic\nsubset: 256\nbatch_size: 32\nwarmup_epochs: 1\nt0: 1\n"
                                        "cycles: 2\nlr: 0.1\nmethod: [label_smoothing]\nmodel_kwargs: {}\n"
                                        "amp: none\nopt_betas: null\n")
    flags = TINY + ["--method", "label_smoothing", "--amp", "none"]
    run_train(flags + ["--run-dir", str(tmp_path / "flags")])
    run_train(["--config", recipe, "--no-progress", "--run-dir", str(tmp_path / "recipe")])
    a, b = recorded(tmp_path / "flags"), recorded(tmp_path / "recipe")
    assert {k: a[k] for k in RESULT if k != "device_name"} == {k: b[k] for k in RESULT if k != "device_name"}
    assert b["config"] == [recipe] and b["recipe"]["lr"] == 0.1 and b["recipe"]["method"] == ["label_smoothing"]
    assert a["recipe"] is None


def test_flags_override_the_recipe_and_a_later_recipe_an_earlier_one(tmp_path):
    first = write(tmp_path / "a.yaml", "lr: 0.3\nweight_decay: 1e-4\nopt: adamw\nmethod: mixup\ncycles: 5\n"
                                       "t_mult: 2\n")
    second = write(tmp_path / "b.yaml", "weight_decay: 2e-4\nepochs: 7\n")
    a = options.parse_args(["--config", first, "--config", second, "--lr", "0.05"])
    assert (a.lr, a.weight_decay, a.opt, a.method) == (0.05, 2e-4, "adamw", ["mixup"])
    # --epochs and --cycles say one thing: a later recipe's or a flag's one replaces the other
    assert (a.epochs, a.cycles) == (7.0, None)
    a = options.parse_args(["--config", first, "--epochs", "15"])
    assert (a.epochs, a.cycles) == (15.0, None)
    # a constant run keeps t_mult 1: the recipe's t_mult is its cyclic runs'
    a = options.parse_args(["--config", first, "--schedule", "constant"])
    assert a.t_mult is None


def test_yaml_values_are_read_as_the_flags_read_them(tmp_path):
    """Every value is text for the flag's own type: YAML 1.1 would read 010 as 8, 1:30 as 90 and off as false."""
    a = options.parse_args(["--config", write(tmp_path / "r.yaml", "subset: 010\ndecay_exclusions: off\n"
                                                                   "lr: 2e-3\nnesterov: true\nopt_betas: null\n"
                                                                   "eta_min:\n")])
    assert (a.subset, a.decay_exclusions, a.lr, a.nesterov, a.opt_betas, a.eta_min) == (10, "off", 2e-3, True,
                                                                                        None, 0.0)
    # a switch takes YAML's words; a flag with an optional value takes true for its own value (--label-smoothing)
    a = options.parse_args(["--config", write(tmp_path / "s.yaml", "compile: yes\nlabel-smoothing: true\n"
                                                                   "mixup: false\n")])
    assert (a.compile, a.label_smoothing, a.mixup) == ("on", 0.1, 0.0)


def test_methods_come_from_one_place(tmp_path):
    recipe = write(tmp_path / "r.yaml", "method: [ema]\n")
    p = run_train(["--config", recipe, "--label-smoothing", "--run-dir", str(tmp_path / "run")], check=False)
    assert p.returncode == 2 and "select the methods in one place" in p.stderr
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), "sweep", "--config", recipe, "--out", str(tmp_path / "s"),
                        "--dry-run"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "a sweep's methods come from its --methods" in p.stderr


def laughs(key, levels=8):
    """A "billion laughs" (~420 bytes) as the value of `key`: each level an alias list of nine of the one before,
    9**levels strings once expanded (a recipe's loader that builds them runs out of memory)."""
    lines = [f"{key}:", '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,message", [
    ("lr: 0.1\nwarmup: 2\n", r"line 2: unknown option 'warmup'; did you mean 'warmup_epochs'\?"),
    ("seed: 1.5\n", "line 1: seed: takes an integer, got '1.5'"),
    ("t0: 1:30\n", "t0: takes a number, got '1:30'"),
    ("resume: auto\n", "resume controls one run, not a recipe"),
    ("no-nesterov: true\n", "write nesterov: false, not no-nesterov"),
    ("nesterov: 1\n", "nesterov: takes true or false"),
    ("lr: [0.1, 0.2]\n", "lr: takes one value"),
    ("opt_betas: [0.9]\n", "opt_betas: takes 2 values, got 1"),
    ("- lr\n", "a recipe is 'option: value' lines"),
    ("lr: 0.1\nlr: 0.2\n", "line 2: 'lr' is given twice"),
    ("lr: 0.1\nlr 0.2\n", "line 2: not YAML"),
    # YAML aliases expanding to millions of values at any depth, a value that holds itself, deep nesting
    ("lr: 0.1\n" + laughs("model_kwargs"), "line 2: over 10000 values once its YAML aliases"),
    (laughs("method"), "line 1: over 10000 values once its YAML aliases"),
    ("model_kwargs: &a\n  x: *a\n", "line 1: not YAML \\(found unconstructable recursive node\\)"),
    ("lr: " + "[" * 5000 + "]" * 5000 + "\n", "values nested too deeply"),
])
def test_a_bad_recipe_is_refused_in_one_line_before_anything_is_written(tmp_path, text, message):
    recipe = write(tmp_path / "bad.yaml", text)
    p = run_train(["--config", recipe, "--run-dir", str(tmp_path / "run")], check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: --config ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("name", ["resnet50-imagenet", "fashion-mnist-study", "vit-fmnist"])
def test_the_shipped_recipes_resolve(name):
    import torch
    a = options.parse_args(["--config", os.path.join(ROOT, "recipes", f"{name}.yaml")])
    setup, methods = options.resolve(a, 1, torch.device("cpu"))
    assert a.recipe and all(getattr(a, k) == v for k, v in a.recipe.items())
    if name == "resnet50-imagenet":  # the paper's Appendix, as README.md and docs/training.md state it
        assert (a.lr, a.momentum, a.weight_decay, a.batch_size, a.grad_accum) == (2.048, 0.875, 5e-4, 2048, 4)
        assert setup.epochs == 512 and setup.cycles == 6 and a.warmup_epochs == 8


def test_a_sweep_takes_its_shape_from_the_recipe_and_passes_it_to_every_run(tmp_path):
    recipe = write(tmp_path / "r.yaml", "data: synthetic\nwarmup_epochs: 2\nt0: 2\nt_mult: 3\ncycles: 2\nlr: 0.05\n"
                                        "amp: none\n")
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), "sweep", "--config", recipe, "--out", str(tmp_path / "s"),
                        "--cycles", "3", "--dry-run"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    runs = [line for line in p.stdout.splitlines() if "train.py" in line]
    # budgets of warmup 2 + t0 2 x 3^i, 3 cycles (the flag over the recipe's 2): 4, 10, 28
    assert sorted(line.split("--run-dir ")[1].split()[0].rsplit("/", 1)[1] for line in runs) == \
        ["cyclic", "standard-e10", "standard-e28", "standard-e4"]
    assert all(f"--config {recipe}" in line and "--data synthetic" in line and "--t-mult 3" in line
               and "--amp none" in line for line in runs)
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), "sweep", "--config", write(tmp_path / "x.yaml", "lr_: 1\n"),
                        "--out", str(tmp_path / "s"), "--dry-run"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "unknown option 'lr_'" in p.stderr


def test_sweep_vit_is_the_vit_recipe_in_fp32_unless_the_extra_flags_ask(tmp_path):
    def runs(*extra):
        p = subprocess.run([os.path.join(ROOT, "launch.sh"), "sweep", "--vit", "--out", str(tmp_path / "s"),
                            "--dry-run", *extra], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return [line for line in p.stdout.splitlines() if "train.py" in line]
    recipe = os.path.join(ROOT, "recipes", "vit-fmnist.yaml")
    assert all(f"--config {recipe}" in r and "--model vit_tiny_patch16_224" in r and r.endswith("--amp none")
               for r in runs())
    assert all(" --amp bf16" in r and "--amp none" not in r for r in runs("--", "--amp", "bf16"))
    assert all(" --amp bf16" in r and "--amp none" not in r for r in runs("--", "--amp=bf16"))
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), "sweep", "--out", str(tmp_path / "s"), "--dry-run", "--",
                        "--t0", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--t0 after '--'" in p.stderr
