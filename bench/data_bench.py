"""The data pipeline against its limits (issue 4). Run by hand; results go in bench/RESULTS.md.

    .venv/bin/python bench/data_bench.py [--mb 200] [--workers N] [--piece-mb 4] [--tokenizer PATH] [--vocab 16384]

1. Tokenization: prepare.prepare() with N workers (default: every core) on an ASC22-format corpus of --mb MB,
   against N x the rate of one core of raw tiktoken `encode_ordinary_batch(docs, num_threads=1)` on the same
   cleaned documents. Target: prepare >= 0.9 x N x one core.
2. Reading: data.Batches windows at the `small` and `yuan-4.7b` window sizes, tokens/s on one core, against what one
   GPU's training consumes at 50% MFU of an H100's bf16 peak (989 TFLOP/s, model.flops_per_token).
3. A projection for the 100 GB ASC22 corpus on a 64-core node from the measured per-core rate and efficiency.

The corpus is 三国演义 (corpus/sanguo.txt): its paragraphs grouped into documents of about 1,000 to 3,000 characters,
repeated until it reaches --mb. The tokenizer (unless --tokenizer) is a byte-level BPE of --vocab tokens trained on
the same text; say which one in RESULTS.md, since the rate per core depends on it.
"""
import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import Batches  # noqa: E402
from dataprep.prepare import prepare  # noqa: E402
from dataprep.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

H100_BF16 = 989e12  # dense bf16 FLOP/s of an H100 SXM (datasheet), as in runtime/accelerators.py


def make_corpus(path, mb):
    """ASC22 format: one document per line, `<n>` for newlines; documents of ~1-3k characters of 三国演义."""
    paragraphs = [p for line in open(os.path.join(ROOT, "corpus", "sanguo.txt"), encoding="utf-8")
                  for p in line.rstrip("\n").split("<n>") if p.strip()]
    rng = np.random.default_rng(0)
    docs, i = [], 0
    while i < len(paragraphs):
        target, doc = rng.integers(1000, 3000), []
        while i < len(paragraphs) and sum(map(len, doc)) < target:
            doc.append(paragraphs[i])
            i += 1
        docs.append("<n>".join(doc))
    block = ("\n".join(docs) + "\n").encode()
    with open(path, "wb") as f:
        for _ in range(max(1, round(mb * 1e6 / len(block)))):
            f.write(block)
    return os.path.getsize(path) / 1e6, [d.replace("<n>", "\n") for d in docs]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200, help="corpus size in MB")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="prepare workers")
    p.add_argument("--tokenizer", default="", help="a .tiktoken file (default: train one of --vocab tokens)")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--piece-mb", type=float, default=4,
                   help="prepare's unit of work; small enough that every worker gets many (default 4)")
    p.add_argument("--workdir", default="", help="where the corpus and shards go (default: a temp dir)")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="nanoyuan_databench_")
    os.makedirs(work, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores available; "
          f"python {platform.python_version()}")

    corpus_mb, docs = make_corpus(os.path.join(work, "corpus.txt"), args.mb)
    tok = args.tokenizer
    if not tok:
        tok = os.path.join(work, f"tok{args.vocab}.tiktoken")
        if not os.path.exists(tok):
            train_tokenizer(docs, args.vocab, tok)
    enc, info = load_tokenizer(tok)
    print(f"corpus: {corpus_mb:.1f} MB ({len(docs)} distinct documents); tokenizer {tok} ({info['n_vocab']:,} tokens)")

    # 1. One core of raw tiktoken on the same documents, repeated to >= 20 MB so that it runs for seconds.
    sample = docs * max(1, round(20e6 / sum(len(d.encode()) for d in docs)))
    sample_mb = sum(len(d.encode()) for d in sample) / 1e6
    enc.encode_ordinary_batch(sample[:50], num_threads=1)  # warm up
    t0 = time.perf_counter()
    enc.encode_ordinary_batch(sample, num_threads=1)
    one_core = sample_mb / (time.perf_counter() - t0)
    out = os.path.join(work, "shards")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    meta = prepare([os.path.join(work, "corpus.txt")], tok, out, shard_mb=1024, piece_mb=args.piece_mb,
                   workers=args.workers)
    seconds = time.perf_counter() - t0
    rate = corpus_mb / seconds
    eff = rate / (args.workers * one_core)
    tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
    print(f"\ntokenization  one core of raw tiktoken encode_ordinary_batch: {one_core:.2f} MB/s")
    print(f"              prepare, {args.workers} workers: {corpus_mb:.0f} MB in {seconds:.1f} s = {rate:.2f} MB/s "
          f"= {eff:.2f} x ({args.workers} x one core)   [target >= 0.90]")
    print(f"              {tokens:,} tokens, {tokens / corpus_mb / 1e6:.3f} tokens per input byte")

    # 2. Reader throughput on one core against one GPU's consumption.
    print("\nreader        window            tokens/s (1 core)  one H100 at 50% MFU needs   ratio")
    # model.py imports torch: only here, so that the prepare workers above (spawned: they import this file again)
    # start as fast as data.py's own do
    from model import flops_per_token
    from run.config import make_config
    for preset, micro in (("small", 8), ("yuan-4.7b", 1)):
        cfg = make_config(preset, vocab_size=53248)
        b = Batches(out, cfg.seq_len, micro, seed=0)
        for s in range(5):
            b.train_batch(s, 0)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3:
            b.train_batch(5 + n, 0)
            n += 1
        got = n * micro * cfg.seq_len / (time.perf_counter() - t0)
        need = 0.5 * H100_BF16 / flops_per_token(cfg)
        print(f"              {preset:9s} {micro} x {cfg.seq_len:<5d} {got:16,.0f}  {need:24,.0f}  {got / need:8.1f}")

    # 3. The ASC22 corpus on a 64-core node, at this per-core rate and efficiency.
    hours = 100e3 / (64 * one_core * min(eff, 1.0)) / 3600
    print(f"\nprojection    100 GB on 64 cores at {one_core:.2f} MB/s per core x {min(eff, 1.0):.2f}: "
          f"{hours * 60:.0f} min (if the disk reads {64 * one_core * min(eff, 1.0):.0f} MB/s and the node has no "
          f"SMT siblings counted as cores)")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
