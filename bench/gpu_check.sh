#!/usr/bin/env bash
# The one prepared GPU check for a single H100/H200, at most 9 minutes in all (see the developers' guide):
#   1. the tests that matter on a GPU (tests/test_cuda*.py, which run only where torch sees GPUs, the pinned batches
#      of tests/test_hot_path.py, then model and plan),
#   2. bench/throughput.py (steps of 4 micro-batches, its default): `small` and `1.3b` in bf16, eager and --compile;
#      1.3b with recomputation; yuan-4.7b at tp 1 without recomputation at the largest micro-batch that fits (4, 2
#      or 1: the largest plan.py says fits this card first, the next smaller after an OOM row); plan.py's memory
#      estimate beside each measured peak, and bench/roofline.py's projection of every timed setting beside it,
#   3. bench/vs_plain.py on the GPU (nanoyuan's step against plain PyTorch, `small`),
#   4. the data benchmark (bench/data_bench.py) on all of the machine's cores,
# writing device.txt, tests.txt, throughput.txt (+ throughput.jsonl, bench_stderr.txt), roofline.txt, vs_plain.txt
# and data_bench.txt to $OUT (default out/gpu_check). Each step has its own time limit, and every limit is also cut
# to what is left of the 9 minutes, keeping the last 75 s for steps 3 and 4, so the whole never runs longer. Uses
# the machine's own python3 and torch; with no MPI library everything is one process.
#   device tool:  bash bench/gpu_check.sh        (then copy the figures into bench/RESULTS.md with the card)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PY:-python3}
WORK=$(mktemp -d)
END=$((SECONDS + 540))  # 9 minutes from here
mkdir -p "$OUT"
: > "$OUT/throughput.txt"
: > "$OUT/throughput.jsonl"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"
NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)  # MiB
case "$NAME" in *H200*) ROOF_GPU=H200 ;; *H100*) ROOF_GPU=H100 ;; *) ROOF_GPU= ;; esac  # bench/roofline.py's names

timeout 100 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda*.py \
  tests/test_hot_path.py::test_pinned_batches_on_a_gpu_machine tests/test_model.py tests/test_plan.py 2>&1 |
  tail -15 | tee "$OUT/tests.txt"

limit() {  # SECONDS: the smaller of SECONDS and what is left before the last 75 s
  local left=$((END - 75 - SECONDS))
  echo $(( $1 < left ? $1 : left ))
}

ROWS=0  # rows of throughput.jsonl already handed to bench/roofline.py
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
project() {  # bench/roofline.py's projection of every row bench() just added (where another engineer's roofline.py
  # is there): on the CPU, in the background, one thread, so that it barely touches the measurement; each grid's
  # projections into their own file, joined in order into roofline.txt at the end
  local n
  n=$(wc -l < "$OUT/throughput.jsonl")
  if [ -f bench/roofline.py ] && [ -n "$ROOF_GPU" ] && [ "$n" -gt "$ROWS" ]; then
    sed -n "$((ROWS + 1)),${n}p" "$OUT/throughput.jsonl" | $PY -c "$ROW_ARGS" > "$WORK/args.$ROWS"
    while read -r args; do
      echo "== bench/roofline.py --gpu $ROOF_GPU $args --json"
      OMP_NUM_THREADS=1 timeout 60 $PY bench/roofline.py --gpu "$ROOF_GPU" $args --json
    done < "$WORK/args.$ROWS" > "$WORK/roofline.$(printf %04d "$ROWS")" 2>&1 &
  fi
  ROWS=$n
}

RC=0
bench() {  # SECONDS ARGS...: one throughput grid; the table goes to throughput.txt as it is printed, warnings and
  # errors to bench_stderr.txt; a grid stopped by its time limit says so (its finished rows are kept)
  local t
  t=$(limit "$1")
  if [ "$t" -lt 20 ]; then
    echo "  (skipped, the 9 minutes are spent: ${*:2})" | tee -a "$OUT/throughput.txt"
    RC=124
    return
  fi
  timeout "$t" $PY bench/throughput.py --json "$OUT/throughput.jsonl" "${@:2}" 2>> "$OUT/bench_stderr.txt" |
    tee -a "$OUT/throughput.txt"
  RC=${PIPESTATUS[0]}
  [ "$RC" = 0 ] ||
    echo "  (exit $RC$([ "$RC" = 124 ] && echo ": the $t s limit"): ${*:2})" | tee -a "$OUT/throughput.txt"
  project
}

bench 75 --preset small --dtype bf16 --micro_batch 16 --compile false,true --steps 10 --warmup 3

# yuan-4.7b at tp 1, bf16, no recomputation (every activation kept): the largest micro-batch that plan.py says fits
# this card's memory first; after an OOM row (or a crash while allocating), the next smaller one.
GB=$(( ${MEM:-0} * 1048576 / 1000000000 ))
for mb in 4 2 1; do
  fits=$($PY train.py --preset yuan-4.7b --plan --gpu_mem "$GB" --dtype bf16 --recompute none --micro_batch $mb --json |
         $PY -c "import json, sys; print(json.load(sys.stdin)['fits'])" 2>&1)
  if [ "$fits" != True ]; then
    echo "  (yuan-4.7b micro_batch $mb: plan.py says it does not fit ${GB} GB: $fits)" | tee -a "$OUT/throughput.txt"
    continue
  fi
  bench 130 --preset yuan-4.7b --dtype bf16 --recompute none --micro_batch $mb --steps 3 --warmup 1
  [ "$RC" != 0 ] && [ "$RC" != 124 ] && continue  # crashed (out of memory outside the step): try smaller
  tail -1 "$OUT/throughput.txt" | grep -q " OOM " || break
done

bench 110 --preset 1.3b --dtype bf16 --micro_batch 4 --compile false,true --steps 6 --warmup 3
bench 45 --preset 1.3b --dtype bf16 --micro_batch 4 --recompute selective,full --steps 3 --warmup 1

left() { local l=$((END - SECONDS)); echo $(( $1 < l ? $1 : (l > 1 ? l : 1) )); }  # SECONDS, cut to the 9 minutes
timeout "$(left 30)" $PY bench/vs_plain.py --preset small --seq_len 1024 --micro_batch 8 --steps 10 2>&1 |
  tee "$OUT/vs_plain.txt"
while [ -n "$(jobs -pr)" ] && [ $SECONDS -lt $((END - 45)) ]; do sleep 1; done  # the projections, while time allows
timeout "$(left 45)" $PY bench/data_bench.py --mb 400 --piece-mb 8 --workdir "$WORK/bench" 2>&1 | tail -12 |
  tee "$OUT/data_bench.txt"
cat "$WORK"/roofline.* > "$OUT/roofline.txt" 2>/dev/null
rm -rf "$WORK"
