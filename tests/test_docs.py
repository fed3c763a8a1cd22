"""Docs that cannot rot (issue 40): every documented command of ours is checked, every relative link and image of the
docs exists, and each committed report is what the command it records writes today.

Read from README.md, docs/*.md and results/*/README.md, in fenced shell blocks (bash, sh, shell, console or
unlabeled; a `$ ` prompt dropped): a command that calls train.py (`python train.py`, torchrun), launch.sh,
schedules.py, shards.py, gpu_check.py, a `slurm/*.sbatch` (through sbatch) or `python -m` one of our modules.
- every flag a command gives is one its program takes (argparse's option list, launch.sh's `case` labels; flags
  after a sweep's `--` are train.py's), and a value is one of the flag's choices where it lists them;
- train.py: `train.py ... --check` in this process (options, recipes, plug-ins, --run-dir and --resume, the model
  with its methods on the data, the schedule), under torchrun at its world size;
- launch.sh: run with DRY=1 (it prints the runs' commands and writes nothing), and its first train.py command then
  passes --check; setup, test, demo and gpu-check are exempt from running (CI and the suite run them);
- a documented `analysis.report` command that writes a committed report is the one the report records.
A synopsis (`[--flag]`, `RUNS...`, `<job id>`, an unknown $VAR) is checked for its flags alone; a line of a shell
block that names one of our programs but is read as no command fails. Markers in the Markdown, on their own line
before a block:
  <!-- docs-check: placeholders /data/imagenet runs/imagenet/plan -->  paths that need not exist here (this block;
      train.py checks such data with --check shape: by its dataset's shape and size)
  <!-- docs-check: file my_aug.py -->  the next block is that file, for this page's commands (written to a
      temporary folder for the checks)
  <!-- docs-check: run -->  the next block is Python that runs from the repository's root (a notebook's snippet)
A --data-dir, --config or --plugins path that is neither here nor a placeholder fails the check.
"""
import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from conftest import ENV, ROOT

DOCS = ["README.md"] + sorted(glob.glob("docs/*.md", root_dir=ROOT)) + sorted(glob.glob("results/*/README.md",
                                                                                           root_dir=ROOT))
SCRIPTS = ("train.py", "launch.sh", "schedules.py", "shards.py", "gpu_check.py")
MODULES = ("analysis.", "benchmarks.", "data.")
SHELL = ("bash", "sh", "shell", "console", "shell-session", "")
EXEMPT = {"setup", "test", "demo", "gpu-check"}
MARKER = re.compile(r"^<!-- docs-check: (placeholders|file|run) ?(.*?) -->$")
PATH_FLAGS = ("--data-dir", "--config", "--plugins")
NAMES = re.compile(r"(^|[\s/])(train\.py|launch\.sh|schedules\.py|shards\.py|gpu_check\.py)\b|slurm/\w+\.sbatch|"
                   r"-m (analysis|benchmarks|data)\.")
LAUNCHERS = re.compile(r"^(\S*python[\d.]*|torchrun|sbatch|srun|nohup|nice|time|timeout|env|bash|\w+=\S*)$")


@dataclass
class Command:
    doc: str
    line: int
    words: list  # the command's words, from its program on (`python -m analysis.report` as analysis.report)
    synopsis: bool
    placeholders: set = field(default_factory=set)
    launcher: list = field(default_factory=list)  # the words before the program (python, torchrun and its flags)

    @property
    def program(self):
        return self.words[0]

    def __str__(self):
        return f"{self.doc}:{self.line}: {shlex.join(self.launcher + self.words)}"


def blocks(doc):
    """(language, first line number, lines, placeholders) of each fenced block of `doc`, and {file name: text} of
    the blocks marked as files (a block marked to run: under the name '<line>.run.py')."""
    lines, out, files = open(os.path.join(ROOT, doc)).read().split("\n"), [], {}
    marks, i = {}, 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m:
            marks.setdefault(m.group(1), []).extend(m.group(2).split())
        elif lines[i].startswith("```"):
            lang, start = lines[i][3:].strip(), i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
            if "file" in marks or "run" in marks:
                name = marks["file"][0] if "file" in marks else f"{start + 1}.run.py"
                files[name] = "\n".join(lines[start:end]) + "\n"
            out.append((lang, start + 1, lines[start:end], set(marks.get("placeholders", []))))
            marks, i = {}, end
        i += 1
    return out, files


