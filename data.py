"""Text -> tokens -> memory-mapped uint16 shards -> batches.

    python data.py train-tokenizer --input asc22/ --vocab-size 53228 --out tok/asc22.tiktoken [--sample-mb 1024]
    python data.py prepare --input asc22/ --tokenizer tok/asc22.tiktoken --out data/asc22 [--workers 64]
    echo "话说天下大势" | python data.py encode --tokenizer tok/asc22.tiktoken | python data.py decode --tokenizer ...
    mpiexec -n 4 python data.py prepare ...      # several nodes share the files; the output is the same

Inputs are `.txt` files with one document per line (the ASC22 corpus writes in-document newlines as the literal
`<n>`), `.jsonl` files with a "text" field, or either one gzipped; a directory stands for the corpus files in it.
tokenizer.py trains and loads the tokenizer; prepare.py turns the corpus into shards (cleaning, workers, resuming).
This file holds the command line and the reader that training uses; the shard format is shards.py:

    DIR/meta.json                   what was prepared: tokenizer, settings, counts, the list of shards
    DIR/train_0000.bin, ...         a 64-byte header (shards.HEADER) followed by uint16 token ids,
    DIR/val_0000.bin, ...           each document followed by <|endoftext|>
    DIR/tokenizer.tiktoken (+.json) a copy of the tokenizer, so the directory alone can decode its tokens
"""
import argparse
import json
import mmap
import os
import sys
import warnings

import numpy as np

from errors import UserError
from mpi import run_or_abort  # not distributed.py: no torch for a data job
from shards import META_VERSION, open_tokens

# ------------------------------------------------------------------------------------------------------------------
# Reading for training


def _mix(z):
    """splitmix64's finalizer: a well-scrambled 64-bit hash of each element (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(i, n, keys):
    """A pseudo-random permutation of range(n) evaluated at the array i, without building a table of n entries:
    a Feistel network on the smallest even number of bits that covers n (a bijection, whatever the round function),
    and values that land >= n are sent through it again until they fall inside ("cycle walking")."""
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


class TokenShards:
    """The shards of one split as a single grid of windows. Shard k holds (n_k - 1) // seq_len windows of
    seq_len + 1 tokens (inputs and targets overlap by one token); window w of the split is window w - start[k] of
    the shard k that contains it. Sampling windows uniformly therefore weights each shard by its size."""

    def __init__(self, data_dir, records, seq_len, tokenizer):
        self.seq_len = seq_len
        self.maps, self.arrays = [], []
        for name, count in records:
            mm, arr = open_tokens(os.path.join(data_dir, name), tokenizer["n_vocab"], tokenizer["hash"], count)
            self.maps.append(mm)
            self.arrays.append(arr)
        self.per_shard = np.array([max(0, (len(a) - 1) // seq_len) for a in self.arrays], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.per_shard)])
        self.n = int(self.start[-1])  # windows in the split

    def windows(self, ids):
        """Stack windows `ids` (indices into the split's grid) into an int64 array [len(ids), seq_len + 1]."""
        shard = np.searchsorted(self.start, ids, side="right") - 1
        offsets = (ids - self.start[shard]) * self.seq_len
        return np.stack([self.arrays[k][o:o + self.seq_len + 1] for k, o in zip(shard, offsets)]).astype(np.int64)

    def release(self):
        """Drop the pages this process has touched from its resident set (they stay in the OS page cache). Without
        this, a long run's RSS climbs towards the size of every shard it has read, though no memory leaks."""
        for mm in self.maps:
            if mm is not None and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)


