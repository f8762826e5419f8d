"""Text -> tokens -> memory-mapped uint16 shards -> batches.

    python data.py train-tokenizer --input asc22/ --vocab-size 53228 --out tok/asc22.tiktoken [--sample-mb 1024]
    python data.py prepare --input asc22/ --tokenizer tok/asc22.tiktoken --out data/asc22 [--workers 64]
    echo "话说天下大势" | python data.py encode --tokenizer tok/asc22.tiktoken | python data.py decode --tokenizer ...
    mpiexec -n 4 python data.py prepare ...      # several nodes share the files; the output is the same
    python data.py prepare ... --tokenizer yuan:Yuan-1.0/src/vocab.txt --format megatron   # for Megatron-LM too

Inputs are `.txt` files with one document per line (the ASC22 corpus writes in-document newlines as the literal
`<n>`), `.jsonl` files with a "text" field, or either one gzipped; a directory stands for the corpus files in it.
dataprep/tokenizer.py trains and loads the tokenizer; dataprep/prepare.py turns the corpus into shards (cleaning,
workers, resuming); dataprep/windows.py opens them for training, as grids of windows (checking them at open).
This file holds the command line and the reader that training uses; the shard format is dataprep/shards.py:

    DIR/meta.json                   what was prepared: tokenizer, settings, counts, the list of shards
    DIR/train_0000.bin, ...         a 64-byte header (shards.HEADER) followed by uint16 token ids,
    DIR/val_0000.bin, ...           each document followed by <|endoftext|>
    DIR/tokenizer.tiktoken (+.json) a copy of the tokenizer, so the directory alone can decode its tokens
                                    (tokenizer.vocab.txt for yuan: and bert:)

With --format megatron, shard k is instead the Megatron-LM datasets DIR/train_NNNN and DIR/val_NNNN (.bin + .idx,
dataprep/indexed.py). train.py --data takes a prepared directory of either format, or Megatron's own --data-path: a
dataset PREFIX or a blend "W1 PREFIX1 W2 PREFIX2 ..." (class Batches).
"""
import argparse
import sys
import warnings

from runtime.errors import require

require("numpy")  # a clear hint when run outside .venv

from runtime.mpi import run_or_abort  # not distributed.py: no torch for a data job
# numpy is imported where it is used: `data.py encode` and `decode` start without it (a tenth of their start-up)

# ------------------------------------------------------------------------------------------------------------------
# Reading for training


