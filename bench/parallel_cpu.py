"""CPU scaling of the real trainer: the `small` preset as 1 rank x 2 threads, TP=2 (2 ranks x 1 thread) and DP=2
(2 ranks x 1 thread). Runs train.py itself (through mpiexec for the parallel cases) and reads tokens/s from its
metrics.jsonl, so what is measured is the real training step. Run by hand; results go in bench/RESULTS.md.

    .venv/bin/python bench/parallel_cpu.py [--data out/demo/data] [--steps 3] [--seq-len 256] [--batch-seqs 8]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def tokens_per_s(ranks, threads, tp, args, workdir):
    out = os.path.join(workdir, f"r{ranks}_tp{tp}")
    shutil.rmtree(out, ignore_errors=True)
    # Global batch: --batch-seqs sequences of one per micro-batch, so DP=2 runs half as many micro-batches per rank.
    train = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "small", "--data", args.data, "--out", out,
             "--vocab_size", "50304", "--seq_len", str(args.seq_len), "--micro_batch", "1",
             "--batch_tokens", str(args.batch_seqs * args.seq_len), "--max_steps", str(args.steps + 1),
             "--eval_interval", "1000", "--eval_batches", "1", "--ckpt_interval", "1000", "--dtype", "fp32",
             "--tp", str(tp)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = train if ranks == 1 else [MPIEXEC, "-n", str(ranks), *train]
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    return statistics.median(r["tokens_per_s"] for r in rows[1:])  # step 1 is warm-up


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "out", "demo", "data"), help="a prepared data directory")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-seqs", type=int, default=8, help="sequences per optimizer step (global batch)")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.data, "meta.json")):
        sys.exit(f"error: {args.data} is not a prepared data directory.\nHINT: run `make demo` first, or pass --data.")
    with tempfile.TemporaryDirectory() as workdir:
        base = tokens_per_s(1, 2, 1, args, workdir)
        tp2 = tokens_per_s(2, 1, 2, args, workdir)
        dp2 = tokens_per_s(2, 1, 1, args, workdir)
    print(f"small preset, seq_len {args.seq_len}, {args.batch_seqs} sequences per step, fp32, {os.cpu_count()} CPUs, "
          f"median of {args.steps} steps")
    print(f"{'layout':<28} {'tokens/s':>9} {'vs 1 rank':>9}")
    rows = (("1 rank x 2 threads", base), ("TP=2 (2 ranks x 1 thread)", tp2), ("DP=2 (2 ranks x 1 thread)", dp2))
    for name, v in rows:
        print(f"{name:<28} {v:>9.1f} {v / base:>9.2f}")


if __name__ == "__main__":
    main()
