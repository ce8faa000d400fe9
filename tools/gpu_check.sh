#!/usr/bin/env bash
# GPU truth in one call (issue 13): everything a GPU can tell deq-bench, in at most 8 minutes.
#
#     tools/gpu_check.sh --out DIR             # on a CUDA machine (python3 with a CUDA torch)
#     tools/gpu_check.sh --dry-run --out DIR   # the same steps on the CPU, small, in <= 3 minutes
#
# Needs no network and no package beyond what a CUDA image has (torch, transformers, pandas,
# matplotlib, nvidia-ml-py, pytest, pytest-benchmark, tqdm, setuptools): the project is installed
# with `pip install --no-deps --no-build-isolation -e .` and PIP_NO_INDEX=1.
#
# Steps, each with its own time budget (seconds on a GPU / in a dry run). A step may use the time
# that the steps before it left unused, never the time of the steps after it, so a slow step
# cannot eat the rest and the whole run ends within the sum (480 s / 180 s):
#   install       pip install --no-deps --no-build-isolation -e .                        20 / 20
#   env           deqbench env, nvidia-smi -q, pip list                                   15 / 12
#   validate      python -m bench.measure.validate_gpu: instruments.csv (CUDA context,
#                 reserved - allocated, NVML - reserved, predicted vs allocated)          45 / 20
#   gpu-validate  deqbench run --preset gpu-validate                                     140 / 25
#   baseline      deqbench baseline of it (and deqbench check against a committed one)    15 /  8
#   paper         deqbench run --preset paper, every GPU instrument                       90 / 15
#   explain       deqbench explain --preset paper-audit, where this tree has it           25 / 10
#   attention     seq-attention preset, T 2048-8192, plus one case sized past the GPU's
#                 memory (an OOM row; the cases after it run in fresh workers)            60 / 32
#   pytest        pytest -m gpu                                                           55 / 28
#   summary       summary.md (what ran, what failed, wall times, the measured tables)     15 / 10
#
# DIR receives at most four files (fit for a machine that returns 8): summary.md,
# gpu-check.tar.gz (results/reference/<device kind>/ and results/baselines/<device kind>.json:
# unpack it at the repository root), step-tails.txt (the end of every step's log) and steps.tsv.
# They are rewritten after every step, so a run killed from outside still returns what it did.
#
# Options: --steps a,b (a subset; summary always runs), --budget STEP=SECONDS (repeatable),
# --budget-scale F (every budget times F), --no-install. Environment: PYTHON (default python3),
# DEQBENCH (the deqbench command; default "$PYTHON -m bench"), DEQBENCH_GIT_SHA (the commit of
# this tree, recorded where git cannot tell, e.g. on a copy without .git).
# Exit 0: every step ran to its end (its checks may still have failed: see summary.md);
# 1: a step failed, was cut at its budget or had no time left; 2: bad input, nothing written.
set -uo pipefail

STEPS=(install env validate gpu-validate baseline paper explain attention pytest summary)
declare -A GPU_BUDGET=([install]=20 [env]=15 [validate]=45 [gpu-validate]=140 [baseline]=15
                       [paper]=90 [explain]=25 [attention]=60 [pytest]=55 [summary]=15)
declare -A DRY_BUDGET=([install]=20 [env]=12 [validate]=20 [gpu-validate]=25 [baseline]=8
                       [paper]=15 [explain]=10 [attention]=32 [pytest]=28 [summary]=10)
GRACE=5        # seconds between the INT that ends a step at its budget and the KILL
SKIPPED=99     # a step function's exit code for "skipped" (its reason in $SKIP_NOTE)
FOUND=98       # ... for "ran to its end, and its checks failed" (a finding, not a failure)

