"""launch.sh sweeps: the dry-run plan, skip and resume, and a tiny real sweep with its report."""
import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import ENV, ROOT, TINY

SWEEP = ["--seeds", "0 1", "--methods", "baseline,bp+mx", "--warmup", "1", "--t0", "1", "--cycles", "2"]


def launch(*args, out, check=True, env=None, command="sweep"):
    """launch.sh COMMAND (sweep: with --out OUT) ARGS; env: variables over conftest.ENV's."""
    env = dict(ENV, VENV=os.environ.get("VIRTUAL_ENV", os.path.join(ROOT, ".venv")), **(env or {}))
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), command, *(["--out", str(out)] if out else []), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def test_dry_run_plans_each_run_once(tmp_path):
    out = tmp_path / "sweep"
    lines = launch(*SWEEP, "--dry-run", "--", "--data", "synthetic", out=out).stdout.splitlines()
    runs = [l for l in lines if "train.py" in l]
    dirs = [l.split("--run-dir ")[1].split()[0] for l in runs]
    assert len(runs) == len(set(dirs)) == 2 * 2 * 3  # seeds x method sets x (cyclic + standard at 2 and 4 epochs)
    assert all("--resume auto" in l for l in runs)
    bp_cyclic = [l for l in runs if "/bp+mx/s1/cyclic" in l][0]
    assert all(flag in bp_cyclic for flag in ("--blurpool", "--mixup", "--seed 1", "--cycles 2"))
    std = sorted(l.split("--epochs ")[1].split()[0] for l in runs if "/baseline/s0/standard" in l)
    assert std == ["2", "4"]  # the standard runs sit at the cyclic run's cycle ends
    assert lines[-1].endswith(f"analysis.report {out} --out {out}/report")
    # a finished run asked for with the flags it recorded is skipped; one asked for with other flags goes to
    # train.py (which compares the options); an unfinished one is launched (and resumes through --resume auto)
    for seed in ("0", "1"):  # both record s1's flags: s1 is asked for with them again, s0 with its own
        done = out / "bp+mx" / f"s{seed}" / "cyclic"
        done.mkdir(parents=True)
        (done / "done").touch()
        (done / "config.json").write_text(json.dumps({"argv": bp_cyclic.split(" train.py ")[1].split()}))
    (out / "baseline" / "s1" / "cyclic").mkdir(parents=True)
    lines = launch(*SWEEP, "--dry-run", "--", "--data", "synthetic", out=out).stdout.splitlines()
    assert f"skip (done): {out / 'bp+mx' / 's1' / 'cyclic'}" in lines
    assert sum("train.py" in l for l in lines) == 11 and any("/baseline/s1/cyclic" in l for l in lines)
    assert any("/bp+mx/s0/cyclic" in l and "train.py" in l for l in lines)


def test_a_finished_run_whose_recipe_file_changed_is_not_skipped(tmp_path):
    """Same flags, same recipe path, other recipe contents: the run goes to train.py (which compares the options),
    never skipped as done; with the recipe as it was, it is skipped."""
    import hashlib
    recipe, out = tmp_path / "recipe.yaml", tmp_path / "sweep"
    recipe.write_text("momentum: 0.9\n")
    args = ("--seeds", "0", "--methods", "baseline", "--cycles", "1", "--no-standard", "--config", str(recipe),
            "--dry-run", "--", "--data", "synthetic")
    line = [l for l in launch(*args, out=out).stdout.splitlines() if "train.py" in l][0]
    run = out / "baseline" / "s0" / "cyclic"
    run.mkdir(parents=True)
    (run / "done").touch()
    sha = [hashlib.sha256(recipe.read_bytes()).hexdigest()]
    (run / "config.json").write_text(json.dumps({"argv": line.split(" train.py ")[1].split(), "recipe_sha256": sha}))
    assert f"skip (done): {run}" in launch(*args, out=out).stdout
    recipe.write_text("momentum: 0.8\n")
    lines = launch(*args, out=out).stdout.splitlines()
    assert not any("skip (done)" in l for l in lines) and any(f"--run-dir {run} " in l for l in lines)


