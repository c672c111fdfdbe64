#!/usr/bin/env bash
# One call that checks the GPU path end to end, within its own time budget (docs/gpu.md).
#
#   scripts/gpu_check.sh                 on a GPU machine (installs .whl/*.whl first: fill it with `make gpu-wheels`)
#   scripts/gpu_check.sh --cpu           the same steps on CPU at tiny shapes (how the script itself is tested)
#   options: --budget SECONDS (default 540 on a GPU, 1800 with --cpu), --skip STEP[,STEP…]
#
# Steps, in order; a step that would start with less time left than it needs is skipped, and a running step is
# stopped (SIGTERM, then SIGKILL 20 s later) at the budget, so the report is always written:
#   setup         GPU: install .whl/*.whl into a scratch site dir (no registry); --cpu: the same install for Python
#                 3.12 manylinux into a scratch dir, to prove the wheels are complete and install offline
#   model         the demo recipe's model: its own weights where the package is installed, else a random-initialised
#                 model of Gemma 3 270M's shape (--cpu: its 2-layer twin) with a tokenizer trained on the demo data
#   doctor        adapters doctor on the demo recipe as the train step runs it
#   train         make train on the demo recipe with NF4 and bf16, eval included
#   merge         make merge of that run (verified merge)
#   fsdp          5 steps under ACCELERATE_CONFIG=fsdp2-qlora (guard off: preflight refuses it under FSDP), the
#                 adapter validated and loaded in plain PEFT
#   bench         make bench ARGS="--model llama-3.2-1b" (fixed and ragged; --cpu: the CPU default tiny-llama)
#   bench_recipe  adapters bench --recipe gemma3-270m-demo (on the model of the model step)
#
# Results: $OUT (or outputs/gpu_check/): gpu_check.json plus one log per step group (7 files: the device tool
# brings back at most 8). Bulky outputs (runs, models) go to $GPU_CHECK_WORK (default outputs/gpu_check_work/).
# Exit status 0 when every step that ran passed.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
MODE=gpu
BUDGET=""
SKIP=","
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --budget) BUDGET="$2"; shift ;;
        --skip) SKIP=",$2,"; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$BUDGET" ] || { [ "$MODE" = cpu ] && BUDGET=1800 || BUDGET=540; }
