#!/usr/bin/env bash
# Port exactness of a refactor (issue 41): the same tiny runs and the same analyses in two trees, compared.
#
#   benchmarks/port_check.sh BASE_TREE NEW_TREE OUT      # e.g. a `git archive` of main before the change, and this tree
#
# In each tree (with its own .venv/bin/python, else $PYTHON, else python3) it trains 24 tiny runs on Fashion-MNIST
# (--subset 1024 --batch-size 128 --grad-accum 2 --cycles 3 --amp none): the 16 sets of --blurpool --channels-last
# --label-smoothing --mixup; --label-smoothing 0.2 --mixup 0.4 --amp bf16; --blurpool --blurpool-mode conv-first
# --schedule standard --epochs 2; and one run each of wsd, schedule-free, SAM, EMA, progressive resizing and the
# ViT recipe. Every metrics.csv must equal the other tree's in every column but the measured times and speeds
# (*_s, images_per_s, peak_mem_gb), every config.json in every key but run_dir, argv and amp_measured, and what
# train.py printed in its words (numbers masked: times vary). Then
# `python -m analysis.report` and `analysis.compare` analyse the committed studies (results/) from each tree into
# OUT: every CSV must be the same bytes. Prints one line per difference and a verdict; exit 1 on any difference.
# Slow (tens of minutes on 2 quiet cores): run it under nice; JOBS=N runs N trainings or analyses at once.
set -euo pipefail
if [ $# -ne 3 ]; then echo "usage: benchmarks/port_check.sh BASE_TREE NEW_TREE OUT" >&2; exit 2; fi
BASE=$(cd "$1" && pwd) NEW=$(cd "$2" && pwd) OUT=$3
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -n "$(ls -A "$OUT")" ]; then echo "port_check.sh: OUT $OUT is not empty; give a new folder" >&2; exit 2; fi
mkdir -p "$OUT/base" "$OUT/new"

py() {  # the tree's own python
  if [ -x "$1/.venv/bin/python" ]; then echo "$1/.venv/bin/python"; else echo "${PYTHON:-python3}"; fi
}

TINY=(--subset 1024 --batch-size 128 --grad-accum 2 --cycles 3 --amp none --no-progress)
RUNS=()  # "name|flags"
for bp in "" --blurpool; do for cl in "" --channels-last; do for ls in "" --label-smoothing; do
  for mx in "" --mixup; do
    flags="$bp $cl $ls $mx"
    name=$(echo "${flags:-baseline}" | tr -s ' ' | sed 's/^ //; s/ $//; s/--//g; s/ /+/g')
    RUNS+=("${name:-baseline}|$flags")
  done
done; done; done
RUNS+=("ls0.2+mx0.4-bf16|--label-smoothing 0.2 --mixup 0.4 --amp bf16"
       "bp-conv-first-standard|--blurpool --blurpool-mode conv-first --schedule standard --epochs 2"
       "wsd|--schedule wsd" "schedule-free|--schedule schedule-free" "sam|--method sam" "ema|--method ema"
       "progressive_resizing|--method progressive_resizing" "vit|--config recipes/vit-fmnist.yaml")

JOBS=${JOBS:-1}  # runs and analyses at once (each is one process; on a busy machine more get more of its time)
slot() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done; }