def test_bad_method_name_is_refused(tmp_path):
    p = launch("--methods", "baseline,xx", "--dry-run", out=tmp_path, check=False)
    assert p.returncode == 2 and "unknown method 'xx'" in p.stderr


def test_an_empty_method_set_is_named(tmp_path):
    """'baseline,,ls' was refused as "sets baseline and  are the same": the empty entry is the mistake."""
    p = launch("--methods", "baseline,,ls", "--dry-run", out=tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.strip() == ("launch.sh: --methods: set 2 is empty (two commas in a row, "
                                                      "or one first); remove it")
    for methods, told in (("ls,", "ends in a comma"), ("ls+,mx", "bad method '' in --methods set 'ls+'")):
        p = launch("--methods", methods, "--dry-run", out=tmp_path, check=False)  # the shell dropped the empty end
        assert p.returncode == 2 and told in p.stderr and "train.py" not in p.stdout, p.stderr


def test_tiny_real_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    args = ["--seeds", "0", "--methods", "baseline,cl", "--warmup", "1", "--t0", "1", "--cycles", "2", "--",
            "--data", "synthetic", "--subset", "128", "--batch-size", "32", "--lr", "0.05"]
    launch(*args, out=out)
    for d in ("baseline/s0/cyclic", "baseline/s0/standard-e2", "baseline/s0/standard-e4", "cl/s0/cyclic"):
        assert (out / d / "done").exists(), d
    # --amp auto decided once by the sweep: every run was asked for the same explicit precision
    argvs = [json.load(open(out / d / "config.json"))["argv"] for d in ("baseline/s0/cyclic", "cl/s0/cyclic",
                                                                      "baseline/s0/standard-e2")]
    assert len({a[a.index("--amp") + 1] for a in argvs}) == 1
    report = (out / "report" / "report.md").read_text()
    assert "| baseline | 2 |" in report and "| channels_last | 2 |" in report
    # the report's baseline gap is the runs' own numbers (--metric max: a standard run's best row, a cyclic point's
    # best row within its cycle), computed here from their metrics.csv
    rows = lambda d: list(csv.DictReader(open(out / "baseline" / "s0" / d / "metrics.csv")))  # noqa: E731
    cyclic = rows("cyclic")
    points = [max(float(r["val_acc1"]) for r in cyclic if r["cycle"] == end["cycle"]) for end in cyclic
              if end["cycle_end"] == "1"]
    standard = [max(float(r["val_acc1"]) for r in rows(f"standard-e{e}")) for e in (2, 4)]
    gaps = {r["methods"]: r for r in csv.DictReader(open(out / "report" / "gaps.csv"))}
    assert float(gaps["baseline"]["mean_gap_pp"]) == pytest.approx(sum(c - s for c, s in zip(points, standard)) / 2)
    assert (out / "report" / "fig3_tradeoff.png").stat().st_size > 1000
    second = launch(*args, out=out).stdout  # everything is done: all skipped, the report made again
    assert second.count("skip (done)") == 6 and "train.py" not in second.replace("skip (done)", "")
    # asked again with another result-defining option: the first finished run names the difference, the sweep
    # stops there (no run redone, no report rebuilt from runs of other options)
    (out / "report" / "report.md").unlink()
    third = launch("--gpus", "1", *args[:-1], "0.1", out=out, check=False)  # under torchrun, which exits 1
    assert third.returncode == 2 and "lr: 0.05 -> 0.1" in third.stderr and "stopped" in third.stderr
    assert third.stdout.count("train.py") == 1 and not (out / "report" / "report.md").exists()


def test_repro_plans_the_whole_study_seed_by_seed(tmp_path):
    out = tmp_path / "study"
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), "repro", "--dry-run", "--out", str(out)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    dirs = list(dict.fromkeys(l.split("--run-dir ")[1].split()[0] for l in lines if "train.py" in l))
    core = ["cyclic", "standard-e1", "standard-e2", "standard-e4", "standard-e8"]
    extra = ["cyclic-decay", "wsd", "schedule-free"]
    sets = ["baseline", "ls", "mx", "bp", "cl", "bp+cl", "ls+mx", "bp+cl+ls+mx"]
    plan = {f"{out}/{m}/s{s}/{r}" for m in sets for s in range(3) for r in core}
    plan |= {f"{out}/{m}/s{s}/{r}" for m in ("baseline", "ls", "mx") for s in range(3) for r in extra}
    assert set(dirs) == plan and len(dirs) == 147
    # every set's cyclic and standard runs of seed s come before any of seed s + 1, and before LS's and MX's
    # estimators (the baseline's come first, as its gap and CI were measured first)
    kind = [d.rsplit("/", 1)[1] for d in dirs]  # cyclic, standard-e1, ..., wsd
    first_of = {s: min(i for i, d in enumerate(dirs) if f"/s{s}/" in d and "baseline" not in d) for s in range(3)}
    last_of = {s: max(i for i, d in enumerate(dirs) if f"/s{s}/" in d and kind[i] in core) for s in range(3)}
    assert last_of[0] < first_of[1] and last_of[1] < first_of[2]
    assert max(i for i, k in enumerate(kind) if k in core) < min(
        i for i, d in enumerate(dirs) if "baseline" not in d and kind[i] in extra)
    cyc = next(l for l in lines if f"{out}/bp+cl+ls+mx/s2/cyclic " in l)
    for flag in ("--blurpool", "--channels-last", "--label-smoothing", "--mixup", "--seed 2", "--warmup-epochs 0.5",
                 "--t0 0.5", "--t-mult 2", "--cycles 4", "--data fashion-mnist", "--amp bf16",
                 "recipes/fashion-mnist-study.yaml"):
        assert flag in cyc, flag
    assert lines[-1].endswith(f"analysis.report {out} --out {out}/report")