RES="${OUT:-$REPO/outputs/gpu_check}"
WORK="${GPU_CHECK_WORK:-$REPO/outputs/gpu_check_work}"
RESERVE=15  # seconds kept for the report
START=$(date +%s)
rm -rf "$WORK"
mkdir -p "$RES" "$WORK/runs"
rm -f "$RES"/*.log "$RES/gpu_check.json"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1

if [ "$MODE" = gpu ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check.sh: no nvidia-smi here; on a machine without a GPU run scripts/gpu_check.sh --cpu" >&2
    exit 2
fi

# One JSON line per step in $WORK/steps.jsonl; the report step gathers them with the steps' own outputs.
record() {  # NAME STATUS RC SECONDS LOG NOTE
    printf '{"name": "%s", "status": "%s", "rc": %s, "seconds": %s, "log": "%s", "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "${6//\"/\'}" >> "$WORK/steps.jsonl"
    printf '[gpu_check] %-13s %-8s %6ss  %s\n' "$1" "$2" "$4" "$6"
}

step() {  # NAME LOG CAP_S MIN_S COMMAND: run COMMAND (bash) under what is left of the budget, at most CAP_S
    local name=$1 log="$RES/$2.log" cap=$3 min=$4 cmd=$5
    if [[ "$SKIP" == *",$name,"* ]]; then record "$name" skipped 0 0 "$2.log" "--skip"; return 1; fi
    local left=$((START + BUDGET - RESERVE - $(date +%s)))
    if [ "$left" -lt "$min" ]; then
        record "$name" skipped 0 0 "$2.log" "budget: ${left}s left, the step needs ~${min}s"
        return 1
    fi
    [ "$cap" -lt "$left" ] || cap=$left
    { echo "### $name ($(date -u +%FT%TZ), limit ${cap}s)"; echo "\$ $cmd"; } >> "$log"
    local t0 rc status note=""
    t0=$(date +%s.%N)
    timeout --signal=TERM --kill-after=20 "$cap" bash -c "$cmd" >> "$log" 2>&1
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; note="stopped at ${cap}s (budget)" ;;
        *) status=failed; note="exit $rc: $(grep -E 'rror|Traceback|FAIL' "$log" | tail -1 | cut -c1-200 | tr -d '\\')" ;;
    esac
    record "$name" "$status" "$rc" "$secs" "$2.log" "$note"
    [ "$status" = ok ]
}

# The commands: the project's venv where there is one (here), else python3 with the project on PYTHONPATH (a GPU
# machine gets the working tree, not .venv).
if [ -x "$REPO/.venv/bin/adapters" ]; then
    BIN="$REPO/.venv/bin"
else
    BIN="$WORK/bin"
    mkdir -p "$BIN"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    printf '#!/bin/sh\nexec python3 "$@"\n' > "$BIN/python"
    printf '#!/bin/sh\nexec python3 -m adapters "$@"\n' > "$BIN/adapters"
    printf '#!/bin/sh\nexec python3 -m accelerate.commands.accelerate_cli "$@"\n' > "$BIN/accelerate"
    chmod +x "$BIN"/*
fi
PY="$BIN/python"

WHEELS=$(ls .whl/*.whl 2>/dev/null | tr '\n' ' ')
SITE="$WORK/site"
if [ "$MODE" = gpu ]; then
    # The GPU machine's python3 holds torch; the wheels go into a scratch dir ahead of its own packages.
    SETUP="test -n '$WHEELS' || { echo 'no .whl/*.whl: run make gpu-wheels before the call and carry .whl'; exit 1; };
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target '$SITE' $WHEELS &&
ls '$SITE'"
else
    # Here: the same offline install, for the GPU machine's Python 3.12 / manylinux, into a dir that is not used.
    PLAT=""
    for n in 17 24 27 28 31 34 35; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
    SETUP="if [ -z '$WHEELS' ]; then echo 'no .whl/*.whl (make gpu-wheels): the install is not checked'; exit 0; fi;
'$PY' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target '$WORK/site-gpu' \
  --only-binary=:all: --python-version 3.12 --implementation cp $PLAT --platform manylinux2014_x86_64 $WHEELS &&
for m in trl datasets bitsandbytes liger_kernel; do test -d '$WORK/site-gpu'/\$m || { echo \"missing \$m\"; exit 1; }; done &&
echo 'installed for Python 3.12 manylinux, offline:' && ls '$WORK/site-gpu'"
fi
step setup setup 180 10 "$SETUP"
[ "$MODE" = gpu ] && export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"


TINY=""; [ "$MODE" = cpu ] && TINY="--tiny"
MODEL=""
step model setup 240 20 "HF_HUB_OFFLINE=1 '$PY' -m adapters.planning.gpu_check model '$WORK/model' $TINY" &&
    MODEL=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['model'])" "$WORK/model.json")
MODEL="${MODEL:-$WORK/model}"

RECIPE=gemma3-270m-demo
NF4="--model_name_or_path $MODEL --load_in_8bit false --load_in_4bit true --bnb_4bit_quant_type nf4 \
--bnb_4bit_use_double_quant true --dtype bfloat16 --bnb_4bit_compute_dtype bfloat16 --bf16 true"
if [ "$MODE" = cpu ]; then
    head -n 8 data/demo/test.jsonl > "$WORK/test.jsonl"  # the held-out rows that eval and the merge check generate
    head -n 16 data/demo/val.jsonl > "$WORK/val.jsonl"
    SMALL="--max_steps 4 --per_device_train_batch_size 4 --eval_steps 2 --save_steps 2 --eval_limit 4 \
--logging_steps 1 --forgetting_probe_tokens 256 --test_file $WORK/test.jsonl --eval_file $WORK/val.jsonl"
    BENCH_ARGS="--out $WORK/bench"
    RBENCH="--steps 2 --warmup 1 --per_device_train_batch_size 4"  # (a --max_length below the rows' length would
    # fail the loss gate: TRL truncates the long rows, our data stage drops them)
    DOCTOR_EXTRA="--compile-timeout 0"  # a first inductor compile takes a minute on 2 CPU cores: doctor's own tests
else
    SMALL=""
    BENCH_ARGS="--model llama-3.2-1b --out $WORK/bench"
    RBENCH=""
    DOCTOR_EXTRA=""
fi

step doctor doctor 180 30 "'$BIN/adapters' doctor $RECIPE $NF4 --out '$WORK/doctor.json' --output-root '$WORK/runs' $DOCTOR_EXTRA"

export HF_HUB_OFFLINE=1  # nothing below needs the hub; on the GPU machine nothing outside can be reached
MK="make --no-print-directory BIN=$BIN"
if [ -n "${GPU_CHECK_NO_MAKE:-}" ] || ! command -v make >/dev/null 2>&1; then
    # No make on this machine: the four targets used below, as the Makefile runs them.
    MK="$WORK/make"
    cat > "$MK" <<'MAKE'
#!/usr/bin/env bash
for a in "$@"; do case "$a" in *=*) export "${a%%=*}=${a#*=}" ;; *) target=$a ;; esac; done
case $target in
    train)
        if [ -z "${ACCELERATE_CONFIG:-}" ] && [ "${NPROC:-1}" = 1 ]; then exec "$BIN/adapters" train "$RECIPE" $ARGS; fi
        exec "$BIN/accelerate" launch --num_processes "${NPROC:-1}" \
            --config_file "adapters/accelerate_configs/${ACCELERATE_CONFIG%.yaml}.yaml" -m adapters train "$RECIPE" $ARGS ;;
    merge) exec "$BIN/adapters" merge "$RUN" $ARGS ;;
    bench) exec "$BIN/adapters" bench $ARGS ;;
    *) echo "make stand-in: no target $target" >&2; exit 2 ;;
esac
MAKE
    chmod +x "$MK"
    MK="$MK BIN=$BIN"
fi
if step train train 300 60 "$MK train RECIPE=$RECIPE ARGS=\"$NF4 $SMALL --output_root $WORK/runs --run_name train\""; then
    step merge train 300 30 "$MK merge RUN=$WORK/runs/train"
else
    record merge skipped 0 0 train.log "the train step did not pass"
fi

EXPECT=""; [ "$MODE" = gpu ] && EXPECT="--expect-sharding fsdp"
step fsdp fsdp 240 60 "$MK train RECIPE=$RECIPE NPROC=1 ACCELERATE_CONFIG=fsdp2-qlora ARGS=\"$NF4 $SMALL \
--bnb_4bit_quant_storage bfloat16 --base_kl_weight 0 --max_steps 5 --save_steps 5 --eval_strategy no \
--eval_after_train false --output_root $WORK/runs --run_name fsdp\" && \
'$PY' -m adapters.planning.gpu_check validate '$WORK/runs/fsdp' '$WORK/fsdp_validate.json' $EXPECT"

step bench bench 300 60 "$MK bench ARGS=\"$BENCH_ARGS\""
step bench_recipe bench_recipe 300 60 "'$BIN/adapters' bench --recipe $RECIPE --model_name_or_path '$MODEL' \
--out '$WORK/bench_recipe' $RBENCH"

if ! "$PY" -m adapters.planning.gpu_check report "$WORK" "$RES/gpu_check.json" --mode "$MODE" --budget "$BUDGET"; then
    [ -s "$RES/gpu_check.json" ] && exit 1
    # the report could not be written by Python: the steps alone, as JSON
    { echo '{"mode": "'"$MODE"'", "passed": false, "steps": ['; paste -sd, "$WORK/steps.jsonl"; echo ']}'; } \
        > "$RES/gpu_check.json"
    exit 1
fi
