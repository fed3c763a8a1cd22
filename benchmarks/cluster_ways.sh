#!/usr/bin/env bash
# One study run three ways on this machine, then compared (issue 39's done-when; a benchmark, not a test):
#   1. the plain sweep, one run after another;  2. ./launch.sh sweep --parallel 2;
#   3. a plan run as a 2-wide SLURM job array through the shims (tests/shims: sbatch runs the tasks here).
# The study: the demo's runs (Fashion-MNIST, SUBSET=20000 images, warmup = t0 = 0.5 epochs, 3 cycles) plus one more
# method set (ls), in fp32 (--amp auto would measure per folder) and one thread per run in every way
# (OMP_NUM_THREADS=1: the same arithmetic, so the accuracy columns can be equal to the bit). Prints each way's
# wall-clock, whether every metrics.csv equals the sequential one but for the time columns, and whether the curves
# on the calibrated axis (benchmarks.calibrate once, analysis.compare --x calibrated per way) are the same;
# OUT/summary.md keeps it. Logs: OUT/<way>.log.
#   benchmarks/cluster_ways.sh OUT          (OUT must not exist; run it on a quiet machine: it is timed)
set -euo pipefail
out=$(realpath -m "${1:?usage: benchmarks/cluster_ways.sh OUT (a new folder)}")
cd "$(dirname "$0")/.."
[ ! -e "$out" ] || { echo "cluster_ways.sh: $out exists; give a new folder" >&2; exit 2; }
mkdir -p "$out"
export OMP_NUM_THREADS=1 SKIP_SETUP=1 SLURM_SHIM_STATE="$out/slurm-shim"
py=.venv/bin/python; [ -x "$py" ] || py=python3
study=(--methods "${METHODS:-baseline,ls}" --warmup 0.5 --t0 0.5 --cycles 3 --no-report
       -- --subset "${SUBSET:-20000}" --amp none)

array_way() {  # the plan, then its lines as an array, 2 tasks at once, then the report job after it
  ./launch.sh sweep --out "$out/array" --plan "$out/array/plan" --gpus-per-run 0 "${study[@]}"  # CPU lines
  local n; n=$(grep -vc '^#' "$out/array/plan")
  PATH="$PWD/tests/shims:$PATH" sbatch --array=0-$((n - 1))%2 slurm/array.sbatch "$out/array/plan"
}

declare -A took
for way in sequential parallel array; do
  start=$(date +%s.%N)
  case $way in
    sequential) cmd=(./launch.sh sweep --out "$out/sequential" "${study[@]}");;
    parallel) cmd=(./launch.sh sweep --out "$out/parallel" --parallel 2 "${study[@]}");;
    array) cmd=(array_way);;
  esac
  "${cmd[@]}" > "$out/$way.log" 2>&1 || { echo "cluster_ways.sh: the $way way failed: $out/$way.log" >&2; exit 1; }
  took[$way]=$("$py" -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.0f}")' "$start" \
                "$(date +%s.%N)")
  echo "$way: ${took[$way]} s"
done

# the runs' numbers: every metrics.csv of each way against the sequential one, time columns left out
same=$("$py" - "$out" <<'EOF'
import csv, pathlib, sys
out = pathlib.Path(sys.argv[1])
TIME = {"train_time_s", "curve_cost_s", "images_per_s", "eval_time_s", "startup_s"}
rows = lambda p: [{k: v for k, v in r.items() if k not in TIME} for r in csv.DictReader(open(p))]
runs = sorted(p.relative_to(out / "sequential") for p in (out / "sequential").rglob("metrics.csv"))
bad = [f"{way}/{r}" for way in ("parallel", "array") for r in runs
       if not (out / way / r).exists() or rows(out / way / r) != rows(out / "sequential" / r)]
print(f"{len(runs)} runs: " + (f"DIFFERENT: {', '.join(bad)}" if bad else "identical in every column but the times"))
EOF
)
echo "$same"

# the curves on the calibrated axis: one calibration (of the sequential runs' configurations, the same in all ways)
"$py" -m benchmarks.calibrate "$out/sequential" --rounds 3 > "$out/calibrate.log" 2>&1
for way in sequential parallel array; do
  "$py" -m analysis.compare "$out/$way" --x calibrated --calibration "$out/sequential/calibration.json" \
    --out "$out/$way/calibrated" > "$out/$way-compare.log" 2>&1
done
curves=$("$py" - "$out" <<'EOF'
import csv, sys
MEASURED = {"time_mean", "cost_mean"}  # the measured axis; the calibrated one and the accuracies must agree
rows = lambda way: [{k: v for k, v in r.items() if k not in MEASURED}
                    for r in csv.DictReader(open(f"{sys.argv[1]}/{way}/calibrated/curves.csv"))]
bad = [way for way in ("parallel", "array") if rows(way) != rows("sequential")]
print(f"DIFFERENT ({', '.join(bad)})" if bad else "the same in all three ways")
EOF
)
echo "calibrated curves (curves.csv): $curves"

cat > "$out/summary.md" <<EOF
| way | wall-clock (s) |
|---|---|
| sequential sweep | ${took[sequential]} |
| \`--parallel 2\` | ${took[parallel]} |
| 2-wide local array (tests/shims) | ${took[array]} |

metrics.csv: $same. Calibrated curves: $curves. $(OMP_NUM_THREADS= nproc) cores, OMP_NUM_THREADS=1 per run, $(date -u +%F).
EOF
echo "summary: $out/summary.md"
[[ "$same" != *DIFFERENT* && "$curves" != *DIFFERENT* ]]