def test_the_vit_study_pilot_plans_its_standard_runs_at_three_budgets_only():
    """--pilot: baseline, LS and MX, seeds 0 and 1, standard runs at 2, 16 and 32 epochs (--budgets), no estimator
    runs (--schedules none), each at the path the full study will skip as done."""
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), "vit-study", "--pilot", "--dry-run"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()  # (runs the pilot has finished show as skipped)
    dirs = [line.split("--run-dir ")[1].split()[0] for line in lines if "train.py" in line] + [
        line.split("skip (done): ")[1].strip() for line in lines if line.startswith("skip (done): ")]
    assert sorted(dirs) == sorted(f"results/vit-fmnist/{m}/s{s}/standard-e{e}" for m in ("baseline", "ls", "mx")
                                  for s in (0, 1) for e in (2, 16, 32))
    assert all("recipes/vit-fmnist.yaml --config" in line and "recipes/vit-fmnist-study.yaml" in line
               and "--amp none" in line for line in p.stdout.splitlines() if "train.py" in line)


def test_a_preset_ignores_the_sweep_design_variables_of_the_environment_and_says_so():
    """CONSTANT, STANDARD and BUDGETS exported in the shell (a leftover of an earlier sweep) added constant runs to a
    preset or dropped its standard runs, unsaid: a preset runs its own design and names what it ignored."""
    run = lambda env: subprocess.run([os.path.join(ROOT, "launch.sh"), "vit-study", "--pilot", "--dry-run"],  # noqa
                                     cwd=ROOT, env=dict(ENV, **env), capture_output=True, text=True, timeout=120)
    plain, leftover = run({}), run({"CONSTANT": "1", "STANDARD": "0", "BUDGETS": "2"})
    assert plain.returncode == leftover.returncode == 0 and leftover.stdout == plain.stdout, leftover.stdout
    assert leftover.stderr.splitlines() == [
        "launch.sh: vit-study: CONSTANT=1 STANDARD=0 BUDGETS='2' from the environment ignored: a preset runs its own "
        "design (unset them)"], leftover.stderr