class Batches:
    """Training and validation batches from a prepared directory.

    Training reads the train split as epochs: epoch e is a pseudo-random permutation (seeded by seed, e) of all its
    windows, and the step's global batch takes the next step_windows of them. Data-parallel rank r, micro-batch m
    takes the slice (m * dp + r) of that global batch, so ranks never share a window, the global batch of a step
    does not depend on how it is split across ranks, and a resumed run reads exactly what the uninterrupted run
    would have read: the position is a pure function of (seed, step).

    pin_memory: return x and y as contiguous tensors in page-locked (pinned) memory, so that the trainer's
    x.to(device, non_blocking=True) is an asynchronous copy that overlaps with the GPU's work (from ordinary memory
    it waits for the copy; so does a non-contiguous source, which ATen first copies to ordinary memory). Each batch
    gets fresh pinned tensors: torch's pinned-memory cache does not hand a block out again until the copies that
    read it have finished, so no batch can overwrite one still in flight. A reused buffer would save nothing that
    matters (a micro-batch of yuan-4.7b is 16 KB of ids) and would need an event per copy to be safe. Where torch
    sees no CUDA device there is no pinned memory: the option is then ignored with a warning."""

    RELEASE_EVERY = 32  # batches between TokenShards.release() calls

    def __init__(self, data_dir, seq_len, micro_batch, seed, rank=0, dp=1, accum=1, pin_memory=False):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{meta_path} not found: {data_dir} is not a prepared data directory (or its prepare "
                            f"has not finished).\nHINT: python data.py prepare --input FILES --tokenizer TOK "
                            f"--out {data_dir}")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (ValueError, OSError) as e:
            raise UserError(f"{meta_path} cannot be read as JSON ({e}): the directory's description is damaged.\n"
                            f"HINT: re-run the same data.py prepare command into a fresh --out.") from None
        if self.meta.get("format_version") != META_VERSION:
            raise UserError(f"{meta_path} has layout version {self.meta.get('format_version')}; this code reads "
                            f"{META_VERSION}.\nHINT: re-run data.py prepare into a fresh directory.")
        self.tokenizer = self.meta["tokenizer"]
        self.seq_len, self.micro_batch, self.seed, self.rank, self.dp = seq_len, micro_batch, seed, rank, dp
        self.step_windows = micro_batch * accum * dp
        shards = self.meta["shards"]
        self.train, self.val = (TokenShards(data_dir, [(s[split], s[split + "_tokens"]) for s in shards], seq_len,
                                            self.tokenizer) for split in ("train", "val"))
        for split, part in (("train", self.train), ("val", self.val)):
            if part.n == 0:
                raise UserError(f"the {split} shards of {data_dir} hold no window of seq_len + 1 = {seq_len + 1:,} "
                                f"tokens (largest shard: {max(len(a) for a in part.arrays):,} tokens).\n"
                                f"HINT: lower --seq_len, or prepare more text (or a larger --val-fraction).")
        self.calls = 0
        self._keys = {}
        self.pin_memory = pin_memory
        if pin_memory:
            import torch  # not at the top: see _batch
            if not torch.cuda.is_available():
                warnings.warn("Batches(pin_memory=True): torch sees no CUDA device, so there is no pinned memory; "
                              "batches stay in ordinary memory.")
                self.pin_memory = False

    def _epoch_keys(self, epoch):
        if epoch not in self._keys:
            self._keys = {epoch: np.random.default_rng([self.seed, epoch]).integers(0, 2**63, 4, dtype=np.uint64)}
        return self._keys[epoch]

    def _batch(self, part, ids):
        self.calls += 1
        if self.calls % self.RELEASE_EVERY == 0:
            self.train.release()
            self.val.release()
        import torch  # here, not at the top: prepare's worker processes import this module and need no torch
        w = torch.from_numpy(part.windows(ids))  # [B, T+1]
        x, y = w[:, :-1], w[:, 1:]  # inputs [B, T], targets [B, T]: views, not contiguous when B > 1
        if self.pin_memory:  # contiguous pinned copies (see the class docstring)
            x, y = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in (x, y))
        return x, y

    def train_ids(self, step, micro):
        """Indices (into the train grid) of the windows of this rank's micro-batch `micro` at `step`."""
        first = step * self.step_windows + (micro * self.dp + self.rank) * self.micro_batch
        g = np.arange(first, first + self.micro_batch, dtype=np.int64)  # positions in the endless stream of epochs
        epoch, pos = g // self.train.n, g % self.train.n
        ids = np.empty_like(g)
        for e in np.unique(epoch):  # a micro-batch can straddle two epochs
            ids[epoch == e] = permute(pos[epoch == e], self.train.n, self._epoch_keys(int(e)))
        return ids

    def train_batch(self, step, micro):
        return self._batch(self.train, self.train_ids(step, micro))

    def val_batches(self, n):
        """n fixed micro-batches spread evenly over the val windows (the same ones at every evaluation)."""
        ids = np.linspace(0, self.val.n - 1, n * self.micro_batch).astype(np.int64)
        for i in range(n):
            yield self._batch(self.val, ids[i * self.micro_batch:(i + 1) * self.micro_batch])

    def unigram_entropy(self, max_tokens=10_000_000):
        """Entropy (nats/token) of the token frequencies in the first max_tokens of the train shards: the loss of the
        best model that ignores context. A trained model's val loss should end far below it."""
        counts = np.zeros(self.tokenizer["n_vocab"], dtype=np.int64)
        left = max_tokens
        for arr in self.train.arrays:
            counts += np.bincount(arr[:left], minlength=len(counts))
            left -= min(left, len(arr))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------------------------------
# Command line


def transcode(cmd, spec):
    """data.py encode / decode: stdin to stdout, a line at a time (a pipe sees each line as soon as it is done)."""
    from tokenizer import decode_lines, encode_lines, load_tokenizer
    enc = load_tokenizer(spec)[0]
    for line in (encode_lines if cmd == "encode" else decode_lines)(enc, sys.stdin):
        print(line, flush=True)


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
    r.add_argument("--tokenizer", required=True, help="a .tiktoken file from train-tokenizer, or gpt2 / p50k_base")
    r.add_argument("--out", required=True, help="output directory (an unfinished one of the same command resumes)")
    r.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    r.add_argument("--shard-mb", type=float, default=4096, help="input MB per shard (default 4096)")
    r.add_argument("--piece-mb", type=float, default=32, help="input MB per unit of work of a worker (default 32)")
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
    import prepare  # here, not above: train.py reads batches without loading the preparation code
    if args.cmd == "train-tokenizer":
        run_or_abort(lambda: prepare.train_tokenizer_cli(args.input, args.vocab_size, args.out, args.sample_mb,
                                                         args.min_chars, args.max_chars))
    else:
        run_or_abort(lambda: prepare.prepare(args.input, args.tokenizer, args.out, args.val_fraction,
                                             min_chars=args.min_chars, max_chars=args.max_chars,
                                             shard_mb=args.shard_mb, piece_mb=args.piece_mb,
                                             workers=args.workers))


if __name__ == "__main__":
    main()
