#!/usr/bin/env bash
# The one prepared GPU check, sized for a single H100/H200 and about 8 minutes (see DEVELOPERS guide):
#   1. the test suite with the CUDA tests (tests/test_cuda.py runs only where torch sees a GPU), on 8 pytest-xdist
#      workers where xdist is installed,
#   2. training throughput and MFU of `small` and `1.3b` in bf16 on the real loop (train.py),
#   3. the data benchmark (bench/data_bench.py) on all of the machine's cores,
# writing device.txt, tests.txt, throughput.txt and data_bench.txt to $OUT (default out/gpu_check). Uses the
# machine's own python3 and torch; with no MPI library there, everything runs as a single process.
#   device tool:  bash bench/gpu_check.sh        (then copy the figures into bench/RESULTS.md with the card)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PY:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"

XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 180 $PY -m pytest -q $XDIST -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/tests.txt"

$PY data.py train-tokenizer --input data/sanguo.txt --vocab-size 4096 --out "$WORK/tok.tiktoken" > /dev/null &&
$PY data.py prepare --input data/sanguo.txt --tokenizer "$WORK/tok.tiktoken" --out "$WORK/data" > /dev/null

run() {  # NAME SECONDS ARGS...: train for a few steps; metrics.jsonl keeps whatever finished before the timeout
  local name=$1 limit=$2; shift 2
  timeout "$limit" $PY train.py --data "$WORK/data" --out "$WORK/$name" --dtype bf16 --eval_interval 100000 \
    --eval_batches 1 --ckpt_interval 100000 "$@" > "$WORK/$name.log" 2>&1
  tail -4 "$WORK/$name.log" > "$OUT/train_$name.log"
  $PY - "$WORK/$name/metrics.jsonl" "$name $*" <<'PYEOF' | tee -a "$OUT/throughput.txt"
import json, statistics, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l][3:]  # the first steps warm up
except OSError:
    rows = []
if not rows:
    print(f"{sys.argv[2]}: no timed steps (see the run's log)")
else:
    tok = statistics.median(r["tokens_per_s"] for r in rows)
    mfu = statistics.median(r["mfu"] for r in rows) if rows[0]["mfu"] is not None else float("nan")
    print(f"{sys.argv[2]}: {len(rows)} steps, {tok:,.0f} tokens/s, MFU {mfu:.1%}, last loss {rows[-1]['loss']:.3f}")
PYEOF
}
: > "$OUT/throughput.txt"
run small 75 --preset small --vocab_size 50304 --micro_batch 16 --batch_tokens 16384 --max_steps 25
run 1.3b 120 --preset 1.3b --vocab_size 53248 --micro_batch 4 --batch_tokens 8192 --max_steps 15
timeout 120 $PY bench/data_bench.py --mb 1000 --piece-mb 8 --workdir "$WORK/bench" 2>&1 | tail -12 |
  tee "$OUT/data_bench.txt"
rm -rf "$WORK"
