"""Opening what train.py --data names, as grids of windows for data.py's Batches to sample: a prepared directory
(either --format), a Megatron-LM dataset PREFIX, or a weighted blend "W1 PREFIX1 W2 PREFIX2 ...". Every check of the
data (meta.json, the tokenizer, the token counts, enough tokens for one window) happens here, at open, so a
mistake is an error naming the file before training starts.

    TokenShards   one split's token arrays as one grid of windows of seq_len + 1 tokens
    Blend         grids drawn with fixed probabilities (a single grid is a blend of one)
    open_windows  --data (and --tokenizer, --val_data, --val_fraction) -> the train and val Blends
"""
import json
import mmap
import os

import numpy as np

from runtime.errors import UserError
from dataprep.shards import META_VERSION, open_tokens


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


def open_windows(data, seq_len, tokenizer=None, val_data=None, val_fraction=0.01):
    """What Batches reads: (train Blend, val Blend, the tokenizer's identity {kind, name, hash, n_vocab, eot}, the
    tokenizer spec that loads it, meta.json or None). data, tokenizer, val_data, val_fraction: see Batches."""
    if os.path.isdir(data):
        opened = open_prepared(data, seq_len, tokenizer, val_data)
    else:
        opened = open_megatron_data(data, seq_len, tokenizer, val_data, val_fraction)
    for split, part in zip(("train", "val"), opened[:2]):
        for g in part.grids:
            if g.n == 0:
                raise UserError(f"the {split} data {g.name} holds no window of seq_len + 1 = {seq_len + 1:,} "
                                f"tokens (largest array: {max(len(a) for a in g.arrays):,} tokens).\n"
                                f"HINT: lower --seq_len, or prepare more text (or a larger validation share).")
    return opened


def open_prepared(data_dir, seq_len, spec, val_data):
    """A directory of data.py prepare's (either --format): meta.json checked, then each split as one grid."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{meta_path} not found: {data_dir} is not a prepared data directory (or its prepare "
                        f"has not finished).\nHINT: python data.py prepare --input FILES --tokenizer TOK "
                        f"--out {data_dir}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        raise UserError(f"{meta_path} cannot be read as JSON ({e}): the directory's description is damaged.\n"
                        f"HINT: re-run the same data.py prepare command into a fresh --out.") from None
    if meta.get("format_version") != META_VERSION:
        raise UserError(f"{meta_path} has layout version {meta.get('format_version')}; this code reads "
                        f"{META_VERSION}.\nHINT: re-run data.py prepare into a fresh directory.")
    if val_data is not None:
        raise UserError(f"--val_data is for Megatron datasets; {data_dir} has its own val split.")
    tok = meta["tokenizer"]
    from dataprep.tokenizer import copy_spec, load_tokenizer
    if spec is not None and load_tokenizer(spec)[1]["hash"] != tok["hash"]:
        raise UserError(f"--tokenizer {spec} is not the tokenizer {data_dir} was prepared with "
                        f"({tok['name']}).\nHINT: drop --tokenizer: the directory carries its own.")
    tokenizer_spec = copy_spec(data_dir, tok)
    train, val = (Blend([prepared_grid(data_dir, meta, split, seq_len)], None, [data_dir])
                  for split in ("train", "val"))
    return train, val, tok, tokenizer_spec, meta


def prepared_grid(data_dir, meta, split, seq_len):
    """The shards of one split ("train" or "val") of a prepared directory, each checked against meta.json."""
    tok, parts = meta["tokenizer"], []
    megatron = meta.get("format") == "megatron"
    for s in meta["shards"]:
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
    return TokenShards(parts, seq_len, tok["n_vocab"] if megatron else None, f"{data_dir} ({split})")


def open_megatron_data(data, seq_len, spec, val_data, val_fraction):
    """Megatron's --data-path (a PREFIX or a blend), after the checks that tell it from a typo or a text file; its
    validation data is val_data, else the last val_fraction of each prefix's sequences."""
    from dataprep.indexed import parse_blend
    if os.path.isfile(data):
        megatron_half(data, data)
        stem = os.path.splitext(os.path.basename(data))[0]
        raise UserError(f"--data {data} is a text file, not prepared data: train.py reads the tokens data.py "
                        f"prepare makes from it.\nHINT: python data.py prepare --input {data} --tokenizer TOK "
                        f"--out data/{stem}, then --data data/{stem}.")
    for _, prefix in parse_blend(data):
        if not os.path.isfile(prefix + ".idx"):
            megatron_half(data, prefix)
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
    tok = load_tokenizer(spec)[1]
    if val_data is None:
        if not 0 < val_fraction < 1:
            raise UserError(f"--val_fraction {val_fraction} must be between 0 and 1 (exclusive).")
        train, val = open_megatron(data, seq_len, tok["n_vocab"], val_fraction)
    else:
        train = open_megatron(data, seq_len, tok["n_vocab"])[0]
        val = open_megatron(val_data, seq_len, tok["n_vocab"])[0]
    return train, val, tok, spec, None


def megatron_half(data, path):
    """The error for a --data (or one prefix of a blend) that names PREFIX.bin or PREFIX.idx, one file of a Megatron
    dataset, where Megatron's --data-path (and ours) takes the PREFIX; it says which of the pair is missing."""
    prefix, ext = os.path.splitext(path)
    if ext not in (".bin", ".idx") or not os.path.isfile(path):
        return
    partner = prefix + (".idx" if ext == ".bin" else ".bin")
    fix = f"--data {prefix}" if data == path else f"write {prefix} for {path} in --data"
    if not os.path.isfile(partner):
        fix = f"copy {os.path.basename(partner)} from where the data was made to {os.path.dirname(partner) or '.'}" \
              f", then {fix}"
    raise UserError(f"--data {data}: {path} is one file of a Megatron indexed dataset (a .bin/.idx pair of tokens); "
                    f"--data takes the dataset's prefix, the path without .bin / .idx, as Megatron's --data-path does."
                    + ("" if os.path.isfile(partner) else f" Its partner {partner} is missing: both files must sit "
                       f"side by side.") + f"\nHINT: {fix}; with it --tokenizer the vocab.txt that made the data "
                    f"(e.g. yuan:PATH/vocab.txt).")


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