def ours(words):
    """(launcher words, the words from our program on), or None where the command is not one of ours: its first
    word is our program or launches it (python, torchrun, sbatch, nice, VAR=value, ...)."""
    if not words or not (LAUNCHERS.match(words[0]) or os.path.basename(words[0]) in SCRIPTS):
        return None
    for k, w in enumerate(words):
        if os.path.basename(w) in SCRIPTS or re.fullmatch(r"(\./)?slurm/\w+\.sbatch", w):
            return words[:k], [os.path.basename(w) if w.endswith(SCRIPTS) else w.lstrip("./")] + words[k + 1:]
        if w == "-m" and k + 1 < len(words) and words[k + 1].startswith(MODULES):
            return words[:k], words[k + 1:]
    return None


def logical_lines(first, lines):
    """(line number, text) of a block's commands: a `$ ` prompt dropped, backslash continuations and quoted strings
    over several lines joined, comments dropped."""
    out, start, buf = [], None, ""
    for n, line in enumerate(lines, first):
        line = re.sub(r"^\$ ", "", line)
        line = "" if line.lstrip().startswith("#") else line.split(" #")[0]
        start = n if start is None else start
        if line.rstrip().endswith("\\") or (buf + line).count('"') % 2:  # continued, or inside a quoted string
            buf += (line.rstrip()[:-1] if line.rstrip().endswith("\\") else line) + " "
            continue
        out.append((start, buf + line))
        start, buf = None, ""
    return out


def parse(doc):
    """(commands, unread): every command of ours in `doc`'s shell blocks (`a; b`, `a && b` and `for x in A B; do
    ... $x ...` split, a block's `NAME=value` lines substituted into the commands after them), and the lines of
    shell blocks that name one of our programs but were read as no command."""
    found, unread = [], []
    for lang, first, lines, placeholders in blocks(doc)[0]:
        if lang not in SHELL:
            continue
        vars_ = {}
        for n, line in logical_lines(first, lines):
            parts = [p for p in re.split(r";|&&", line) if p.strip()]
            read = 0
            for part in parts:
                words = part.split()
                while words[:1] in (["do"], ["then"]):
                    words, part = words[1:], part.replace(words[0], "", 1)
                if words[:1] == ["for"] and "in" in words:  # for x in A B C: x is A
                    vars_[words[1]] = words[words.index("in") + 1]
                    continue
                try:
                    split = shlex.split(part)
                except ValueError:  # unbalanced quotes: not a command
                    continue
                if re.match(r"^\w+=", part.strip()) and len(split) == 1:  # NAME=value, NAME="a b"
                    name, value = split[0].split("=", 1)
                    vars_[name] = value
                    continue
                unknown = False

                def expand(m):
                    nonlocal unknown
                    name = m.group(1) or m.group(2)
                    unknown |= name not in vars_
                    return vars_.get(name, m.group(0))
                try:
                    got = ours(shlex.split(re.sub(r"\$\{(\w+)\}|\$(\w+)", expand, part)))
                except ValueError:
                    continue
                if got:
                    launcher, words = got
                    synopsis = unknown or any("..." in w or w.startswith(("[", "<")) or w.endswith(("]", ">"))
                                              or re.fullmatch(r"[A-Z][A-Z_]+", w) for w in words[1:])
                    found.append(Command(doc, n, words, synopsis, placeholders, launcher))
                    read += 1
            if lang and NAMES.search(line) and not read and not re.match(r"^\s*\w+=", line):
                unread.append(f"{doc}:{n}: {line.strip()}")
    return found, unread


ALL = [c for doc in DOCS for c in parse(doc)[0]]


def flags(words):
    """The --flags a command gives (their names, values left out; a synopsis's `[--flag X]` too)."""
    return sorted({f for w in words for f in re.findall(r"^\[?(--[\w-]+)", w)})


def given(words, flag):
    """The value given to `flag` in words (`--flag V` or `--flag=V`), or None."""
    for k, w in enumerate(words):
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
        if w == flag and k + 1 < len(words):
            return words[k + 1]
    return None