def _mix(z):
    """splitmix64's finalizer: a well-scrambled 64-bit hash of each element (uint64 arithmetic wraps)."""
    import numpy as np
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(i, n, keys):
    """A pseudo-random permutation of range(n) evaluated at the array i, without building a table of n entries:
    a Feistel network on the smallest even number of bits that covers n (a bijection, whatever the round function),
    and values that land >= n are sent through it again until they fall inside ("cycle walking")."""
    import numpy as np
    half = np.uint64(max(1, (int(n - 1).bit_length() + 1) // 2))
    mask = (np.uint64(1) << half) - np.uint64(1)
    out = np.array(i, dtype=np.uint64)
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        x = out[todo]
        for key in keys:
            left, right = x >> half, x & mask
            x = (right << half) | (left ^ (_mix(right ^ key) & mask))
        out[todo] = x
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


class Batches:
    """Training and validation batches from a prepared directory, a Megatron dataset prefix, or a blend of them.

    Training reads the train split as epochs: epoch e is a pseudo-random permutation (seeded by seed, e) of all its
    windows, and the step's global batch takes the next step_windows of them. Data-parallel rank r, micro-batch m
    takes the slice (m * dp + r) of that global batch, so ranks never share a window, the global batch of a step
    does not depend on how it is split across ranks, and a resumed run reads exactly what the uninterrupted run
    would have read: the position is a pure function of (seed, step). A weighted blend (dataprep/windows.py's Blend)
    first sends each position to one dataset, whose own positions then run through its own epochs in the same way.

    data: DIR (data.py prepare's output, either --format), or Megatron's --data-path: PREFIX, or "W1 PREFIX1 W2
    PREFIX2 ...". A Megatron dataset does not record its tokenizer: `tokenizer` (a spec, e.g. yuan:vocab.txt) says
    it. Its validation data is val_data (a prefix or blend), else the last val_fraction of each prefix's sequences.

    pin_memory: x and y as contiguous tensors in page-locked memory, so that the trainer's x.to(device,
    non_blocking=True) overlaps with the GPU's work. Fresh ones per batch: torch's pinned-memory cache hands a block
    out again only after the copies that read it have finished. Without a CUDA device it is ignored with a warning."""

    RELEASE_EVERY = 32  # batches between TokenShards.release() calls

    def __init__(self, data, seq_len, micro_batch, seed, rank=0, dp=1, accum=1, pin_memory=False, tokenizer=None,
                 val_data=None, val_fraction=0.01):
        from dataprep.windows import open_windows
        self.seq_len, self.micro_batch, self.seed, self.rank, self.dp = seq_len, micro_batch, seed, rank, dp
        self.step_windows = micro_batch * accum * dp
        # Each split a Blend of grids of windows (dataprep/windows.py), every file checked as it is opened.
        self.train, self.val, self.tokenizer, self.tokenizer_spec, self.meta = open_windows(
            data, seq_len, tokenizer, val_data, val_fraction)
        self.calls = 0
        self._keys = {}
        self.pin_memory = pin_memory
        if pin_memory:
            import torch  # not at the top: see _batch
            if not torch.cuda.is_available():
                warnings.warn("Batches(pin_memory=True): torch sees no CUDA device, so there is no pinned memory; "
                              "batches stay in ordinary memory.")
                self.pin_memory = False

    def _epoch_keys(self, grid, epoch):
        key = (grid, epoch)
        if key not in self._keys:
            if len(self._keys) > 64:
                self._keys = {}
            import numpy as np
            seeds = [self.seed, epoch] if len(self.train.grids) == 1 else [self.seed, epoch, grid]
            self._keys[key] = np.random.default_rng(seeds).integers(0, 2**63, 4, dtype=np.uint64)
        return self._keys[key]

    def _batch(self, part, grid, ids):
        self.calls += 1
        if self.calls % self.RELEASE_EVERY == 0:
            self.train.release()
            self.val.release()
        import torch  # here, not at the top: prepare's worker processes import this module and need no torch
        w = torch.from_numpy(part.windows(grid, ids))  # [B, T+1]
        x, y = w[:, :-1], w[:, 1:]  # inputs [B, T], targets [B, T]: views, not contiguous when B > 1
        if self.pin_memory:  # contiguous pinned copies (see the class docstring)
            x, y = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in (x, y))
        return x, y

    def train_ids(self, step, micro):
        """(grid, window) of each window of this rank's micro-batch `micro` at `step`."""
        import numpy as np
        first = step * self.step_windows + (micro * self.dp + self.rank) * self.micro_batch
        g = np.arange(first, first + self.micro_batch, dtype=np.int64)  # positions in the endless stream
        grid, local = self.train.locate(g)
        ids = np.empty_like(g)
        for i in np.unique(grid):
            n = self.train.grids[i].n
            mine = grid == i
            epoch, pos = local[mine] // n, local[mine] % n
            out = np.empty_like(pos)
            for e in np.unique(epoch):  # a micro-batch can straddle two epochs
                out[epoch == e] = permute(pos[epoch == e], n, self._epoch_keys(int(i), int(e)))
            ids[mine] = out
        return grid, ids

    def train_batch(self, step, micro):
        return self._batch(self.train, *self.train_ids(step, micro))

    def val_batches(self, n):
        """n fixed micro-batches spread evenly over the val windows (the same ones at every evaluation)."""
        grid, ids = self.val.spread(n * self.micro_batch)
        for i in range(n):
            part = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            yield self._batch(self.val, grid[part], ids[part])

    def unigram_entropy(self, max_tokens=10_000_000):
        """Entropy (nats/token) of the token frequencies in the first max_tokens of the train data: the loss of the
        best model that ignores context. A trained model's val loss should end far below it."""
        import numpy as np
        counts = np.zeros(self.tokenizer["n_vocab"], dtype=np.int64)
        left = max_tokens
        for arr in (a for g in self.train.grids for a in g.arrays):
            counts += np.bincount(arr[:left], minlength=len(counts))[:len(counts)]
            left -= min(left, len(arr))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------------------------------
# Command line


def transcode(cmd, spec):
    """data.py encode / decode: stdin to stdout, a line at a time (a pipe sees each line as soon as it is done;
    from a file, output is written in blocks)."""
    import os
    import stat
    from dataprep.tokenizer import decode_lines, encode_lines, load_tokenizer
    enc = load_tokenizer(spec)[0]
    from_file = stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode)
    for line in (encode_lines if cmd == "encode" else decode_lines)(enc, sys.stdin):
        sys.stdout.write(line + "\n")
        if not from_file:
            sys.stdout.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE on a sample, saved as a tiktoken rank file")
    t.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl (or .gz) files, or directories of them")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens including <|endoftext|>, at most 65536")
    t.add_argument("--out", required=True, help="PATH.tiktoken; PATH.json is written beside it")
    t.add_argument("--sample-mb", type=float, default=1024,
                   help="train on at most this much input, read in evenly spaced blocks (default 1024)")
    r = sub.add_parser("prepare", help="tokenize a corpus into DIR/train_NNNN.bin, DIR/val_NNNN.bin, DIR/meta.json")
    r.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl (or .gz) files, or directories of them")
    r.add_argument("--tokenizer", required=True, help="a .tiktoken file from train-tokenizer, "
                   "yuan:PATH/vocab.txt (Yuan 1.0's tokenizer), bert:PATH/vocab.txt (Megatron's BertWordPiece"
                   "LowerCase), or gpt2 / p50k_base")
    r.add_argument("--out", required=True, help="output directory (an unfinished one of the same command resumes)")
    r.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    r.add_argument("--shard-mb", type=float, default=4096, help="input MB per shard (default 4096)")
    r.add_argument("--piece-mb", type=float, default=32, help="input MB per unit of work of a worker (default 32)")
    r.add_argument("--format", choices=("nanoyuan", "megatron"), default="nanoyuan",
                   help="nanoyuan shards (default), or Megatron-LM indexed datasets: DIR/train_NNNN.bin + .idx, one "
                        "sequence per document ending in the end-of-document token; train.py reads either")
    r.add_argument("--workers", type=int, default=0, help="tokenizing processes per rank (default: cores / ranks "
                                                          "on this node)")
    for name, what in (("encode", "print the token ids of each line of stdin (space-separated, no end-of-document "
                                   "token; <n> is a newline, as in the corpus)"),
                       ("decode", "print the text of each line of token ids on stdin (newlines as <n>)")):
        sub.add_parser(name, help=what).add_argument("--tokenizer", required=True, help="as for prepare")
    for q in (t, r):
        q.add_argument("--min-chars", type=int, default=10, help="drop shorter documents (default 10)")
        q.add_argument("--max-chars", type=int, default=20_000, help="drop longer documents; 0 = no limit "
                                                                     "(default 20000)")
    args = p.parse_args(argv)
    if args.cmd in ("encode", "decode"):
        return run_or_abort(lambda: transcode(args.cmd, args.tokenizer))
    from dataprep import prepare  # here, not above: train.py reads batches without loading the preparation code
    if args.cmd == "train-tokenizer":
        run_or_abort(lambda: prepare.train_tokenizer_cli(args.input, args.vocab_size, args.out, args.sample_mb,
                                                         args.min_chars, args.max_chars))
    else:
        run_or_abort(lambda: prepare.prepare(args.input, args.tokenizer, args.out, args.val_fraction,
                                             min_chars=args.min_chars, max_chars=args.max_chars,
                                             shard_mb=args.shard_mb, piece_mb=args.piece_mb,
                                             workers=args.workers, fmt=args.format))


if __name__ == "__main__":
    main()
