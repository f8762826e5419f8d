#!/usr/bin/env bash
# The one prepared GPU check for a single H100/H200, at most about 9 minutes (see the developers' guide):
#   1. the tests that matter on a GPU (tests/test_cuda.py runs only where torch sees one, then model and plan),
#   2. bench/throughput.py: `small` and `1.3b` in bf16, eager and --compile; yuan-4.7b at tp 1 with full
#      recomputation where the card holds it (H200: 141 GB); plan.py's memory estimate beside each measured peak,
#   3. bench/vs_plain.py on the GPU (nanoyuan's step against plain PyTorch, `small`),
#   4. the data benchmark (bench/data_bench.py) on all of the machine's cores,
# writing device.txt, tests.txt, throughput.txt (+ throughput.jsonl, bench_stderr.txt), vs_plain.txt and
# data_bench.txt to $OUT (default out/gpu_check). Uses the machine's own python3 and torch; with no MPI library
# everything is one process.
#   device tool:  bash bench/gpu_check.sh        (then copy the figures into bench/RESULTS.md with the card)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PY:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT"
: > "$OUT/throughput.txt"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"

timeout 90 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_model.py tests/test_plan.py 2>&1 |
  tail -15 | tee "$OUT/tests.txt"

bench() {  # SECONDS ARGS...: one throughput grid; the table goes to throughput.txt as it is printed, warnings and
  # errors to bench_stderr.txt; a grid stopped by its time limit says so (its finished rows are kept)
  timeout "$1" $PY bench/throughput.py --json "$OUT/throughput.jsonl" "${@:2}" 2>> "$OUT/bench_stderr.txt" |
    tee -a "$OUT/throughput.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "  (exit $rc$([ "$rc" = 124 ] && echo ": the $1 s limit"): ${*:2})" | tee -a "$OUT/throughput.txt"
}
bench 70 --preset small --dtype bf16 --micro_batch 16 --compile false,true --steps 10 --warmup 3
bench 90 --preset 1.3b --dtype bf16 --micro_batch 4 --compile false,true --steps 6 --warmup 3
bench 60 --preset 1.3b --dtype bf16 --micro_batch 8 --recompute selective,full --steps 4 --warmup 2
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${MEM:-0}" -gt 120000 ]; then  # yuan-4.7b at tp 1: ~95 GB by plan.py, so only on a 141 GB card
  bench 150 --preset yuan-4.7b --dtype bf16 --recompute full --micro_batch 8 --steps 4 --warmup 2
fi

timeout 30 $PY bench/vs_plain.py --preset small --seq_len 1024 --micro_batch 8 --steps 10 2>&1 | tee "$OUT/vs_plain.txt"
timeout 45 $PY bench/data_bench.py --mb 400 --piece-mb 8 --workdir "$WORK/bench" 2>&1 | tail -12 |
  tee "$OUT/data_bench.txt"
rm -rf "$WORK"