@pytest.fixture(scope="module")
def options():
    """{program: {flag: its choices or None}}: argparse's option list from --help (train.py: its parser), and
    launch.sh's `case` labels."""
    cache = {"launch.sh": {f: None for f in re.findall(r"(--[\w-]+)(?=[|)])",
                                                        open(os.path.join(ROOT, "launch.sh")).read())}}

    def get(program):
        if program == "train.py":
            import options as train_options
            return {s: a.choices for a in train_options.build_parser()._actions for s in a.option_strings}
        if program not in cache:
            cmd = [sys.executable, program] if program.endswith(".py") else [sys.executable, "-m", program]
            p = subprocess.run(cmd + ["--help"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, f"{program} --help: {p.stderr[-2000:]}"
            cache[program] = {}
            for line in p.stdout.splitlines():  # '  -x, --flag {a,b}  help': the option list, not the prose
                m = re.match(r"^\s{2}(?:-\w[ ,\w]*, )?(--[\w-]+)(?: \{([^}]*)\})?", line)
                if m:
                    cache[program][m.group(1)] = m.group(2).split(",") if m.group(2) else None
        return cache[program]
    return get


@pytest.fixture(scope="module")
def doc_files(tmp_path_factory):
    """The files each page writes (its marked blocks), in temporary folders: {(doc, name): path}; pages that write
    the same file share it (train.py's plug-in registry, in this process, takes one file per method)."""
    out, written = {}, {}
    for doc in DOCS:
        for name, text in blocks(doc)[1].items():
            if (name, text) not in written:
                written[(name, text)] = tmp_path_factory.mktemp("doc-files") / name
                written[(name, text)].write_text(text)
            out[(doc, name)] = str(written[(name, text)])
    return out


def checked_paths(command, doc_files):
    """The command's words with its page's files in place; fails on a path flag's value that is neither here nor a
    placeholder."""
    words = [doc_files.get((command.doc, w), w) for w in command.words]
    for flag, value in zip(words, words[1:]):
        if flag in PATH_FLAGS and not os.path.exists(os.path.join(ROOT, value)):
            assert any(value.startswith(p) for p in command.placeholders), \
                f"{command}: {flag} {value} is not here; fix the path, or mark it <!-- docs-check: placeholders ... -->"
    return words


def placeholder_data(words, command):
    """Whether the words' --data-dir is a placeholder of the command's block (train.py then checks it by shape)."""
    return given(words, "--data-dir") in command.placeholders


def check_train(words, world_size=1, shape=False):
    """train.py's words + --check (shape: data that is not here checked by its shape), in this process at
    `world_size` ranks: (exit status, what it printed)."""
    import train
    env = {"RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"} if world_size > 1 else {}
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.pop(k, None) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(env)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                train.main(words + ["--check"] + (["shape"] if shape else []))
                code = 0
            except SystemExit as e:
                code = e.code or 0
    finally:
        os.chdir(cwd)
        for k in env:
            os.environ.pop(k)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    return code, out.getvalue() + err.getvalue()


def torchrun_world(launcher):
    """The world size of a torchrun launcher's words (--nproc_per_node or --nproc-per-node x --nnodes), else 1."""
    if not any(w.endswith(("torchrun", "torch.distributed.run")) for w in launcher):
        return 1
    size = 1
    for names in (("--nproc_per_node", "--nproc-per-node"), ("--nnodes",)):
        value = next((given(launcher, n) for n in names if given(launcher, n)), "1")
        size *= int(value.split(":")[-1])
    return size


def unknown_flags(command, options):
    """The command's flags its program does not take, and values not among a flag's choices."""
    program, words = command.program, command.words[1:]
    own, extra = (words[:words.index("--")], words[words.index("--") + 1:]) if "--" in words else (words, [])
    if program.startswith("slurm/"):  # sweep.sbatch passes its arguments to launch.sh sweep; the others take a plan
        program = "launch.sh" if program.endswith("sweep.sbatch") else None
    if program is None:
        return []
    if program != "launch.sh":
        own, extra = words, []
    bad = []
    for table, part in ((options(program), own), (options("train.py"), extra)):
        for f in flags(part):
            if f not in table:
                bad.append(f)
            elif table[f] and not command.synopsis:
                value = given(part, f)
                if value is not None and not value.startswith("-") and value not in table[f]:
                    bad.append(f"{f} {value} (choices: {', '.join(table[f])})")
    return bad


@pytest.mark.parametrize("command", ALL, ids=[f"{c.doc}:{c.line}" for c in ALL])
def test_every_documented_command_of_ours_passes_its_check(command, options, doc_files):
    program = command.program
    bad = unknown_flags(command, options)
    assert not bad, f"{command}: {'; '.join(bad)}: not what {program} takes"
    if program.startswith("slurm/"):
        assert os.path.exists(os.path.join(ROOT, program)), f"{command}: no {program}"
        return
    if command.synopsis or (program == "launch.sh" and command.words[1:2] and command.words[1] in EXEMPT):
        return  # (the exempt ones: CI and the suite run them)
    if program not in ("train.py", "launch.sh"):  # the repository's paths it reads (results/, recipes/) are here
        missing = [w for prev, w in zip(command.words, command.words[1:]) if w.startswith(("results/", "recipes/"))
                   and prev not in ("--out", "--json") and not glob.glob(os.path.join(ROOT, w))]
        assert not missing, f"{command}: {', '.join(missing)} not in the repository"
        out = given(command.words, "--out")
        report = out and os.path.join(ROOT, out, "report.md")
        if program == "analysis.report" and report and os.path.exists(report):  # the committed report's command
            assert f"Made by `{shlex.join(['python', '-m', *command.words])}`." in open(report).read(), \
                f"{command}: {out}/report.md records another command"
        return
    words = checked_paths(command, doc_files)
    if program == "train.py":
        code, said = check_train(words[1:], torchrun_world(command.launcher), placeholder_data(words, command))
        assert code == 0 and "train.py --check: OK" in said, f"{command}: {said[-1500:]}"
        return
    p = subprocess.run(["./launch.sh", *words[1:]], cwd=ROOT, env=dict(ENV, DRY="1", SKIP_SETUP="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{command}: launch.sh under DRY=1 failed: {p.stderr[-2000:]}"
    first = next((shlex.split(line) for line in p.stdout.splitlines() if " train.py " in line), None)
    if first:  # the runs' own options, as the sweep would give them
        launcher, run = ours(first)
        code, said = check_train(run[1:], torchrun_world(launcher), placeholder_data(run, command))
        assert code == 0, f"{command}: its first run: {shlex.join(first)}: {said[-1500:]}"


def test_every_line_of_ours_in_the_docs_is_read_as_a_command():
    """A line of a shell block that names one of our programs but that the parser does not read as a command (an
    unknown launcher: `python -X`, `exec`) would never be checked."""
    unread = [line for doc in DOCS for line in parse(doc)[1]]
    assert not unread, "\n".join(unread)


def test_the_docs_show_commands_of_every_kind():
    """The extraction itself: the docs' commands of each program are found (a parser that finds none checks none)."""
    programs = {c.program for c in ALL}
    assert {"train.py", "launch.sh", "schedules.py", "shards.py", "analysis.report", "analysis.compare",
            "slurm/sweep.sbatch", "slurm/array.sbatch"} <= programs
    assert sum(not c.synopsis for c in ALL if c.program == "train.py") >= 5
    assert any(c.synopsis for c in ALL) and any(torchrun_world(c.launcher) == 8 for c in ALL)


RUNNABLE = [(doc, name) for doc in DOCS for name in blocks(doc)[1] if name.endswith(".run.py")]


@pytest.mark.parametrize("doc,name", RUNNABLE, ids=[f"{d}:{n.split('.')[0]}" for d, n in RUNNABLE])
def test_a_documented_python_snippet_runs(doc, name):
    p = subprocess.run([sys.executable, "-c", blocks(doc)[1][name]], cwd=ROOT, env=dict(ENV, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{doc}, the block at line {name.split('.')[0]}: {p.stderr[-2000:]}"


def test_the_docs_show_runnable_snippets():
    assert len(RUNNABLE) >= 3  # README's two notebook snippets and docs/analysis.md's


# ---- links and images ------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS + ["tests/README.md"])
def test_every_relative_link_and_image_exists(doc):
    text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, doc)).read(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
        if not os.path.exists(full):
            broken.append(f"{target} (no such file)")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            broken.append(f"{target} (no heading of that anchor)")
    assert not broken, f"{doc}: " + "; ".join(broken)


# ---- committed reports: the command each records writes its text today -------------------------------------------

REPORTS = sorted(glob.glob("results/**/report.md", root_dir=ROOT, recursive=True))


@pytest.mark.parametrize("report", REPORTS)
def test_a_committed_report_is_what_its_recorded_command_writes_today(report, tmp_path):
    text = open(os.path.join(ROOT, report)).read()
    made = re.search(r"^Made by `(python -m analysis\.report .+)`\.$", text, flags=re.M)
    assert made, f"{report}: its header records no command (regenerate it: python -m analysis.report ...)"
    words = shlex.split(made.group(1))[3:]
    out = words[words.index("--out") + 1]
    assert os.path.normpath(out) == os.path.dirname(report), f"{report}: its command writes to {out}"
    words[words.index("--out") + 1] = str(tmp_path)
    p = subprocess.run([sys.executable, "-m", "analysis.report", *words, "--no-figures"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    today = open(tmp_path / "report.md").read().replace(str(tmp_path), out)
    assert today == text, f"{report} differs from what `{made.group(1)}` writes today: regenerate it"
