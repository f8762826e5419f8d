#!/usr/bin/env bash
# The one prepared GPU check for a single H100/H200, at most 9 min 15 s in all, then one summary block to paste:
#   1. the tests that matter on a GPU, each run whatever the others did (no -x), within 210 s: the GPU-only tests
#      first (tests/test_cuda*.py, and any test elsewhere whose skip condition's reason names a GPU or CUDA, such as
#      tests/test_hot_path.py's pinned batches), then tests/test_model.py and tests/test_plan.py,
#   2. bench/throughput.py (steps of 4 micro-batches, its default): `small` and `1.3b` in bf16, eager and --compile;
#      1.3b with recomputation; yuan-4.7b at tp 1 without recomputation at the largest micro-batch that fits (4, 2
#      or 1: the largest plan.py says fits this card first, the next smaller after an OOM row); plan.py's memory
#      estimate beside each measured peak, and tools/roofline.py's projection of every timed setting beside it,
#   3. bench/vs_plain.py on the GPU (nanoyuan's step against plain PyTorch, `small`, bf16),
#   4. the data benchmark (bench/data_bench.py) on all of the machine's cores,
# writing device.txt, tests.txt (+ tests.xml), throughput.txt (+ throughput.jsonl, bench_stderr.txt), roofline.txt,
# vs_plain.txt, data_bench.txt and summary.txt to $OUT (default out/gpu_check). Each step has its own time limit,
# and every limit after the tests is also cut to what is left of the 9 min 15 s, keeping the last 75 s for steps 3
# and 4, so the whole never runs longer. A step stopped by its limit reads "timeout" in the summary. Uses the
# machine's own python3 and torch (PY=... for another); with no MPI library everything is one process.
#   device tool:  bash bench/gpu_check.sh        (then copy the summary into bench/RESULTS.md with the card)
#   dry run:      ONLY=tests PY=.venv/bin/python bash bench/gpu_check.sh   (step 1 and the summary alone; on a CPU
#                 the GPU-only tests skip)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PY:-python3}
ONLY=${ONLY:-}  # one step's name (tests, throughput, vs_plain, data_bench): that step alone
TEST_LIMIT=${TEST_LIMIT:-210}  # seconds for step 1 (on a shared 2-core CPU, the GPU tests skipped: 26 to 116 s)
WORK=$(mktemp -d)
END=$((SECONDS + 555))  # 9 min 15 s from here: with the summary, well inside 10 minutes
mkdir -p "$OUT"
SUMMARY=()  # one line per step: the step, pass / fail / timeout / skipped, its key figures
said() { SUMMARY+=("$(printf '%-11s %s' "$1" "$2")"); }  # STEP TEXT
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }  # STEP: whether to run it

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)  # MiB
case "$GPU" in *H200*) ROOF_GPU=H200 ;; *H100*) ROOF_GPU=H100 ;; *) ROOF_GPU= ;; esac  # tools/roofline.py's names
said device "${GPU:-no GPU (nvidia-smi saw none)}; $($PY -c "import torch; print('torch', torch.__version__)" 2>&1 |
  tail -1); $(nproc) cores"
said commit "$(git describe --always --dirty 2>/dev/null || echo "not a git checkout")"

# 1. The tests. pytest.main with SELECT_TESTS as a plugin picks the tests from tests/; a collection error in one
# file does not stop the others. At TEST_LIMIT, timeout sends SIGTERM, which stops pytest as Ctrl-C would: it still
# prints its summary line and writes tests.xml (a subprocess it started gets the signal too); 20 s later a pytest
# that has not stopped is killed, and the summary says there is no pytest summary.
SELECT_TESTS=$(cat <<'PYTHON'
import signal
import sys

import pytest

def gpu_only(item):
    reasons = " ".join(str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))
    return item.path.name.startswith("test_cuda") or "GPU" in reasons or "CUDA" in reasons

class Select:
    def pytest_collection_modifyitems(self, config, items):
        gpu = [i for i in items if gpu_only(i)]
        rest = [i for i in items if not gpu_only(i) and i.path.name in ("test_model.py", "test_plan.py")]
        kept = {id(i) for i in gpu + rest}
        config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept])
        items[:] = gpu + rest