die() { echo "gpu_check: error: $*" >&2; exit 2; }
say() { echo "[gpu-check] $*"; }
usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# -- arguments (checked before anything is written) ------------------------------------------------
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
ARGS=("$@")
out="" dry=0 install=1 scale=1 only="" overrides=()
while (($#)); do
    case $1 in
        --out) (($# > 1)) || die "--out needs a directory"; out=$2; shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        --dry-run) dry=1; shift ;;
        --no-install) install=0; shift ;;
        --steps) (($# > 1)) || die "--steps needs a list, e.g. --steps env,validate"; only=$2; shift 2 ;;
        --steps=*) only=${1#--steps=}; shift ;;
        --budget) (($# > 1)) || die "--budget needs STEP=SECONDS"; overrides+=("$2"); shift 2 ;;
        --budget=*) overrides+=("${1#--budget=}"); shift ;;
        --budget-scale) (($# > 1)) || die "--budget-scale needs a number"; scale=$2; shift 2 ;;
        --budget-scale=*) scale=${1#--budget-scale=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see tools/gpu_check.sh --help)" ;;
    esac
done
known() { local s; for s in "${STEPS[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }
declare -A SELECTED=()
if [[ -n $only ]]; then
    IFS=, read -ra picked <<<"$only"
    for s in "${picked[@]}"; do
        known "$s" || die "unknown step '$s' in --steps; steps: ${STEPS[*]}"
        SELECTED[$s]=1
    done
else
    for s in "${STEPS[@]}"; do SELECTED[$s]=1; done
fi
SELECTED[summary]=1
[[ $scale =~ ^[0-9]*\.?[0-9]+$ ]] && awk -v s="$scale" 'BEGIN{exit !(s > 0)}' \
    || die "--budget-scale must be a positive number, got '$scale'"
declare -A OVERRIDE=()
for o in "${overrides[@]}"; do
    [[ $o =~ ^([a-z-]+)=([0-9]+)$ ]] || die "bad --budget '$o'; use STEP=SECONDS, e.g. --budget paper=120"
    known "${BASH_REMATCH[1]}" || die "unknown step '${BASH_REMATCH[1]}' in --budget; steps: ${STEPS[*]}"
    ((BASH_REMATCH[2] > 0)) || die "--budget $o: seconds must be positive"
    OVERRIDE[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done
command -v "$PY" >/dev/null || die "no python at '$PY'; set PYTHON to the interpreter that has torch"
for tool in timeout tar; do command -v $tool >/dev/null || die "'$tool' is not on PATH"; done
if [[ -z $out ]]; then
    out="$ROOT/results/runs/gpu-check-$(date +%Y%m%d-%H%M%S)"
elif [[ $out != /* ]]; then
    out="$PWD/$out"  # the steps run from the checkout's root
fi
if [[ -e $out && ! -d $out ]]; then die "--out $out exists and is not a directory"; fi
probe=$out
while [[ ! -e $probe ]]; do probe=$(dirname "$probe"); done
[[ -w $probe ]] || die "--out $out is not writable ($probe); choose another --out"

cd "$ROOT" || die "cannot enter $ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_DISABLE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # nothing may come from the network

# -- what this machine is -------------------------------------------------------------------------
MODE=gpu NOTE="" KIND=""
if ((dry)); then
    MODE=dry
else  # the GPU's kind names the folders: 'NVIDIA H200' -> nvidia-h200
    KIND=$("$PY" -c 'import torch
from bench.env import device_kind
print(device_kind("cuda") if torch.cuda.is_available() else "no-cuda")' 2>&1 | tail -n 1)
    [[ $KIND == no-cuda ]] && MODE=dry NOTE="no CUDA device here: the dry run on the CPU instead"
    [[ $KIND =~ ^[a-z0-9-]+$ ]] || die "$PY cannot name this GPU ($KIND); set PYTHON to the interpreter that has torch"
fi
if [[ $MODE == dry ]]; then
    export CUDA_VISIBLE_DEVICES=""  # every step on the CPU, even on a machine with a GPU
    export OMP_NUM_THREADS=1        # debug-sized tensors: more threads only contend
    DEVICE=cpu KIND=dry-run-cpu
else
    DEVICE=cuda
fi

mkdir -p "$out" || die "cannot create $out"
OUT_DIR=$(cd "$out" && pwd)
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || die "cannot make a staging directory"
trap 'rm -rf "$STAGE"' EXIT
R="$STAGE/results/reference/$KIND"          # what is committed as results/reference/<kind>/
BASELINE="$STAGE/results/baselines/$KIND.json"
mkdir -p "$R/logs" "$STAGE/results/baselines"
STEPS_TSV="$R/steps.tsv"
printf 'step\tname\tstatus\trc\twall_s\tbudget_s\tlog\tnote\n' >"$STEPS_TSV"
SKIP_NOTE="$STAGE/skip-note"
export ROOT PY MODE DEVICE KIND R BASELINE SKIP_NOTE SKIPPED FOUND

deqbench() { ${DEQBENCH:-$PY -m bench} "$@"; }
skip() { echo "$*" >"$SKIP_NOTE"; echo "skipped: $*"; exit "$SKIPPED"; }
findings() {  # exit code 1 of a checker means it ran and found something: report, not fail
    local rc=$1
    if ((rc == 1)); then echo "(exit 1: checks failed, see above)"; return "$FOUND"; fi
    return "$rc"
}
export -f deqbench skip findings

# -- the steps (each runs as `bash -c step_<name>` under its budget) --------------------------------
step_install() {
    "$PY" -m pip install --no-deps --no-build-isolation -e "$ROOT" || return
    "$PY" -c 'import importlib.metadata as m, bench
print("deq-bench", m.version("deq-bench"), "imported from", bench.__file__)'
}

step_env() {
    mkdir -p "$R/env"
    deqbench env --device "$DEVICE" >"$R/env/deqbench-env.json" || return
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -q >"$R/env/nvidia-smi-q.txt" 2>&1 || echo "nvidia-smi -q exited with $?"
    else
        echo "nvidia-smi is not on PATH on $(hostname) (a CPU-only machine)" >"$R/env/nvidia-smi-q.txt"
    fi
    "$PY" -m pip list --format=freeze >"$R/env/pip-freeze.txt" 2>&1 || true
    cat "$R/env/deqbench-env.json"
}

step_validate() {
    local args=(--device cuda)
    [[ $MODE == dry ]] && args=(--device cpu --models transformer --batch 2 --seq-len 16 --repeats 2)
    "$PY" -m bench.measure.validate_gpu --out "$R/instruments" "${args[@]}"
    findings $?  # 1: a prediction missed torch_cuda by more than the tolerance
}

step_gpu_validate() {
    local args=(--device cuda --instruments torch_cuda,tracked,predicted,flops,timing)
    [[ $MODE == dry ]] && args=(--device cpu --threads 1 --only trellisnet/debug/core/eval/T128/B4/L16)
    deqbench run --preset gpu-validate --out "$R/gpu-validate" --no-progress --no-report "${args[@]}"
}

step_baseline() {
    [[ -f $R/gpu-validate/results.csv ]] || skip "no gpu-validate run to make it from"
    deqbench baseline "$R/gpu-validate" -o "$BASELINE" || return
    local committed="$ROOT/results/baselines/$KIND.json"
    if [[ -f $committed ]]; then
        deqbench check "$R/gpu-validate" --baseline "$committed" >"$R/gpu-validate/check.txt"
        local rc=$?
        cat "$R/gpu-validate/check.txt"
        findings $rc  # 1: regressions against the committed baseline
    else
        echo "no results/baselines/$KIND.json in this tree: this is the first baseline of $KIND"
    fi
}

step_paper() {
    local nvml=nvml  # every GPU instrument; NVML only where the env step found it (a run refuses
    # an instrument the device cannot run)
    if [[ -f $R/env/deqbench-env.json ]] && ! "$PY" -c 'import json, sys
sys.exit(not json.load(open(sys.argv[1]))["nvml"]["available"])' "$R/env/deqbench-env.json"; then
        nvml="" && echo "NVML is unavailable here (env/deqbench-env.json): measuring without it"
    fi
    local args=(--device cuda --instruments "torch_cuda,${nvml:+$nvml,}tracked,predicted,timing")
    [[ $MODE == dry ]] && args=(--device cpu --threads 1 --instruments predicted
                                --only transformer/paper-small/core/train/T150/B15/L4)
    deqbench run --preset paper --out "$R/paper" --no-progress --no-report "${args[@]}"
}

step_explain() {
    local help args=(explain --out "$R/paper-audit")
    help=$(deqbench explain --help 2>&1) || skip "this tree has no deqbench explain (${help##*$'\n'})"
    [[ -f $ROOT/bench/presets/paper-audit.toml ]] && args+=(--preset paper-audit)
    [[ $help == *--no-progress* ]] && args+=(--no-progress)
    [[ $help == *--device* ]] && args+=(--device "$DEVICE")
    echo "deqbench ${args[*]}"
    deqbench "${args[@]}"
}

step_attention() {
    local matrix="$R/seq-attention/matrix.toml"
    mkdir -p "$R/seq-attention"
    if [[ $MODE == dry ]]; then  # an oom under the address-space limit instead of the GPU's memory
        "$PY" tools/gpu_check.py matrix --preset seq-attention --sizes debug --seq-lens 32 \
            --oom-above 2000000000 --out "$matrix" || return
        deqbench run --matrix "$matrix" --out "$R/seq-attention" --no-progress --no-report \
            --device cpu --threads 1 --memory-limit 2GB
    else
        "$PY" tools/gpu_check.py matrix --preset seq-attention --seq-lens 2048,4096,8192 \
            --oom-above cuda --out "$matrix" || return
        deqbench run --matrix "$matrix" --out "$R/seq-attention" --no-progress --no-report \
            --device cuda --instruments torch_cuda,tracked,predicted,timing
    fi
}

step_pytest() {
    mkdir -p "$R/pytest-gpu"
    # the GPU tests compare in-process torch_cuda numbers with this run's fresh-worker baseline
    [[ -f $BASELINE ]] && export DEQBENCH_GPU_BASELINE="$BASELINE"
    # the modules that hold GPU tests, cheap ones first: a run cut at its budget loses the
    # memory-regression cases (the longest) rather than the models' CUDA-vs-CPU checks
    local files
    mapfile -t files < <(grep -rlE --include='test_*.py' 'mark\.gpu' tests | sort |
                         awk '/test_memory_regression/ {last = last $0 "\n"; next} {print} END {printf "%s", last}')
    ((${#files[@]})) || files=(tests)
    "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider --continue-on-collection-errors \
        --junitxml="$R/pytest-gpu/junit.xml" "${files[@]}"
    findings $?  # 1: tests failed (or modules failed to import)
}

step_summary() {
    "$PY" tools/gpu_check.py summary --tree "$R" --out "$R/summary.md" --mode "$MODE" \
        --budget-total "$TOTAL_BUDGET" --command "$COMMAND" --note "$NOTE"
}
export -f step_install step_env step_validate step_gpu_validate step_baseline step_paper \
    step_explain step_attention step_pytest step_summary

# -- scheduling, logs and packing -----------------------------------------------------------------
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
budget_of() {  # seconds, after overrides and the scale
    local b=${OVERRIDE[$1]:-}
    if [[ -z $b ]]; then
        if [[ $MODE == dry ]]; then b=${DRY_BUDGET[$1]}; else b=${GPU_BUDGET[$1]}; fi
    fi
    awk -v b="$b" -v s="$scale" 'BEGIN{printf "%d", b * s + 0.5}'
}

tails() {
    local log
    for log in "$R"/logs/*.log; do
        [[ -f $log ]] || continue
        echo "===== $(basename "$log") ====="
        tail -n 30 "$log"
        echo
    done
}

pack() {
    cp "$STEPS_TSV" "$OUT_DIR/steps.tsv"
    tails >"$OUT_DIR/step-tails.txt"
    tar -czf "$OUT_DIR/.gpu-check.tar.gz.part" -C "$STAGE" results &&
        mv -f "$OUT_DIR/.gpu-check.tar.gz.part" "$OUT_DIR/gpu-check.tar.gz"
}

plain_summary() {  # what summary.md says if the summary step itself cannot run
    {
        echo "# GPU check ($KIND, $MODE): steps"
        echo
        echo "The summary step did not finish; the step table below is all there is (logs in step-tails.txt)."
        echo
        echo '| step | name | status | rc | wall s | budget s | log | note |'
        echo '|---|---|---|---|---|---|---|---|'
        tail -n +2 "$STEPS_TSV" | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
    } >"$R/summary.md"
}

T0=$(now_ms) PLANNED=0 TOTAL_BUDGET=0 INCOMPLETE=0 N=0
for s in "${STEPS[@]}"; do [[ -n ${SELECTED[$s]:-} ]] && TOTAL_BUDGET=$((TOTAL_BUDGET + $(budget_of "$s"))); done
COMMAND="tools/gpu_check.sh ${ARGS[*]}"
[[ -n ${DEQBENCH_GIT_SHA:-} ]] && COMMAND+=" (tree ${DEQBENCH_GIT_SHA})"
export TOTAL_BUDGET COMMAND NOTE

run_step() {
    local name=$1 budget log rc status note="" start wall left
    N=$((N + 1))
    [[ -n ${SELECTED[$name]:-} ]] || return 0
    budget=$(budget_of "$name")
    PLANNED=$((PLANNED + budget * 1000))
    log="$R/logs/$(printf %02d "$N")-$name.log"
    left=$(((PLANNED - ($(now_ms) - T0)) / 1000 - GRACE))
    [[ $name == summary ]] && ((left < 3)) && left=3  # what the session brings back: always
    if [[ $name == install && $install == 0 ]]; then
        rc=$SKIPPED wall=0 status=skipped note="--no-install"
        echo "skipped: --no-install" >"$log"
    elif ((left < 3)); then
        rc="" wall=0 status="no time left" note="the steps before it used its budget"
        echo "not run: no time left of its budget" >"$log"
        INCOMPLETE=1
    else
        say "$name: up to ${left} s (budget ${budget} s) -> logs/$(basename "$log")"
        rm -f "$SKIP_NOTE"
        start=$(now_ms)
        timeout -s INT -k "$GRACE" "$left" bash -c "step_${name//-/_}" >"$log" 2>&1
        rc=$?
        wall=$(awk -v ms=$(($(now_ms) - start)) 'BEGIN{printf "%.1f", ms / 1000}')
        case $rc in
            0) status=ok ;;
            124) status="cut at budget"; INCOMPLETE=1 ;;
            137) status="killed at budget"; INCOMPLETE=1 ;;
            "$SKIPPED") status=skipped; note=$(cat "$SKIP_NOTE" 2>/dev/null) ;;
            "$FOUND") status="checks failed" ;;
            *) status="exit $rc"; INCOMPLETE=1 ;;
        esac
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$N" "$name" "$status" "$rc" "$wall" "$budget" \
        "logs/$(basename "$log")" "${note//$'\t'/ }" >>"$STEPS_TSV"
    say "$name: $status${rc:+ (rc $rc)} in ${wall} s${note:+: $note}"
    pack
}

say "$MODE run on $KIND${NOTE:+ ($NOTE)}: $OUT_DIR, at most $TOTAL_BUDGET s"
for s in "${STEPS[@]}"; do
    [[ $s == summary ]] && plain_summary
    run_step "$s"
done
[[ -s $R/summary.md ]] || plain_summary
cp "$R/summary.md" "$OUT_DIR/summary.md"
pack
say "done in $(( ($(now_ms) - T0) / 1000 )) s: $OUT_DIR/{summary.md,gpu-check.tar.gz,step-tails.txt,steps.tsv}"
cat "$OUT_DIR/summary.md"
exit "$INCOMPLETE"