def test_the_resnet_counterpart_runs_the_same_design_with_the_small_resnet():
    """vit-study --resnet: the study's regime and sets with the small ResNet's recipe (bf16, lr 0.2 for batch 128),
    into results/resnet-fmnist: 7 sets x 3 seeds x (5 standard budgets + cyclic and cyclic-decay)."""
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), "vit-study", "--resnet", "--dry-run"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    runs = [line for line in p.stdout.splitlines() if "train.py" in line]
    dirs = {line.split("--run-dir ")[1].split()[0] for line in runs}
    sets = ("baseline", "ls", "mx", "ls+mx", "stochastic_depth", "ema", "cutmix")
    kinds = ["cyclic", "cyclic-decay"] + [f"standard-e{e}" for e in (2, 4, 8, 16, 32)]
    assert dirs == {f"results/resnet-fmnist/{m}/s{s}/{k}" for m in sets for s in (0, 1, 2) for k in kinds}
    assert all("recipes/fashion-mnist-study.yaml --config" in line and "recipes/vit-fmnist-study.yaml" in line
               and "--lr 0.2" in line and "--amp bf16" in line and "--model small_resnet" in line for line in runs)


def test_more_seeds_adds_seeds_3_and_4_of_the_resolved_sets_with_the_cyclic_estimator_only():
    """vit-study --more-seeds: seeds 3 and 4 of the baseline, MixUp, LS+MX and CutMix, standard runs at every
    budget and the cyclic run, into the study's own folder; with --resnet or --pilot it refuses in one line."""
    p = subprocess.run([os.path.join(ROOT, "launch.sh"), "vit-study", "--more-seeds", "--dry-run"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    runs = [line for line in p.stdout.splitlines() if "train.py" in line]
    dirs = {line.split("--run-dir ")[1].split()[0] for line in runs}
    kinds = ["cyclic"] + [f"standard-e{e}" for e in (2, 4, 8, 16, 32)]
    sets = ("baseline", "mx", "ls+mx", "cutmix")
    assert dirs == {f"results/vit-fmnist/{m}/s{s}/{k}" for m in sets for s in (3, 4) for k in kinds}
    assert all("recipes/vit-fmnist.yaml --config" in line and "--amp none" in line for line in runs)
    # the report leaves seeds 3 and 4 out of the estimators they lack; the primary test reads them, cyclic runs only
    assert "analysis.report results/vit-fmnist --out results/vit-fmnist/report --complete-seeds" in p.stdout
    every_seed = [line for line in p.stdout.splitlines() if "analysis.compare" in line]
    assert [line.split("--out ")[1] for line in every_seed] == [
        f"results/vit-fmnist/cyclic-all-seeds/{v}" for v in ("all", "from4", "late")]
    assert all("/*/s*/standard-e* results/vit-fmnist/*/s*/cyclic --complete-seeds" in line for line in every_seed)
    for other in ("--resnet", "--pilot"):
        p = subprocess.run([os.path.join(ROOT, "launch.sh"), "vit-study", "--more-seeds", other, "--dry-run"], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "--more-seeds adds seeds to the ViT study only" in p.stderr


def test_a_plug_in_named_like_a_paper_short_name_is_refused(tmp_path):
    """`--methods mx` is MixUp: with a plug-in called mx the sweep used to run MixUp (plugins {}) where train.py
    alone ran the plug-in. One name, two methods: refused in one line before any run."""
    plugin = tmp_path / "pl" / "mx.py"
    plugin.parent.mkdir()
    plugin.write_text("from methods import Method\n\nclass Mine(Method):\n    name = 'mx'\n")
    p = launch("--plugins", str(plugin), "--methods", "mx", "--dry-run", "--", "--data", "synthetic",
               out=tmp_path / "sweep", check=False)
    assert p.returncode == 2 and "train.py" not in p.stdout, p.stdout
    assert p.stderr.strip().splitlines() == [
        f"launch.sh: --methods: --plugins: method 'mx' in {plugin} is named 'mx', already method mixup's short name "
        "(--method mx and launch.sh's --methods mx mean mixup); rename it"]


# ---- plans: defaults, flags, bad input (issue 39's review) ------------------------------------------------------

PLANNED = ["--seeds", "0", "--methods", "baseline", "--cycles", "1", "--no-standard", "--no-report"]
SMALL = ["--", "--data", "synthetic", "--subset", "64", "--batch-size", "32", "--amp", "none"]
NO_SETUP = {"SKIP_SETUP": "1"}  # (a real sweep sets up first; these run nothing that needs it)


def plan_lines(plan):
    return [json.loads(line) for line in open(plan) if not line.startswith("#")]


def test_a_plans_runs_take_one_gpu_each_unless_told_and_amp_auto_is_refused_without_a_gpu(tmp_path):
    """A plan is for a cluster: its lines run on 1 GPU each (the sbatch command asks for it) unless --gpus-per-run
    says otherwise, 0 for CPU lines. Its runs on GPUs, --amp auto cannot be decided on this GPU-less machine: one
    line, exit 2, no plan and no runs folder (it used to write CPU lines, the precision measured here)."""
    plan = tmp_path / "a" / "plan"
    p = launch("--plan", str(plan), *PLANNED, *SMALL, out=plan.parent, env=NO_SETUP)
    assert {r["gpus"] for r in plan_lines(plan)} == {1} and f"--gpus-per-task=1 slurm/array.sbatch {plan}" in p.stdout
    for flag in ("--gpus-per-run", "--gpus"):
        cpu = tmp_path / flag / "plan"
        p = launch("--plan", str(cpu), flag, "0", *PLANNED, *SMALL, out=cpu.parent, env=NO_SETUP)
        assert {r["gpus"] for r in plan_lines(cpu)} == {0} and "--gpus-per-task" not in p.stdout
    auto = tmp_path / "auto"
    p = launch("--plan", str(auto / "plan"), *PLANNED, *SMALL[:-2], out=auto, env=NO_SETUP, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "pass --amp none|bf16|fp16 explicitly" in p.stderr and "write the plan on a GPU node" in p.stderr
    assert not auto.exists()


def test_report_of_a_plan_lists_the_unfinished_lines_also_when_the_report_fails(tmp_path):
    """launch.sh runs under set -e: a failed report (here: no finished run to report) ended it before the lines
    that did not finish were listed. Both now, and the report's failure is the exit status."""
    out = tmp_path / "study"
    records = "".join(f"{out}/r{i}\t--run-dir {out}/r{i} --seed {i}\n" for i in range(2))
    subprocess.run([sys.executable, "plan.py", "write", str(out / "plan"), str(out), "0", "test"], cwd=ROOT,
                   input=records, text=True, check=True, capture_output=True)
    p = launch(str(out / "plan"), out=None, command="report", check=False)
    assert p.returncode == 1 and "no readable finished runs" in p.stderr, p.stderr
    assert p.stderr.splitlines()[-3:] == [
        f"launch.sh: 2 of 2 line(s) of {out}/plan did not finish (run them again: ./launch.sh run-plan {out}/plan "
        "--index K):", f"  0 {out}/r0", f"  1 {out}/r1"]


def test_plan_and_parallel_come_from_the_flags_never_the_environment(tmp_path):
    """PLAN and PARALLEL in the environment (a shell's leftover export) used to act as --plan and --parallel, past
    the presets that refuse them: now only the flags do. Here: a plain dry run, one process per run (not a plan's
    GPU default), and no refusal of --plan with --parallel."""
    for env in ({"PLAN": str(tmp_path / "plan")}, {"PLAN": str(tmp_path / "plan"), "PARALLEL": "2"},
                {"PARALLEL": "x"}):
        p = launch("--dry-run", *PLANNED, *SMALL, out=tmp_path / "o", env=env, check=False)
        assert p.returncode == 0 and p.stderr == "", (env, p.stderr)
        runs = [line for line in p.stdout.splitlines() if "train.py" in line]
        assert len(runs) == 1 and "torch.distributed.run" not in runs[0], runs
    assert not (tmp_path / "plan").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,env,told", [
    (["--gpus-per-run", "x"], {}, "launch.sh: --gpus-per-run (or --gpus) takes the GPUs of each run"),
    (["--gpus-per-run", "-1"], {}, "launch.sh: --gpus-per-run (or --gpus) takes the GPUs of each run"),
    (["--gpus", "1.5"], {}, "got '1.5'"),
    ([], {"OMP_NUM_THREADS": "x"}, "launch.sh: OMP_NUM_THREADS='x' is no number of threads"),
    (["--parallel", "2"], {"OMP_NUM_THREADS": "0"}, "launch.sh: OMP_NUM_THREADS='0' is no number of threads"),
    (["--nnodes", "x"], {}, "launch.sh: --nnodes (or NNODES) takes the number of nodes (1, 2, ...), got 'x'"),
    (["--parallel", "2"], {"NNODES": "2.5"}, "launch.sh: --nnodes (or NNODES) takes the number of nodes"),
], ids=["gpus-per-run x", "gpus-per-run -1", "gpus 1.5", "OMP x plan", "OMP 0 parallel", "nnodes x", "NNODES 2.5"])
def test_bad_gpus_and_threads_are_one_line_and_write_nothing(tmp_path, args, env, told):
    """Each used to reach a shell test or plan.py's int() (a traceback, or a sweep on the CPU; --nnodes x: a shell
    error, then the sweep as if on one node)."""
    out = tmp_path / "study"
    plan = [] if "--parallel" in args else ["--plan", str(out / "plan")]
    p = launch(*plan, *args, *PLANNED, *SMALL, out=out, env=dict(NO_SETUP, **env), check=False)
    assert p.returncode == 2 and told in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()


@pytest.mark.parametrize("threads", ["x", "0", "-2"])
def test_train_refuses_a_bad_omp_num_threads_in_one_line(threads, tmp_path, capsys, monkeypatch):
    """train.py read OMP_NUM_THREADS with int(): 'x' was a ValueError traceback, 0 or less a silent default."""
    import train
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    monkeypatch.delenv("RANK", raising=False)
    run = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--run-dir", str(run)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == (f"train.py: error: OMP_NUM_THREADS='{threads}' is no number of threads: "
                                         "set it to 1, 2, ... or unset it")
    assert not run.exists()


def test_an_array_task_runs_on_every_core_its_job_asked_for(tmp_path):
    """srun in a batch script does not take the job's --cpus-per-task (SLURM 22.05 and later): without its own
    --cpus-per-task an array task, and every node of sweep.sbatch, trained on one core. array.sbatch run with an
    srun that prints its options; every srun line of slurm/ passes it."""
    (tmp_path / "srun").write_text("#!/bin/sh\necho \"srun $*\"\n")
    (tmp_path / "srun").chmod(0o755)
    env = dict(ENV, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="3")
    for cpus, told in (("8", "--cpus-per-task=8"), (None, "--cpus-per-task=1")):
        env = {k: v for k, v in dict(env, SLURM_CPUS_PER_TASK=cpus).items() if v is not None}
        p = subprocess.run(["bash", "slurm/array.sbatch", "runs/x/plan"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.startswith(f"srun --ntasks=1 {told} "), p.stdout + p.stderr
    for script in ("array", "sweep"):
        text = open(os.path.join(ROOT, "slurm", f"{script}.sbatch")).read()
        assert '--cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"' in text.split("\nsrun ")[1].split("./launch.sh")[0]