def stop(signum, frame):
    raise KeyboardInterrupt("bench/gpu_check.sh's time limit")

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the shell started us with SIGINT ignored
sys.exit(pytest.main(sys.argv[1:], plugins=[Select()]))
PYTHON
)
if want tests; then
  echo "== 1. tests (at most $TEST_LIMIT s; the log: $OUT/tests.txt)"
  timeout -k 20 "$TEST_LIMIT" $PY -c "$SELECT_TESTS" -q -rfEs --durations=10 -p no:cacheprovider \
    --continue-on-collection-errors --junitxml "$OUT/tests.xml" tests > "$OUT/tests.txt" 2>&1
  rc=$?
  line=$(grep -E "(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s" "$OUT/tests.txt" | tail -1 |
         sed -E 's/^=+ //; s/ =+$//')
  line=${line:-"no pytest summary line (see $OUT/tests.txt)"}
  grep -E "^(FAILED|ERROR) " "$OUT/tests.txt"
  case $rc in
    0) said tests "pass     $line" ;;
    124) said tests "timeout  stopped at the $TEST_LIMIT s limit: $line" ;;
    137) said tests "timeout  killed 20 s after the $TEST_LIMIT s limit: $line" ;;
    1) said tests "FAIL     $line: $(grep -cE '^(FAILED|ERROR) ' "$OUT/tests.txt") listed in tests.txt" ;;
    *) said tests "FAIL     pytest exit $rc: $line" ;;
  esac
  echo "${SUMMARY[-1]}"
fi

limit() {  # SECONDS: the smaller of SECONDS and what is left before the last 75 s
  local left=$((END - 75 - SECONDS))
  echo $(( $1 < left ? $1 : left ))
}

ROWS=0  # rows of throughput.jsonl already handed to tools/roofline.py
ROW_ARGS=$(cat <<'PYTHON'
import json, sys
FLAGS = [("preset", "preset"), ("tp", "tp"), ("dp", "dp"), ("dtype", "dtype"), ("recompute", "recompute"),
         ("sequence_parallel", "sp"), ("zero1", "zero1"), ("compile", "compile"), ("micro_batch", "micro_batch"),
         ("seq_len", "seq_len"), ("accum", "accum")]  # roofline.py's option, the row's key
for line in sys.stdin:
    row = json.loads(line)
    print(" ".join(f"--{flag} {row[key]}" for flag, key in FLAGS))
PYTHON
)
project() {  # tools/roofline.py's projection of every row bench() just added (where another engineer's roofline.py
  # is there): on the CPU, in the background, one thread, so that it barely touches the measurement; each grid's
  # projections into their own file, joined in order into roofline.txt at the end
  local n
  n=$(wc -l < "$OUT/throughput.jsonl")
  if [ -f tools/roofline.py ] && [ -n "$ROOF_GPU" ] && [ "$n" -gt "$ROWS" ]; then
    sed -n "$((ROWS + 1)),${n}p" "$OUT/throughput.jsonl" | $PY -c "$ROW_ARGS" > "$WORK/args.$ROWS"
    while read -r args; do
      echo "== tools/roofline.py --gpu $ROOF_GPU $args --json"
      OMP_NUM_THREADS=1 timeout 60 $PY tools/roofline.py --gpu "$ROOF_GPU" $args --json
    done < "$WORK/args.$ROWS" > "$WORK/roofline.$(printf %04d "$ROWS")" 2>&1 &
  fi
  ROWS=$n
}

RC=0
GRIDS=()  # each throughput grid's outcome, "LABEL: pass | timeout ... | skipped ... | exit N", for the summary
bench() {  # LABEL SECONDS ARGS...: one throughput grid; the table goes to throughput.txt as it is printed, warnings
  # and errors to bench_stderr.txt; a grid stopped by its time limit says so (its finished rows are kept)
  local label=$1 t
  t=$(limit "$2")
  if [ "$t" -lt 20 ]; then
    echo "  (skipped, the time is spent: ${*:3})" | tee -a "$OUT/throughput.txt"
    RC=124
    GRIDS+=("$label: skipped, no time left")
    return
  fi
  timeout "$t" $PY bench/throughput.py --json "$OUT/throughput.jsonl" "${@:3}" 2>> "$OUT/bench_stderr.txt" |
    tee -a "$OUT/throughput.txt"
  RC=${PIPESTATUS[0]}
  [ "$RC" = 0 ] ||
    echo "  (exit $RC$([ "$RC" = 124 ] && echo ": the $t s limit"): ${*:3})" | tee -a "$OUT/throughput.txt"
  case $RC in
    0) GRIDS+=("$label: pass") ;;
    124) GRIDS+=("$label: timeout at $t s") ;;
    *) GRIDS+=("$label: exit $RC") ;;
  esac
  project
}

