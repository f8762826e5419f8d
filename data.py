"""Text -> tokens -> memory-mapped uint16 shards -> batches.

    python data.py train-tokenizer --input asc22/ --vocab-size 53228 --out tok/asc22.tiktoken [--sample-mb 1024]
    python data.py prepare --input asc22/ --tokenizer tok/asc22.tiktoken --out data/asc22 [--workers 64]
    echo "话说天下大势" | python data.py encode --tokenizer tok/asc22.tiktoken | python data.py decode --tokenizer ...
    mpiexec -n 4 python data.py prepare ...      # several nodes share the files; the output is the same
    python data.py prepare ... --tokenizer yuan:Yuan-1.0/src/vocab.txt --format megatron   # for Megatron-LM too

Inputs are `.txt` files with one document per line (the ASC22 corpus writes in-document newlines as the literal
`<n>`), `.jsonl` files with a "text" field, or either one gzipped; a directory stands for the corpus files in it.
dataprep/tokenizer.py trains and loads the tokenizer; dataprep/prepare.py turns the corpus into shards (cleaning,
workers, resuming).
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
import json
import mmap
import os
import sys
import warnings

from runtime.errors import require

require("numpy")  # a clear hint when run outside .venv
import numpy as np

from runtime.errors import UserError
from runtime.mpi import run_or_abort  # not distributed.py: no torch for a data job
from dataprep.shards import META_VERSION, open_tokens

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
    """Token arrays (the shards of one split, or Megatron datasets) as a single grid of windows. Array k holds
    (n_k - 1) // seq_len windows of seq_len + 1 tokens (inputs and targets overlap by one token); window w of the grid
    is window w - start[k] of the array k that contains it. Sampling windows uniformly weights each array by its size.
    n_vocab: check each window's ids against it (Megatron data carries no tokenizer to check at open)."""

    def __init__(self, parts, seq_len, n_vocab=None, name=""):
        self.seq_len, self.n_vocab, self.name = seq_len, n_vocab, name
        self.maps, self.arrays = [m for m, _ in parts], [a for _, a in parts]
        self.per_shard = np.array([max(0, (len(a) - 1) // seq_len) for a in self.arrays], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.per_shard)])
        self.n = int(self.start[-1])  # windows in the grid
        if n_vocab is not None:
            for a in self.arrays:  # the first million ids at once; the rest as batches read them
                self.check(a[:1_000_000])

    def check(self, ids):
        bad = (ids >= self.n_vocab) | (ids < 0)
        if bad.any():
            raise UserError(f"{self.name} holds token id {int(ids[bad][0]):,}, at or above the vocabulary's "
                            f"{self.n_vocab:,} ids: it was prepared with another tokenizer.\nHINT: pass the "
                            f"--tokenizer (vocab.txt) the data was prepared with.")

    def windows(self, ids):
        """Stack windows `ids` (indices into the grid) into an int64 array [len(ids), seq_len + 1]."""
        shard = np.searchsorted(self.start, ids, side="right") - 1
        offsets = (ids - self.start[shard]) * self.seq_len
        w = np.stack([self.arrays[k][o:o + self.seq_len + 1] for k, o in zip(shard, offsets)]).astype(np.int64)
        if self.n_vocab is not None:
            self.check(w)
        return w

    def release(self):
        """Drop the pages this process has touched from its resident set (they stay in the OS page cache). Without
        this, a long run's RSS climbs towards the size of every shard it has read, though no memory leaks."""
        for mm in self.maps:
            if mm is not None and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)


def apportion(weights, n):
    """n split into integer counts in proportion to weights (summing to 1): floors, then the largest remainders."""
    counts = np.floor(weights * n).astype(np.int64)
    counts[np.argsort(-(weights * n - counts), kind="stable")[:n - counts.sum()]] += 1
    return counts


class Blend:
    """Grids drawn with fixed probabilities (Megatron's weighted --data-path). Position g of the endless training
    stream belongs to one grid by a fixed schedule that repeats every PERIOD positions: grid i takes count_i =
    weight_i * PERIOD of them (rounded), spread evenly (the k-th near (k + 1/2) / count_i of the period). Grid i's own
    positions then run through its own permuted epochs. Everything is a function of g, as for a single grid."""

    PERIOD = 1 << 16

    def __init__(self, grids, weights, names):
        self.grids = grids
        if len(grids) == 1:
            self.counts, self.owner, self.rank = np.array([1]), np.zeros(1, np.int64), np.zeros(1, np.int64)
            self.weights = np.ones(1)
            return
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        counts = apportion(w, self.PERIOD)
        if (counts == 0).any():
            raise UserError(f"blend weight of {names[int(np.argmin(counts))]} is below 1/{self.PERIOD:,} of the "
                            f"total: it would never be drawn.\nHINT: raise it, or leave that dataset out.")
        times = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
        order = np.argsort(times, kind="stable")
        self.owner = np.repeat(np.arange(len(grids)), counts)[order]
        self.rank = np.concatenate([np.arange(c) for c in counts])[order]
        self.counts, self.weights = counts, w

    def locate(self, g):
        """Positions g of the stream -> (grid of each, position in that grid's own stream of epochs)."""
        period, r = np.divmod(g, len(self.owner))
        grid = self.owner[r]
        return grid, period * self.counts[grid] + self.rank[r]

    def windows(self, grid, ids):
        w = np.empty((len(ids), self.grids[0].seq_len + 1), dtype=np.int64)
        for i in np.unique(grid):
            w[grid == i] = self.grids[i].windows(ids[grid == i])
        return w

    def spread(self, n):
        """n (grid, window) pairs spread evenly over the grids, in proportion to their weights: validation."""
        counts = apportion(self.weights, n)
        grid = np.repeat(np.arange(len(self.grids)), counts)
        ids = np.concatenate([np.linspace(0, g.n - 1, c).astype(np.int64) for g, c in zip(self.grids, counts)])
        return grid, ids

    def release(self):
        for g in self.grids:
            g.release()


def open_megatron(spec, seq_len, n_vocab, val_fraction=None):
    """A Megatron prefix or blend (indexed.parse_blend) -> (train Blend, val Blend or None). With val_fraction,
    the last ceil(fraction * sequences) sequences of each prefix are held out for validation."""
    from dataprep.indexed import open_indexed, parse_blend
    blend = parse_blend(spec)
    train, val = [], []
    for _, prefix in blend:
        mm, ids, sizes = open_indexed(prefix)
        if val_fraction is None:
            train.append((prefix, [(mm, ids)]))
            continue
        held = int(np.ceil(val_fraction * len(sizes)))
        if not 0 < held < len(sizes):
            raise UserError(f"{prefix} holds {len(sizes):,} sequences: too few to hold out a fraction {val_fraction} "
                            f"of them for validation.\nHINT: give --val_data PREFIX, or more data.")
        cut = int(sizes[:len(sizes) - held].sum(dtype=np.int64))
        train.append((prefix, [(mm, ids[:cut])]))
        val.append((prefix, [(None, ids[cut:])]))

    def make(parts):
        if blend[0][0] is None:  # no weights: one grid over all, by size (as the shards of a prepared directory)
            return Blend([TokenShards([p for _, ps in parts for p in ps], seq_len, n_vocab, spec)], None, [spec])
        return Blend([TokenShards(ps, seq_len, n_vocab, prefix) for prefix, ps in parts], [w for w, _ in blend],
                     [prefix for prefix, _ in parts])
    return make(train), make(val) if val else None


class Batches:
    """Training and validation batches from a prepared directory, a Megatron dataset prefix, or a blend of them.

    Training reads the train split as epochs: epoch e is a pseudo-random permutation (seeded by seed, e) of all its
    windows, and the step's global batch takes the next step_windows of them. Data-parallel rank r, micro-batch m
    takes the slice (m * dp + r) of that global batch, so ranks never share a window, the global batch of a step
    does not depend on how it is split across ranks, and a resumed run reads exactly what the uninterrupted run
    would have read: the position is a pure function of (seed, step). A weighted blend (class Blend) first sends each
    position to one dataset, whose own positions then run through its own epochs in the same way.

    data: DIR (data.py prepare's output, either --format), or Megatron's --data-path: PREFIX, or "W1 PREFIX1 W2
    PREFIX2 ...". A Megatron dataset does not record its tokenizer: `tokenizer` (a spec, e.g. yuan:vocab.txt) says
    it. Its validation data is val_data (a prefix or blend), else the last val_fraction of each prefix's sequences.

    pin_memory: return x and y as contiguous tensors in page-locked (pinned) memory, so that the trainer's
    x.to(device, non_blocking=True) is an asynchronous copy that overlaps with the GPU's work (from ordinary memory
    it waits for the copy; so does a non-contiguous source, which ATen first copies to ordinary memory). Each batch
    gets fresh pinned tensors: torch's pinned-memory cache does not hand a block out again until the copies that
    read it have finished, so no batch can overwrite one still in flight. A reused buffer would save nothing that
    matters (a micro-batch of yuan-4.7b is 16 KB of ids) and would need an event per copy to be safe. Where torch
    sees no CUDA device there is no pinned memory: the option is then ignored with a warning."""

    RELEASE_EVERY = 32  # batches between TokenShards.release() calls

    def __init__(self, data, seq_len, micro_batch, seed, rank=0, dp=1, accum=1, pin_memory=False, tokenizer=None,
                 val_data=None, val_fraction=0.01):
        self.seq_len, self.micro_batch, self.seed, self.rank, self.dp = seq_len, micro_batch, seed, rank, dp
        self.step_windows = micro_batch * accum * dp
        if os.path.isdir(data):
            self._open_prepared(data, tokenizer, val_data)
        else:
            self._open_megatron(data, tokenizer, val_data, val_fraction)
        for split, part in (("train", self.train), ("val", self.val)):
            for g in part.grids:
                if g.n == 0:
                    raise UserError(f"the {split} data {g.name} holds no window of seq_len + 1 = {seq_len + 1:,} "
                                    f"tokens (largest array: {max(len(a) for a in g.arrays):,} tokens).\n"
                                    f"HINT: lower --seq_len, or prepare more text (or a larger validation share).")
        self.calls = 0
        self._keys = {}
        self.pin_memory = pin_memory
        if pin_memory:
            import torch  # not at the top: see _batch
            if not torch.cuda.is_available():
                warnings.warn("Batches(pin_memory=True): torch sees no CUDA device, so there is no pinned memory; "
                              "batches stay in ordinary memory.")
                self.pin_memory = False

    def _open_prepared(self, data_dir, spec, val_data):
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
        if val_data is not None:
            raise UserError(f"--val_data is for Megatron datasets; {data_dir} has its own val split.")
        self.tokenizer = tok = self.meta["tokenizer"]
        if spec is not None:
            from dataprep.tokenizer import load_tokenizer
            if load_tokenizer(spec)[1]["hash"] != tok["hash"]:
                raise UserError(f"--tokenizer {spec} is not the tokenizer {data_dir} was prepared with "
                                f"({tok['name']}).\nHINT: drop --tokenizer: the directory carries its own.")
        from dataprep.tokenizer import copy_spec
        self.tokenizer_spec = copy_spec(data_dir, tok)
        megatron = self.meta.get("format") == "megatron"
        self.train, self.val = (Blend([self._grid(data_dir, split, megatron)], None, [data_dir])
                                for split in ("train", "val"))

    def _grid(self, data_dir, split, megatron):
        tok, parts = self.tokenizer, []
        for s in self.meta["shards"]:
            path = os.path.join(data_dir, s[split])
            if megatron:
                from dataprep.indexed import open_indexed
                mm, ids, _ = open_indexed(path)
                if len(ids) != s[split + "_tokens"]:
                    raise UserError(f"{path}.bin holds {len(ids):,} tokens but meta.json says "
                                    f"{s[split + '_tokens']:,}: the file was replaced or cut.\nHINT: re-run "
                                    f"data.py prepare into a fresh directory.")
                parts.append((mm, ids))
            else:
                parts.append(open_tokens(path, tok["n_vocab"], tok["hash"], s[split + "_tokens"]))
        return TokenShards(parts, self.seq_len, tok["n_vocab"] if megatron else None, f"{data_dir} ({split})")

    def _open_megatron(self, data, spec, val_data, val_fraction):
        from dataprep.indexed import parse_blend
        if os.path.isfile(data):
            stem = os.path.splitext(os.path.basename(data))[0]
            raise UserError(f"--data {data} is a text file, not prepared data: train.py reads the tokens data.py "
                            f"prepare makes from it.\nHINT: python data.py prepare --input {data} --tokenizer TOK "
                            f"--out data/{stem}, then --data data/{stem}.")
        for _, prefix in parse_blend(data):
            if not os.path.isfile(prefix + ".idx"):
                raise UserError(f"--data {data}: {prefix} is neither a prepared data directory (data.py prepare's "
                                f"--out) nor a Megatron dataset ({prefix}.idx not found).\nHINT: python data.py "
                                f"prepare --input FILES --tokenizer TOK --out DIR, then --data DIR; or give a "
                                f"Megatron prefix (PATH without .bin / .idx).")
        if spec is None:
            raise UserError(f"--data {data!r} is not a prepared directory, so it is read as a Megatron dataset "
                            f"(PREFIX.bin + PREFIX.idx, or a blend), and those do not record their tokenizer.\n"
                            f"HINT: add --tokenizer yuan:PATH/vocab.txt (or bert:..., or the .tiktoken) that "
                            f"prepared it.")
        from dataprep.tokenizer import load_tokenizer
        self.tokenizer, self.tokenizer_spec, self.meta = load_tokenizer(spec)[1], spec, None
        n_vocab = self.tokenizer["n_vocab"]
        if val_data is None:
            if not 0 < val_fraction < 1:
                raise UserError(f"--val_fraction {val_fraction} must be between 0 and 1 (exclusive).")
            self.train, self.val = open_megatron(data, self.seq_len, n_vocab, val_fraction)
        else:
            self.train = open_megatron(data, self.seq_len, n_vocab)[0]
            self.val = open_megatron(val_data, self.seq_len, n_vocab)[0]

    def _epoch_keys(self, grid, epoch):
        key = (grid, epoch)
        if key not in self._keys:
            if len(self._keys) > 64:
                self._keys = {}
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
    """data.py encode / decode: stdin to stdout, a line at a time (a pipe sees each line as soon as it is done)."""
    from dataprep.tokenizer import decode_lines, encode_lines, load_tokenizer
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