for entry in "${RUNS[@]}"; do
  name=${entry%%|*} flags=${entry#*|}
  for side in base new; do
    tree=$BASE; [ $side = new ] && tree=$NEW
    slot
    # shellcheck disable=SC2086  # flags: words
    (cd "$tree" && "$(py "$tree")" train.py "${TINY[@]}" $flags --run-dir "$OUT/$side/runs/$name" \
       > "$OUT/$side/$name.log" 2>&1 && echo "ran $name ($side)" \
       || echo "train.py failed in $tree: $name (log: $OUT/$side/$name.log)") &
  done
done

# the committed studies, analysed from each tree: "out name|module|arguments"
ANALYSES=("fashion-mnist|analysis.report|results/fashion-mnist"
          "methods-fmnist|analysis.report|results/methods-fmnist"
          "resnet-fmnist|analysis.report|results/resnet-fmnist"
          "vit-recipe|analysis.report|results/vit-recipe"
          "vit-fmnist-complete|analysis.report|results/vit-fmnist --complete-seeds"
          "vit-fmnist-from4|analysis.report|results/vit-fmnist --complete-seeds --min-epochs 4"
          "resnet-epochs|analysis.compare|results/resnet-fmnist --x epochs"
          "methods-flops|analysis.compare|results/methods-fmnist --x flops"
          "methods-calibrated|analysis.report|results/methods-fmnist --x calibrated"
          "vit-fmnist-calibrated|analysis.compare|results/vit-fmnist --x calibrated --complete-seeds")
for entry in "${ANALYSES[@]}"; do
  IFS='|' read -r name module args <<<"$entry"
  for side in base new; do
    tree=$BASE; [ $side = new ] && tree=$NEW
    slot
    # shellcheck disable=SC2086  # args: words
    (cd "$tree" && MPLBACKEND=Agg "$(py "$tree")" -m "$module" $args --out "$OUT/$side/analysis/$name" \
       > "$OUT/$side/analysis-$name.log" 2>&1; echo $? > "$OUT/$side/analysis-$name.rc"
     echo "analysed $name ($side)") &
  done
done
wait

"$(py "$NEW")" - "$OUT" "${#RUNS[@]}" "$BASE" "$NEW" <<'EOF'
import csv, json, os, re, sys
out, expected, trees = sys.argv[1], int(sys.argv[2]), sys.argv[3:5]
TIMES = {"images_per_s", "peak_mem_gb"}  # and every *_s column: measured, not computed
MACHINE = {"run_dir", "argv", "amp_measured"}  # config.json keys that name the folder or a timing
problems, runs = [], 0
for name in sorted(os.listdir(os.path.join(out, "base", "runs"))):
    a, b = (os.path.join(out, side, "runs", name) for side in ("base", "new"))
    try:
        rows = [list(csv.DictReader(open(os.path.join(d, "metrics.csv")))) for d in (a, b)]
        configs = [json.load(open(os.path.join(d, "config.json"))) for d in (a, b)]
    except OSError as e:
        problems.append(f"{name}: {e}")
        continue
    runs += 1
    keep = lambda r: {k: v for k, v in r.items() if not (k.endswith("_s") or k in TIMES)}  # noqa: E731
    if [keep(r) for r in rows[0]] != [keep(r) for r in rows[1]] or not rows[0]:
        problems.append(f"{name}: metrics.csv differs outside the time columns ({len(rows[0])} vs {len(rows[1])} rows)")
    ca, cb = ({k: v for k, v in c.items() if k not in MACHINE} for c in configs)
    differ = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    if differ:
        problems.append(f"{name}: config.json differs in {differ}")
    if not (os.path.exists(os.path.join(a, "done")) and os.path.exists(os.path.join(b, "done"))):
        problems.append(f"{name}: not finished in both trees")
    # what train.py printed, its words: the trees' and OUT's paths made alike, every number masked (times vary)
    said = [re.sub(r"\d+", "#", open(os.path.join(out, side, f"{name}.log")).read().replace(tree, "TREE")
                   .replace(f"/{side}/", "/SIDE/")) for side, tree in zip(("base", "new"), trees)]
    if said[0] != said[1]:
        problems.append(f"{name}: train.py's output differs")
if runs != expected:
    problems.append(f"{runs} runs compared, {expected} expected")
tables = 0
names = sorted(f[len("analysis-"):-len(".rc")] for f in os.listdir(os.path.join(out, "base")) if f.endswith(".rc"))
for name in names:
    rc, logs = ([open(os.path.join(out, side, f"analysis-{name}.{ext}")).read().replace(f"/{side}/", "/SIDE/")
                 for side in ("base", "new")] for ext in ("rc", "log"))
    if rc[0] != rc[1]:
        problems.append(f"analysis {name}: exit codes {rc[0].strip()} and {rc[1].strip()}")
    if logs[0] != logs[1]:  # the printed tables and messages (a refusal too), the OUT paths made alike
        problems.append(f"analysis {name}: its output differs")
    a, b = (os.path.join(out, side, "analysis", name) for side in ("base", "new"))
    files = sorted(f for d in (a, b) if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".csv"))
    if rc[0].strip() == "0" and not files:
        problems.append(f"analysis {name}: wrote no CSV")
    for f in sorted(set(files)):
        tables += 1
        pa, pb = os.path.join(a, f), os.path.join(b, f)
        if not (os.path.exists(pa) and os.path.exists(pb)) or open(pa, "rb").read() != open(pb, "rb").read():
            problems.append(f"analysis {name}: {f} differs")
print("\n".join(problems))
print(f"port check: {runs} runs (metrics.csv outside the time columns, config.json, output), {len(names)} analyses "
      f"({tables} CSVs, exit codes, output): "
      + ("IDENTICAL" if not problems else f"{len(problems)} DIFFERENCES"))
sys.exit(1 if problems else 0)
EOF