# The summary's lines for the rows of throughput.jsonl
ROW_TABLE=$(cat <<'PYTHON'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    setting = (f"{r['preset']} {r['dtype']} {r['micro_batch']} x {r['seq_len']}" + (" compile" if r["compile"] else "")
               + ("" if r["recompute"] == "none" else f" recompute {r['recompute']}"))
    if r.get("oom"):
        print(f"{setting:<40} {'OOM':>10} (plan {r['plan_gb']:.1f} GB)")
        continue
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    print(f"{setting:<40} {r['tokens_per_s']:>10,.0f} tokens/s  MFU {mfu:>6}  peak {r['peak_gb']:5.1f} GB"
          f" (plan {r['plan_gb']:.1f})")
PYTHON
)
if want throughput; then
  echo "== 2. bench/throughput.py"
  : > "$OUT/throughput.txt"
  : > "$OUT/throughput.jsonl"
  bench small 75 --preset small --dtype bf16 --micro_batch 16 --compile false,true --steps 10 --warmup 3

  # yuan-4.7b at tp 1, bf16, no recomputation (every activation kept): the largest micro-batch that plan.py says
  # fits this card's memory first; after an OOM row (or a crash while allocating), the next smaller one.
  GB=$(( ${MEM:-0} * 1048576 / 1000000000 ))
  for mb in 4 2 1; do
    fits=$($PY train.py --preset yuan-4.7b --plan --gpu_mem "$GB" --dtype bf16 --recompute none --micro_batch $mb \
             --json | $PY -c "import json, sys; print(json.load(sys.stdin)['fits'])" 2>&1)
    if [ "$fits" != True ]; then
      echo "  (yuan-4.7b micro_batch $mb: plan.py says it does not fit ${GB} GB: $fits)" | tee -a "$OUT/throughput.txt"
      continue
    fi
    bench "yuan-4.7b mb $mb" 130 --preset yuan-4.7b --dtype bf16 --recompute none --micro_batch $mb --steps 3 \
      --warmup 1
    if [ "$RC" != 0 ] && [ "$RC" != 124 ]; then  # crashed (out of memory outside the step): try smaller
      GRIDS[-1]="yuan-4.7b mb $mb: crashed (exit $RC, see bench_stderr.txt), the next smaller tried"
      continue
    fi
    tail -1 "$OUT/throughput.txt" | grep -q " OOM " || break
    GRIDS[-1]="yuan-4.7b mb $mb: out of memory in the step, the next smaller tried"
  done

  bench 1.3b 110 --preset 1.3b --dtype bf16 --micro_batch 4 --compile false,true --steps 6 --warmup 3
  bench "1.3b recompute" 45 --preset 1.3b --dtype bf16 --micro_batch 4 --recompute selective,full --steps 3 \
    --warmup 1
  word=pass
  printf '%s\n' "${GRIDS[@]}" | grep -q ": \(timeout\|skipped\)" && word=timeout
  printf '%s\n' "${GRIDS[@]}" | grep -q ": exit" && word=FAIL
  said throughput "$word"
  for grid in "${GRIDS[@]}"; do said "" "grid $grid"; done
  while IFS= read -r row; do said "" "$row"; done < <($PY -c "$ROW_TABLE" "$OUT/throughput.jsonl")
fi

left() { local l=$((END - SECONDS)); echo $(( $1 < l ? $1 : (l > 1 ? l : 1) )); }  # SECONDS, cut to what is left
outcome() {  # EXIT-STATUS LIMIT: the summary's word for a step's exit status
  case $1 in 0) echo "pass    " ;; 124) echo "timeout  at $2 s:" ;; *) echo "FAIL     exit $1:" ;; esac
}
if want vs_plain; then
  echo "== 3. bench/vs_plain.py"
  t=$(left 30)
  timeout "$t" $PY bench/vs_plain.py --preset small --dtype bf16 --seq_len 1024 --micro_batch 8 --steps 10 2>&1 |
    tee "$OUT/vs_plain.txt"
  rc=${PIPESTATUS[0]}
  figures=$(grep -E "^  (nanoyuan|plain) |nanoyuan / plain" "$OUT/vs_plain.txt" | sed -E 's/^ +//; s/ +/ /g' |
            paste -sd ';' | sed 's/;/; /g')
  said vs_plain "$(outcome "$rc" "$t") ${figures:-$(tail -1 "$OUT/vs_plain.txt")}"
fi
while [ -n "$(jobs -pr)" ] && [ $SECONDS -lt $((END - 45)) ]; do sleep 1; done  # the projections, while time allows
if want data_bench; then
  echo "== 4. bench/data_bench.py"
  t=$(left 45)
  timeout "$t" $PY bench/data_bench.py --mb 400 --piece-mb 8 --workdir "$WORK/bench" > "$WORK/data_bench.txt" 2>&1
  rc=$?
  tail -12 "$WORK/data_bench.txt" | tee "$OUT/data_bench.txt"
  figures=$(grep -E "prepare, [0-9]+ workers" "$OUT/data_bench.txt" | sed -E 's/^ +//')
  said data_bench "$(outcome "$rc" "$t") ${figures:-$(tail -1 "$OUT/data_bench.txt")}"
fi
cat "$WORK"/roofline.* > "$OUT/roofline.txt" 2>/dev/null
rm -rf "$WORK"

# The summary: one block to paste into bench/RESULTS.md or an issue, also kept as summary.txt.
{
  echo "==== bench/gpu_check.sh summary, $(date -u '+%Y-%m-%d %H:%M UTC'), $SECONDS s; files in $OUT ===="
  printf '%s\n' "${SUMMARY[@]}"
  echo "===="
} | tee "$OUT/summary.txt"
