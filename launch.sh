#!/usr/bin/env bash
# launch.sh: set up, run the demo, run sweeps, run the tests.
#
#   ./launch.sh setup                 venv in .venv, requirements, Fashion-MNIST (Debian package)
#   ./launch.sh demo                  setup + a real cyclic-vs-standard curve on Fashion-MNIST + report
#   ./launch.sh test [--fast]         setup + the test suite (--fast: without the tests marked slow)
#   ./launch.sh sweep [options]       cyclic + standard runs for every seed x method set, then the report
#   ./launch.sh run-plan PLAN --index K | --next | --parallel N   line K of a plan (a SLURM array task), the next
#                                     unclaimed ones (a worker per SLURM job), or all of them N at once here
#   ./launch.sh report OUT|PLAN [analysis.report options]   the report of a study's folder (or a plan's, listing the
#                                     lines that did not finish)
#   ./launch.sh repro [options]       the study: eight method sets x 3 seeds on Fashion-MNIST + estimators (a preset)
#   ./launch.sh vit-study [--pilot|--more-seeds|--resnet]  Study 2: the ViT recipe (--resnet: the small
#                                     ResNet) x seven method sets x 3 seeds on 10k images (a preset)
#   ./launch.sh gpu-check [--data-dir DIR]  on a CUDA machine, offline: CUDA tests + gpu_check.py (< 10 min)
#
# Sweep options (each also as an environment variable, e.g. SEEDS="0 1", but --plan and --parallel: flags only):
#   --seeds "0 1"  --warmup 1 --t0 1 --t-mult 2 --cycles 4
#   --methods baseline,ema,sam:rho=0.1,ls+mx,cutmix:alpha=1.0,mixup_alpha=0.8  (method sets, comma-separated; a
#       set joins methods by +; bp cl ls mx are the paper's four; any other is train.py's --method spec; a
#       key=value after a comma continues the method before it)
#   --plugins FILE.py (repeatable: train.py --plugins, for methods of your own)
#   --data fashion-mnist --data-dir DIR --model small_resnet  --gpus N (torchrun --nproc_per_node)
#   --nnodes N --rdzv-endpoint HOST:PORT (multi-node)  --constant (add constant-period runs)
#   --schedules cyclic,cyclic-decay,wsd,schedule-free (one-run estimators; none: standard runs only)
#   --no-standard (the estimators only: the cheap benchmark, once the cyclic curve is trusted)
#   --budgets "2 32" (standard runs at these cycle ends only, e.g. a pilot's smallest and largest)
#   --config FILE.yaml (repeatable: a recipe for every run; its shape, model, data and amp are this sweep's defaults,
#       over the environment variables; a flag here overrides it)
#   --vit (the ViT recipe, recipes/vit-fmnist.yaml; results/vit-recipe/README.md; EXTRA flags override it)
#   --out runs/sweep  --no-report  --dry-run (print the commands only)  -- EXTRA train.py FLAGS
#   --plan FILE (write the study as a plan, run nothing: plan.py; 1 GPU per run unless --gpus-per-run K, 0: CPU)
#   --parallel N [--gpus-per-run K] (N runs at once on this machine, each with K GPUs (--gpus K) or its share of
#       the cores)
# A finished run (has 'done') is skipped; an unfinished one is resumed (--resume auto), so a killed
# sweep continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    # system site packages: reuse a torch already installed on the machine instead of a second 5 GB copy
    python3 -m venv --system-site-packages "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get install -y -q dataset-fashion-mnist >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
    else
      echo "launch.sh: Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)," \
           "or put the four IDX files in a folder and pass --data-dir" >&2
    fi
  fi
}

py_bin() { if [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"; else echo python3; fi; }
PY() { "$(py_bin)" "$@"; }
# the device train.py would train on here, as OUT/SET/compile records it: 'cuda: NVIDIA H100 80GB HBM3', 'cpu: ...'
DEVICE_HERE='import torch, options
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"{device.type}: {options.hardware_name(device)}")'
device_here() { PY -c "$DEVICE_HERE"; }

# ---- sweep ----------------------------------------------------------------------------------
SEEDS=${SEEDS:-0}; METHODS=${METHODS:-baseline}; WARMUP=${WARMUP:-1}; T0=${T0:-1}; T_MULT=${T_MULT:-2}
CYCLES=${CYCLES:-4}; DATA=${DATA:-fashion-mnist}; DATA_DIR=${DATA_DIR:-}; MODEL=${MODEL:-small_resnet}
GPUS=${GPUS:-}; NNODES=${NNODES:-1}; RDZV=${RDZV:-}; CONSTANT=${CONSTANT:-0}; OUT=${OUT:-runs/sweep}
DRY=${DRY:-0}; SCHEDULES=${SCHEDULES:-cyclic}; REPORT=${REPORT:-1}; STANDARD=${STANDARD:-1}; BUDGETS=${BUDGETS:-}
# --plan and --parallel from flags only: an exported PLAN must not turn a preset (repro, which refuses --plan) into
# a plan; GPUS empty: the default, 1 GPU per run under --plan (a plan is for a cluster), else 0 (check_plan)
PLAN=""; PARALLEL=1; PLAN_RC=0; RECORDS=""
EXTRA=(); FAILED=(); STOPPED=""; SIGNALLED=""; CHECKED=""; RECIPE_READ=""
PLUGINS=()

parse_sweep() {
  PLUGINS=(); CONFIGS=(); RECIPE_AMP=""; RECIPE_COMPILE=""  # each sweep its own (repro calls sweep several times)
  local given=" "
  while [ $# -gt 0 ]; do
    given+="$1 "
    case "$1" in
      --seeds) SEEDS=$2; shift 2;; --methods) METHODS=$2; shift 2;; --warmup) WARMUP=$2; shift 2;;
      --t0) T0=$2; shift 2;; --t-mult) T_MULT=$2; shift 2;; --cycles) CYCLES=$2; shift 2;;
      --data) DATA=$2; shift 2;; --data-dir) DATA_DIR=$2; shift 2;; --model) MODEL=$2; shift 2;;
      --gpus) GPUS=$2; shift 2;; --nnodes) NNODES=$2; shift 2;; --rdzv-endpoint) RDZV=$2; shift 2;;
      --constant) CONSTANT=1; shift;; --out) OUT=$2; shift 2;; --dry-run) DRY=1; shift;;
      --schedules) SCHEDULES=$2; shift 2;; --no-report) REPORT=0; shift;; --no-standard) STANDARD=0; shift;;
      --budgets) BUDGETS=$2; shift 2;;
      --plan) [ -n "${2:-}" ] || { echo "launch.sh: --plan takes the file to write the plan to, got ''" >&2; exit 2; }
              PLAN=$2; shift 2;; --parallel) PARALLEL=$2; shift 2;; --gpus-per-run) GPUS=$2; shift 2;;
      --config) [ -f "${2:-}" ] || { echo "launch.sh: --config: no file ${2:-}" >&2; exit 2; }
                CONFIGS+=(--config "$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2;;
      --vit) CONFIGS=(--config "$PWD/recipes/vit-fmnist.yaml" "${CONFIGS[@]}"); shift;;
      --plugins) [ -f "$2" ] || { echo "launch.sh: --plugins: no file $2" >&2; exit 2; }
                 PLUGINS+=(--plugins "$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2;;
      --) shift; EXTRA=("$@"); break;;
      *) echo "launch.sh: unknown sweep option '$1' (see the top of launch.sh)" >&2; exit 2;;
    esac
  done
  local i normalised=()
  if [ ${#EXTRA[@]} -gt 0 ]; then
    for i in "${EXTRA[@]}"; do  # --amp=X as --amp X (--compile=X too), which the logic below reads
      if [[ "$i" == --amp=* || "$i" == --compile=* ]]; then normalised+=("${i%%=*}" "${i#*=}")
      else normalised+=("$i"); fi
    done
    EXTRA=("${normalised[@]}")
  fi
  for i in "${EXTRA[@]:-}"; do
    case "$i" in
      --config|--config=*) echo "launch.sh: give --config before '--' (the sweep takes its shape, model and data" \
                                "from it)" >&2; exit 2;;
      --t0|--t0=*|--t-mult|--t-mult=*|--cycles|--cycles=*|--warmup-epochs|--warmup-epochs=*|--epochs|--epochs=*)
        echo "launch.sh: ${i%%=*} after '--': give the sweep's own --warmup/--t0/--t-mult/--cycles (its budgets" \
             "come from them)" >&2; exit 2;;
    esac
  done
  [ ${#CONFIGS[@]} -gt 0 ] || return 0
  # what the recipes set of the sweep's own options (shape, model, data, precision) is their default here
  local lines flag var value
  if [ "${RECIPE_READ%%|*}" = "${CONFIGS[*]}" ]; then  # a preset's sweeps of the same recipes: read once
    lines=${RECIPE_READ#*|}
  else
    lines=$(PY -c 'import sys
try:
    import options
except ImportError as e:
    sys.exit(f"launch.sh: --config needs the environment ({e}): run ./launch.sh setup first")
print(options.sweep_defaults(sys.argv[2::2]))' "${CONFIGS[@]}") || exit 2
    RECIPE_READ="${CONFIGS[*]}|$lines"
  fi
  while read -r flag var value; do
    if [ -n "$flag" ] && [[ "$given" != *" $flag "* ]]; then printf -v "$var" '%s' "$value"; fi
  done <<<"$lines"
}

method_flags() {  # bp+cl -> --blurpool --channels-last; ema+sam:rho=0.1 -> --method ema --method sam:rho=0.1
  local set=$1 flags=() m
  [ "$set" = baseline ] && return 0
  if [[ "$set" == +* || "$set" == *+ ]]; then  # (read drops a last empty field: ls+ would run as ls, labelled ls+)
    echo "launch.sh: bad method '' in --methods set '$set' (names joined by +, sets by commas)" >&2; exit 2
  fi
  IFS=+ read -ra parts <<<"$set"
  for m in "${parts[@]}"; do
    case "$m" in
      bp) flags+=(--blurpool);; cl) flags+=(--channels-last);; ls) flags+=(--label-smoothing);; mx) flags+=(--mixup);;
      ""|*" "*|*/*) echo "launch.sh: bad method '$m' in --methods (names joined by +, sets by commas)" >&2; exit 2;;
      *) flags+=(--method "$m");;  # train.py checks the name and its options
    esac
  done
  echo "${flags[@]}"
}

method_sets() {  # the --methods list, one set per line: "a,sam:rho=0.1,x=2,b" -> a / sam:rho=0.1,x=2 / b
  local piece sets=() IFS=,
  for piece in $1; do
    if [[ "$piece" == *=* && "$piece" != *:* && ${#sets[@]} -gt 0 ]]; then sets[-1]+=",$piece"
    else sets+=("$piece"); fi
  done
  printf '%s\n' "${sets[@]}"
}

check_methods() {  # extra flags, plugin flags, then label and flags of every set: names, options, combinations,
  # and two sets that are one canonical set (ls+mx and mx+ls), before any run
  PY -c 'import sys
extra, plugins, sets, seen = sys.argv[1].split(), sys.argv[2].split(), sys.argv[3:], {}
empty = next((i for i, label in enumerate(sets[::2], 1) if not label), None)
if empty:  # "a,,b": an empty entry is no set (it would run as the baseline)
    print(f"launch.sh: --methods: set {empty} is empty (two commas in a row, or one first); remove it", file=sys.stderr)
    sys.exit(2)
try:
    import methods, options
except ImportError:  # no torch here (a dry run before setup): train.py checks them
    sys.exit(0)
try:
    for label, flags in zip(sets[::2], sets[1::2]):
        specs = tuple(methods.selected(options.parse_args(flags.split() + plugins + extra))[0].specs)
        if specs in seen:
            name = "+".join(specs) or "baseline"
            raise methods.MethodError(f"sets {seen[specs]} and {label} are the same methods ({name}); give one")
        seen[specs] = label
except methods.MethodError as e:
    print(f"launch.sh: --methods: {e}", file=sys.stderr)
    sys.exit(2)' "$@"
}

launcher() {  # run_dir
  if [ "$GPUS" -gt 0 ]; then
    local rdzv=(--standalone)
    # every run its own rendezvous (the job's id + the run folder's checksum): a node that is a run ahead or
    # behind can never join another run's job and average its gradients with a run of another schedule
    [ "$NNODES" -gt 1 ] && rdzv=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV"
                                 --rdzv-id "${RDZV_ID:-sweep}-$(printf %s "$1" | cksum | cut -d' ' -f1)")
    # python -m torch.distributed.run: a venv that reuses the system's torch has no torchrun script of its own. Its
    # workers' grace between its SIGTERM and SIGKILL (30 s by default) as an environment variable: torch 2.14 reads
    # it, torch before --shutdown-timeout existed ignores it (the flag would fail there)
    echo "env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT $VENV/bin/python -m torch.distributed.run" \
         "${rdzv[*]} --nproc_per_node $GPUS --max-restarts ${MAX_RESTARTS:-0}"
  else
    echo "$VENV/bin/python"
  fi
}

wants_dry_run() { [ "$DRY" = 1 ] || [[ " $* " == *" --dry-run "* ]]; }  # the options given, or DRY=1

same_argv() {  # run_dir, then train.py's arguments: true when the run was asked for with exactly these, its
  # recipes and plug-ins unchanged (plan.py same_argv)
  PY plan.py same-argv "$@"
}

one_run() {  # run_dir, then train.py flags
  local dir=$1; shift
  local argv="--run-dir $dir --resume auto --no-progress $*"
  if [ -n "$RECORDS" ]; then printf '%s\t%s\n' "$dir" "$argv" >> "$RECORDS"; return 0; fi  # a plan's line
  # a finished run is skipped when it was asked for with these very flags; otherwise train.py compares its
  # result-defining options with the run's: equal, it says so and exits 0; different, it names them (exit 2)
  if [ -e "$dir/done" ] && same_argv "$dir" $argv; then echo "skip (done): $dir"; return 0; fi
  local cmd="$(launcher "$dir") train.py $argv"
  if [ "$DRY" = 1 ]; then echo "$cmd"; return 0; fi
  echo "+ $cmd"
  local rc=0 refusal; refusal=$(mktemp)
  # a signal to the sweep (SLURM's reaches every process of the step) is passed on and the run waited for: it
  # stops at a checkpoint (SLURM would kill what a step leaves behind once its task, this shell, has ended)
  TRAIN_REFUSAL_FILE=$refusal in_foreground $cmd || rc=$?
  # train.py writes the file when it refuses the options themselves (a bad value, a run of other options): every
  # run would be refused alike, so the sweep stops (torchrun exits 1 whatever the worker's code: hence a file).
  # Any other failure (a NaN, one damaged folder) is reported at the end, and the sweep goes on.
  if [ $rc != 0 ] && [ -s "$refusal" ]; then
    rm -f "$refusal"; echo "launch.sh: stopped: $dir: train.py refused the options (the reason above)" >&2; exit 2
  fi
  rm -f "$refusal"
  local sig=$SIGNALLED  # the sweep's own signal, else the run's stop at a checkpoint on one sent to it alone
  [ -n "$sig" ] || case $rc in 130) sig=INT;; 143) sig=TERM;; esac
  if [ -n "$sig" ]; then  # the sweep stops too: the job is ending, or someone stops it
    echo "launch.sh: stopped (SIG$sig, exit $rc; resumable from its last checkpoint): $dir" >&2
    STOPPED=$([ $sig = INT ] && echo 130 || echo 143); report_failures
  fi
  [ $rc = 0 ] || { echo "launch.sh: FAILED (exit $rc): $dir" >&2; FAILED+=("$dir"); }
  # several nodes: every node waits until the run's 'done' is visible on the shared folder before deciding what
  # to run (or skip) next, so that no node moves on a run ahead of the others
  if [ "$NNODES" -gt 1 ] && [ $rc = 0 ]; then
    local waited=0
    while [ ! -e "$dir/done" ] && [ $waited -lt "${LOCKSTEP_WAIT:-300}" ]; do sleep 2; waited=$((waited + 2)); done
    if [ ! -e "$dir/done" ]; then
      echo "launch.sh: FAILED: $dir: no 'done' visible here ${LOCKSTEP_WAIT:-300} s after the run (shared folder?)" >&2
      FAILED+=("$dir")
    fi
  fi
}

report() {  # the report of the runs under $1, into $1/report, with the options after $1 (printed under --dry-run)
  local dir=$1; shift
  if [ "$DRY" = 1 ]; then echo "$VENV/bin/python -m analysis.report $dir --out $dir/report${*:+ $*}"
  else PY -m analysis.report "$dir" --out "$dir/report" "$@"; fi
}

report_failures() {
  if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'launch.sh: %d run(s) failed, see their messages above:\n' "${#FAILED[@]}" >&2
    printf '  %s\n' "${FAILED[@]}" >&2
  fi
  if [ -n "$STOPPED" ]; then
    echo "launch.sh: stopped by a signal: no run was started after it; run the same command again to resume it" >&2
    exit $([ ${#FAILED[@]} -gt 0 ] && echo 1 || echo "$STOPPED")
  fi
  [ ${#FAILED[@]} -eq 0 ] && exit "${PLAN_RC:-0}"
  exit 1
}

in_foreground() {  # run the command "$@" (not a function: its subshell would take the signal), passing Ctrl-C and
  # SIGTERM on to it (bash alone would die and leave it running); SIGNALLED: the signal's name (INT, TERM) if one came
  local pid="" rc=0 got=""  # the trap first: a signal before it would kill bash and leave the child running
  trap 'got=INT; [ -z "$pid" ] || kill -TERM $pid 2>/dev/null' INT
  trap 'got=TERM; [ -z "$pid" ] || kill -TERM $pid 2>/dev/null' TERM
  "$@" & pid=$!
  [ -z "$got" ] || kill -TERM $pid 2>/dev/null  # it came before the child's pid was known
  wait $pid || rc=$?
  while kill -0 $pid 2>/dev/null; do rc=0; wait $pid || rc=$?; done  # wait returned for the signal: wait on
  trap - INT TERM
  SIGNALLED=$got
  return $rc
}

check_plan() {  # --plan, --parallel, --gpus, --nnodes, OMP_NUM_THREADS, TORCH_ELASTIC_SHUTDOWN_TIMEOUT: refused
  # before anything is written
  [ -n "$GPUS" ] || { GPUS=0; [ -z "$PLAN" ] || GPUS=1; }
  if [[ ! "$GPUS" =~ ^(0|[1-9][0-9]*)$ ]]; then
    echo "launch.sh: --gpus-per-run (or --gpus) takes the GPUs of each run (0 for the CPU, 1, 2, ...), got '$GPUS'" >&2
    exit 2
  fi
  SHUTDOWN_TIMEOUT=$(PY plan.py shutdown-timeout) || exit 2  # torchrun's grace for its workers' stop checkpoint
  if [[ ! "$NNODES" =~ ^[1-9][0-9]*$ ]]; then  # (the tests below would fail on it and go on as one node)
    echo "launch.sh: --nnodes (or NNODES) takes the number of nodes (1, 2, ...), got '$NNODES'" >&2; exit 2
  fi
  if [[ ! "${OMP_NUM_THREADS:-1}" =~ ^[1-9][0-9]*$ ]]; then  # (train.py and plan.py read it as a number)
    echo "launch.sh: OMP_NUM_THREADS='$OMP_NUM_THREADS' is no number of threads: set it to 1, 2, ... or unset it" >&2
    exit 2
  fi
  if [[ ! "$PARALLEL" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch.sh: --parallel takes the number of runs at once (1, 2, ...), got '$PARALLEL'" >&2; exit 2
  fi
  [ -n "$PLAN" ] || [ "$PARALLEL" -gt 1 ] || return 0
  if [ -n "$PLAN" ] && [ "$PARALLEL" -gt 1 ]; then
    echo "launch.sh: --plan writes the plan without running it: drop --parallel (then run it with run-plan)," \
         "or drop --plan" >&2; exit 2
  fi
  if [ "$NNODES" -gt 1 ]; then
    echo "launch.sh: --plan and --parallel run each run on one node; runs across nodes: slurm/sweep.sbatch" >&2; exit 2
  fi
  if [ "$PARALLEL" -gt 1 ] && [ "$DRY" != 1 ]; then PY plan.py check-parallel "$PARALLEL" "$GPUS" || exit 2; fi
}

set_runs() {  # seed, set, its train.py flags (methods, then the sweep's): RUNS, the set's runs of that seed in the
  # sweep's order, each 'run folder<TAB>train.py flags'
  local seed=$1 set=$2 flags=$3 sched e
  RUNS=()
  for sched in ${SCHEDULES//,/ }; do
    [ "$sched" = none ] && continue
    case "$sched" in
      cyclic|cyclic-decay|wsd|schedule-free) ;;
      *) echo "launch.sh: unknown schedule '$sched' in --schedules (cyclic, cyclic-decay, wsd, schedule-free)" >&2
         exit 2;;
    esac
    RUNS+=("$OUT/$set/s$seed/$sched"$'\t'"--schedule $sched --cycles $CYCLES --seed $seed $flags")
  done
  for e in $ends; do
    [ "$STANDARD" = 1 ] || break
    [ -z "$BUDGETS" ] || [[ " $BUDGETS " == *" $e "* ]] || continue
    RUNS+=("$OUT/$set/s$seed/standard-e$e"$'\t'"--schedule standard --epochs $e --seed $seed $flags")
  done
  if [ "$CONSTANT" = 1 ]; then
    local cycles=$(( (1 << CYCLES) - 1 )) flat=${flags/--t-mult $T_MULT/}  # (one period: no t_mult)
    RUNS+=("$OUT/$set/s$seed/constant"$'\t'"--schedule constant --cycles $cycles --seed $seed $flat")
  fi
}

compile_choice() {  # set, then the train.py flags of its first run: COMPILED, the set's --compile (on or off; empty
  # in a dry run that has none stored). OUT/compile, where there is one (a study's one choice: written by hand, or
  # by a sweep before choices were per set), holds for every set.
  local set=$1 file="$OUT/$1/compile" measured_on="" runs_on compiled=""; shift
  [ -s "$OUT/compile" ] && file="$OUT/compile"
  [ -s "$file" ] && { compiled=$(sed -n 1p "$file"); measured_on=$(sed -n 2p "$file"); }
  runs_on=$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)
  if [ "$DRY" != 1 ] && [ -n "$compiled" ] && [ -n "$measured_on" ]; then  # a choice holds on its kind of device
    if { [ -n "$PLAN" ] && [ "${measured_on%%:*}" != "$runs_on" ]; } \
       || { [ -z "$PLAN" ] && [ "$measured_on" != "$(device_here)" ]; }; then
      echo "launch.sh: $file holds --compile auto's choice measured on $measured_on, not the device the runs" \
           "train on; pass -- --compile on|off, or delete $file to measure again here" >&2; exit 2
    fi
  fi
  if [ -z "$compiled" ] && [ "$DRY" != 1 ]; then
    if [ "$NNODES" -gt 1 ]; then
      echo "launch.sh: --nnodes $NNODES: --compile auto would be measured on every node, which could choose" \
           "differently; pass -- --compile on|off, or resolve each method set's on one node first: mkdir -p" \
           "$OUT/$set && python train.py $* --print-compile $(( GPUS * NNODES )) | tail -n 1 > $OUT/$set/compile" >&2
      exit 2
    fi
    if [ -n "$PLAN" ] && [ "$GPUS" -gt 0 ] && [ "$(PY plan.py gpus)" = 0 ]; then
      echo "launch.sh: --plan: --compile auto would be decided here, on a machine without a GPU, for runs on" \
           "GPUs; pass -- --compile on|off explicitly, or write the plan on a GPU node" >&2; exit 2
    fi
    local slot=()  # --parallel N: measured with the environment and cores of one of the N runs at once
    [ "$PARALLEL" -gt 1 ] && read -ra slot < <(PY -c 'import sys, plan
env, cores = plan.slots(int(sys.argv[1]), int(sys.argv[2]))[0]
print(*[f"{k}={v}" for k, v in env.items()], *(["taskset", "-c", cores] if cores else []))' "$PARALLEL" "$GPUS")
    compiled=$(env "${slot[@]}" "$(py_bin)" train.py "$@" --print-compile "$(( GPUS > 0 ? GPUS * NNODES : 1 ))" \
               | tail -n 1) || true
    case "$compiled" in
      on|off) mkdir -p "$(dirname "$file")"
              printf '%s\n%s\n' "$compiled" "$(env "${slot[@]}" "$(py_bin)" -c "$DEVICE_HERE")" > "$file";;
    esac
  fi
  case "$compiled" in
    on|off) COMPILED=$compiled;;
    *) [ "$DRY" = 1 ] || { echo "launch.sh: could not resolve --compile auto for method set $set (train.py $*" \
                                "--print-compile)" >&2; exit 2; }
       COMPILED="";;
  esac
}

sweep() {
  parse_sweep "$@"
  check_plan
  if { [ -n "$PLAN" ] || [ "$PARALLEL" -gt 1 ]; } && [ "$DRY" != 1 ]; then
    RECORDS=$(mktemp); trap 'rm -f "$RECORDS"' EXIT
  fi
  # --t-mult goes to the standard runs too: they end on the step where the cyclic run of this shape ends a cycle
  local common="--data $DATA --model $MODEL --warmup-epochs $WARMUP --t0 $T0 --t-mult $T_MULT"
  common+=" ${DATA_DIR:+--data-dir $DATA_DIR} ${PLUGINS[*]:-} ${CONFIGS[*]:-} ${EXTRA[*]:-}"
  # a recipe's precision (the ViT's: fp32) holds unless the extra flags ask for one (auto included)
  if [ -n "$RECIPE_AMP" ] && [[ " ${EXTRA[*]:-} " != *" --amp "* && " ${EXTRA[*]:-} " != *" --amp="* ]]; then
    common+=" --amp $RECIPE_AMP"
  fi
  if [ -n "$RECIPE_COMPILE" ] && [[ " ${EXTRA[*]:-} " != *" --compile "* ]]; then
    common+=" --compile $RECIPE_COMPILE"
  fi
  if [ -n "$BUDGETS" ]; then  # each asked budget must be a cycle end (within 5 %): a typo plans nothing silently
    BUDGETS=$(PY -c 'import sys
ends = [float(e) for e in sys.argv[2].split()]
out = []
for b in sys.argv[1].replace(",", " ").split():
    near = [e for e in ends if abs(e - float(b)) <= 0.05 * e]
    if not near:
        sys.exit(f"launch.sh: --budgets {b} is no cycle end; the cycle ends are {sys.argv[2]}")
    out.append(f"{near[0]:.12g}")
print(" ".join(out))' "$BUDGETS" "$(PY -c "import schedules as s
print(*(f'{e:.12g}' for e in s.cycle_end_epochs($WARMUP, $T0, $T_MULT, $CYCLES)))")") || exit 2
  fi
  # --amp auto decides once per study: the first sweep into --out asks train.py (the baseline model, one process)
  # and keeps the answer in OUT/amp; every run of every later sweep into that folder gets the same precision
  if [[ " $common " != *" --amp "* && " $common " != *" --amp="* ]] || [[ " $common " == *" --amp auto "* ]]; then
    local amp=""
    [ -s "$OUT/amp" ] && amp=$(cat "$OUT/amp")
    if [ -z "$amp" ] && [ "$DRY" != 1 ]; then
      if [ -n "$PLAN" ] && [ "$GPUS" -gt 0 ] && [ "$(PY plan.py gpus)" = 0 ]; then
        echo "launch.sh: --plan: --amp auto would be decided here, on a machine without a GPU, for runs on GPUs:" \
             "pass --amp none|bf16|fp16 explicitly (-- --amp bf16), or write the plan on a GPU node" >&2; exit 2
      fi
      amp=$(PY train.py ${common/--amp auto/} --print-amp | tail -n 1) || true
      case "$amp" in none|bf16|fp16) mkdir -p "$OUT"; echo "$amp" > "$OUT/amp";; esac
    fi
    case "$amp" in
      none|bf16|fp16) common="${common/--amp auto/} --amp $amp";;
      *) [ "$DRY" = 1 ] || { echo "launch.sh: could not resolve --amp auto (train.py $common --print-amp)" >&2
                             exit 2; };;
    esac
  fi
  local ends
  ends=$(PY -c "import schedules as s
print(*(f'{e:.12g}' for e in s.cycle_end_epochs($WARMUP, $T0, $T_MULT, $CYCLES)))")
  local sets=() checks=() set
  if [[ "$METHODS" == *, ]]; then  # (the shell drops a last empty field: 'ls,' would pass as 'ls')
    echo "launch.sh: --methods '$METHODS' ends in a comma; remove it" >&2; exit 2
  fi
  mapfile -t sets < <(method_sets "$METHODS")
  for set in "${sets[@]}"; do checks+=("$set" "$(method_flags "$set")"); done
  local key="$METHODS|${CONFIGS[*]:-} ${EXTRA[*]:-}|${PLUGINS[*]:-}"  # a preset's sweeps of the same sets: checked once
  if [[ "$CHECKED" != *"<$key>"* ]]; then
    check_methods "${CONFIGS[*]:-} ${EXTRA[*]:-}" "${PLUGINS[*]:-}" "${checks[@]}"
    CHECKED+="<$key>"
  fi
  # --compile auto likewise (at the precision above), but once per method set: measured as the set's first run
  # trains (its methods and schedule; rank 0's share of the batch at the runs' world size; one --parallel slot's
  # cores), kept in OUT/SET/compile with the device it was measured on, and each of the set's runs, cyclic and
  # standard alike, asked for on or off by name (it also keeps torchrun runs, which refuse auto, measured)
  local -A set_common=()
  local seeds=()
  read -ra seeds <<<"$SEEDS"
  if [[ " $common " == *" --compile auto "* ]]; then
    for set in "${sets[@]}"; do
      set_runs "${seeds[0]:-0}" "$set" "$(method_flags "$set") $common"
      [ ${#RUNS[@]} -gt 0 ] || continue
      compile_choice "$set" ${RUNS[0]#*$'\t'}
      [ -z "$COMPILED" ] || set_common[$set]=${common/--compile auto/--compile $COMPILED}
    done
  fi
  local run
  for seed in $SEEDS; do
    for set in "${sets[@]}"; do
      set_runs "$seed" "$set" "$(method_flags "$set") ${set_common[$set]:-$common}"
      for run in "${RUNS[@]}"; do one_run "${run%%$'\t'*}" ${run#*$'\t'}; done
    done
  done
  if [ -n "$RECORDS" ]; then  # the plan, in the order above; --parallel runs it here and now
    local plan=${PLAN:-$OUT/parallel.plan} rc=0
    if [ -n "$PLAN" ]; then PY plan.py write "$plan" "$OUT" "$GPUS" "$SWEEP_COMMAND" < "$RECORDS"; return 0; fi
    PY plan.py write "$plan" "$OUT" "$GPUS" "$SWEEP_COMMAND" < "$RECORDS" > /dev/null
    in_foreground "$(py_bin)" plan.py parallel "$plan" "$PARALLEL" || rc=$?  # it names its failures
    [ $rc = 1 ] || [ $rc = 0 ] || exit $rc  # refused (2) or stopped by a signal: no report
    PLAN_RC=$rc
  fi
  [ "$REPORT" = 1 ] || return 0
  # several nodes: one report, by the first node (the others would write the same files at once)
  [ "${NODE_RANK:-${SLURM_NODEID:-0}}" = 0 ] || return 0
  report "$OUT"
}

fixed_design() {  # preset name: its design is its own; CONSTANT, STANDARD and BUDGETS exported in this shell (a
  # leftover of an earlier sweep) would add constant runs or drop standard ones unseen: ignored, and said
  local seen=()
  [ "$CONSTANT" = 0 ] || seen+=("CONSTANT=$CONSTANT")
  [ "$STANDARD" = 1 ] || seen+=("STANDARD=$STANDARD")
  [ -z "$BUDGETS" ] || seen+=("BUDGETS='$BUDGETS'")
  CONSTANT=0; STANDARD=1; BUDGETS=""
  [ ${#seen[@]} -eq 0 ] || echo "launch.sh: $1: ${seen[*]} from the environment ignored: a preset runs its own" \
                                "design (unset them)" >&2
}

case "${1:-}" in
  setup) setup;;
  test)
    setup
    # test-only packages (nbclient to execute the notebook)
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-test.txt
    # --fast: the everyday subset, without the tests marked slow (conftest.SLOW); CI runs them all
    shift; if [ "${1:-}" = --fast ]; then shift; set -- -m "not slow" "$@"; fi
    PY -m pytest -q --durations=15 tests "$@";;
  demo)
    fixed_design demo; setup
    # 20k of the 60k training images keep the whole demo at a few minutes on a 2-core CPU.
    sweep --out runs/demo --warmup 0.5 --t0 0.5 --cycles 3 -- --subset "${SUBSET:-20000}"
    echo "report: runs/demo/report/report.md (tradeoff figure: runs/demo/report/fig3_tradeoff.png)"
    report_failures;;
  sweep)
    shift; wants_dry_run "$@" || [ "${SKIP_SETUP:-0}" = 1 ] || setup
    SWEEP_COMMAND="./launch.sh sweep $(printf '%q ' "$@")"  # a plan's first line
    SWEEP_COMMAND=${SWEEP_COMMAND% }; sweep "$@"; report_failures;;
  run-plan) shift; in_foreground "$(py_bin)" plan.py run "$@";;
  report)
    # a plan: its runs folder's report, then the lines that did not finish (exit 1 if any; slurm/report.sbatch)
    shift; target=${1:-}; [ $# -gt 0 ] && shift
    if [ -f "$target" ]; then out=$(PY plan.py out "$target") || exit 2
    elif [ -d "$target" ]; then out=$target
    else echo "launch.sh: report takes a study's folder or a plan file, got '$target'" >&2; exit 2; fi
    rc=0; report "$out" "$@" || rc=$?  # a failed report still lists the unfinished lines (then exits non-zero)
    left=0; if [ -f "$target" ]; then PY plan.py unfinished "$target" || left=$?; fi
    exit $((rc ? rc : left));;
  repro)
    # The study (results/fashion-mnist/README.md): the full Fashion-MNIST training set (60k) and test set (10k),
    # the small ResNet, the default optimiser (SGDW lr 0.4, batch 256, momentum 0.9, wd 5e-4), --amp bf16 (the study's
    # precision, kept in results/fashion-mnist/amp for every sweep into it). Warmup = t0 = 0.5 epochs, t_mult 2,
    # 4 cycles: budgets 1, 2, 4, 8 epochs. All of it in recipes/fashion-mnist-study.yaml.
    # The paper's eight method sets x seeds 0 1 2 (REPRO_SEEDS); baseline, LS and MX also with the one-run
    # estimators. Order: the baseline's cyclic and standard curves for every seed first (the baseline's gap
    # and its CI), then its estimators, then seed by seed the other sets' cyclic and standard curves, so every
    # set gains a seed before any gains its next, then LS's and MX's estimators. Evaluations at the curve
    # points only; a checkpoint every minute, so a paused study loses < 1 minute. Runs go straight into
    # results/fashion-mnist (git keeps config.json, metrics.csv and done).
    shift; wants_dry_run "$@" && DRY=1
    if [[ " $* " == *" --plan "* || " $* " == *" --parallel "* ]]; then
      echo "launch.sh: repro is several sweeps in a fixed order; --plan and --parallel are for ./launch.sh sweep" \
           >&2
      exit 2
    fi
    fixed_design repro; [ "$DRY" = 1 ] || setup
    shape=(--out results/fashion-mnist --config recipes/fashion-mnist-study.yaml --no-report)
    seeds=${REPRO_SEEDS:-0 1 2}
    for seed in $seeds; do
      sweep "${shape[@]}" --seeds "$seed" --methods baseline --schedules cyclic "$@"
    done
    for seed in $seeds; do
      sweep "${shape[@]}" --seeds "$seed" --methods baseline --schedules cyclic-decay,wsd,schedule-free "$@"
    done
    for seed in $seeds; do
      sweep "${shape[@]}" --seeds "$seed" --methods ls,mx,bp,cl,bp+cl,ls+mx,bp+cl+ls+mx --schedules cyclic "$@"
    done
    for seed in $seeds; do
      sweep "${shape[@]}" --seeds "$seed" --methods ls,mx --schedules cyclic-decay,wsd,schedule-free "$@"
    done
    report "$OUT"  # results/fashion-mnist unless --out says otherwise
    report_failures;;
  vit-study)
    # Study 2 (results/vit-fmnist/README.md): a ViT where methods matter. recipes/vit-fmnist.yaml (the ViT recipe) with
    # recipes/vit-fmnist-study.yaml (10k images, no augmentation, batch 128, budgets 2-32 epochs). Method sets:
    # baseline, LS, MixUp, LS+MX, stochastic depth, EMA, CutMix; seeds 0 1 2 (STUDY_SEEDS); standard runs at every
    # budget and the cyclic, cyclic-decay and wsd estimators, seed by seed. --pilot: the pilot (baseline, LS, MX;
    # seeds 0 1; standard runs at 2, 16 and 32 epochs only), whose runs the study reuses. --more-seeds: seeds 3 and 4
    # of the baseline and the sets with large late gains (>= 1.5 pp over the baseline at 32 epochs on the standard
    # curve in each of seeds 0 and 1: MixUp, LS+MX, CutMix; chosen on the standard curve, not on the statistic
    # tested), with the cyclic estimator only (the primary test). --resnet: the convnet counterpart, the same
    # regime, sets and seeds with the small ResNet of the Fashion-MNIST study (its recipe, bf16, lr 0.4 scaled to
    # 0.2 for batch 128) into results/resnet-fmnist, with the cyclic and cyclic-decay estimators (wsd, the
    # costliest, left to the ViT).
    shift; pilot=0; model=vit; more=0
    for arg in "$@"; do
      case "$arg" in --pilot) pilot=1;; --resnet) model=resnet;; --more-seeds) more=1;; --dry-run) DRY=1;;
        *) echo "launch.sh: vit-study takes --pilot, --more-seeds, --resnet and --dry-run only (its design is fixed;" \
                "see results/vit-fmnist/README.md)" >&2
           exit 2;;
      esac
    done
    if [ "$more" = 1 ] && { [ "$pilot" = 1 ] || [ "$model" = resnet ]; }; then
      echo "launch.sh: vit-study --more-seeds adds seeds to the ViT study only: drop --pilot / --resnet" >&2; exit 2
    fi
    set --; fixed_design vit-study
    wants_dry_run "$@" && DRY=1; [ "$DRY" = 1 ] || [ "${SKIP_SETUP:-0}" = 1 ] || setup
    if [ "$model" = resnet ]; then
      out=results/resnet-fmnist
      shape=(--out "$out" --config recipes/fashion-mnist-study.yaml --config recipes/vit-fmnist-study.yaml
             --no-report)
      set -- -- --lr 0.2
    else
      out=results/vit-fmnist
      shape=(--out "$out" --config recipes/vit-fmnist.yaml --config recipes/vit-fmnist-study.yaml --no-report)
    fi
    if [ "$pilot" = 1 ]; then
      for seed in 0 1; do
        sweep "${shape[@]}" --seeds "$seed" --methods baseline,ls,mx --schedules none --budgets "2 16 32" "$@"
      done
    else
      estimators=cyclic,cyclic-decay,wsd sets=baseline,ls,mx,ls+mx,stochastic_depth,ema,cutmix seeds="0 1 2"
      [ "$model" = resnet ] && estimators=cyclic,cyclic-decay
      [ "$more" = 1 ] && estimators=cyclic sets=baseline,mx,ls+mx,cutmix seeds="3 4"
      for seed in ${STUDY_SEEDS:-$seeds}; do
        sweep "${shape[@]}" --seeds "$seed" --schedules "$estimators" --methods "$sets" "$@"
      done
    fi
    # --complete-seeds: each estimator compared over the seeds that have every run (seeds 3 and 4 of --more-seeds
    # have no cyclic-decay or wsd run, and would otherwise make those comparisons unpaired); the primary test over
    # every seed reads only the standard and cyclic runs, into $out/cyclic-all-seeds/{all,from4,late}
    report "$out" --complete-seeds
    if [ "$model" = vit ] && [ "$pilot" = 0 ]; then
      for view in all:0 from4:4 late:16; do  # the view's folder : its --min-epochs
        name=${view%:*} min=${view#*:}
        if [ "$DRY" = 1 ]; then  # the globs printed as such
          echo "$VENV/bin/python -m analysis.compare $out/*/s*/standard-e* $out/*/s*/cyclic --complete-seeds" \
               "--min-epochs $min --out $out/cyclic-all-seeds/$name"
        else PY -m analysis.compare "$out"/*/s*/standard-e* "$out"/*/s*/cyclic --complete-seeds --min-epochs "$min" \
                --out "$out/cyclic-all-seeds/$name" > /dev/null; fi
      done
    fi
    report_failures;;
  gpu-check)
    # Once on a CUDA machine, offline as GPU nodes often are: nothing is installed (the .venv's python if there is
    # one, else the system's python3 with its own torch). The CUDA-marked tests where pytest is present, then
    # gpu_check.py: bf16, fp16 and --compile training to a real accuracy, kill and resume, wsd and schedule-free,
    # the ImageFolder path, 2-rank NCCL evaluation (2+ GPUs), the benchmark; summary in runs/gpu-check/gpu-check.json.
    # Options go to gpu_check.py (--data-dir DIR where Debian's Fashion-MNIST package is absent). ~5-10 minutes.
    shift
    if PY -c "import pytest" 2>/dev/null; then PY -m pytest -q -m cuda tests || echo "launch.sh: CUDA tests FAILED" >&2
    else echo "launch.sh: pytest is not installed: the CUDA tests are skipped (gpu_check.py runs the checks)" >&2; fi
    PY gpu_check.py "$@";;
  *) sed -n '2,36p' "$0"; exit 2;;
esac
