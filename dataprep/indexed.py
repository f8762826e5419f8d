"""Megatron-LM's indexed dataset ("mmap" format), read and written. ASC22 teams produced their data in it (Inspur's
src/tools/preprocess_data_cn.py in Yuan-1.0, Megatron's tools/preprocess_data.py); data.py trains on it as it is,
memory-mapped, and `data.py prepare --format megatron` writes it so that Megatron-LM can train on our tokens.

    PREFIX.bin   the token ids of every sequence, back to back, in the dtype the .idx names
    PREFIX.idx   little-endian, as Megatron-LM's megatron/core/datasets/indexed_dataset.py writes it:
                   9 bytes    b"MMIDIDX\\x00\\x00"
                   uint64     version, 1
                   uint8      dtype code of the .bin's ids (DTYPES below)
                   uint64     S, the number of sequences ("items")
                   uint64     D, the number of document-index entries
                   int32[S]   sizes: ids in each sequence
                   int64[S]   pointers: byte offset of each sequence in the .bin
                   int64[D]   document index: 0, then the sequence number at which each document ends

Megatron's preprocess_data.py writes one sequence per document (D = S + 1); Inspur's preprocess_data_cn.py writes one
sequence per document and never closes a document (D = 1). Either way the .bin is one stream of ids with <eod> after
each document, which is all that training reads; held-out validation is cut at sequence boundaries.
"""
import mmap
import os
import struct

import numpy as np

from runtime.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}  # 6, 7: floats, not ids
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
FIX = "\nHINT: re-create it with Megatron's preprocess_data.py or `python data.py prepare --format megatron`."


def best_dtype(n_vocab):
    """The dtype Megatron picks for a vocabulary (DType.optimal_dtype): uint16 below 65,500 ids, else int32."""
    return np.uint16 if n_vocab < 65500 else np.int32


def read_index(prefix):
    """(dtype, sizes int32[S], pointers int64[S], doc_idx int64[D]) of PREFIX.idx, checked against its own length
    and against PREFIX.bin's. Megatron's reader checks only the magic and the version."""
    path = prefix + ".idx"
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: {prefix} is not a Megatron dataset (PREFIX.bin + PREFIX.idx).\nHINT: pass "
                        f"the path without .bin / .idx, as Megatron's --data-path takes it.")
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < HEAD.size or raw[:9] != MAGIC:
        raise UserError(f"{path} is not a Megatron mmap index: its first bytes are {raw[:9]!r}, not {MAGIC!r}"
                        + (" (the older 'TNTIDX' lazy/cached format is not read)" if raw[:6] == b"TNTIDX" else "")
                        + "." + FIX)
    _, version, code, s, d = HEAD.unpack_from(raw)
    if version != 1:
        raise UserError(f"{path} has index version {version}; Megatron (and this reader) know version 1." + FIX)
    if code not in DTYPES:
        raise UserError(f"{path} stores its ids as dtype code {code}, which is not an integer type Megatron writes "
                        f"(1-5, 8)." + FIX)
    want = HEAD.size + 12 * s + 8 * d
    if len(raw) != want:
        raise UserError(f"{path} is {'truncated' if len(raw) < want else 'longer than its header says'}: "
                        f"{s:,} sequences and {d:,} document entries need {want:,} bytes, the file has "
                        f"{len(raw):,}." + FIX)
    dtype = np.dtype(DTYPES[code])
    sizes = np.frombuffer(raw, np.int32, s, HEAD.size)
    pointers = np.frombuffer(raw, np.int64, s, HEAD.size + 4 * s)
    doc_idx = np.frombuffer(raw, np.int64, d, HEAD.size + 12 * s)
    expect = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]) * dtype.itemsize
    if (sizes < 0).any() or not np.array_equal(pointers, expect):
        raise UserError(f"{path} is damaged: its pointers are not the running sum of its sizes." + FIX)
    n_bytes = int(sizes.sum(dtype=np.int64)) * dtype.itemsize
    bin_path = prefix + ".bin"
    if not os.path.isfile(bin_path):
        raise UserError(f"{bin_path} not found beside {path}." + FIX)
    if os.path.getsize(bin_path) != n_bytes:
        raise UserError(f"{bin_path} holds {os.path.getsize(bin_path):,} bytes; its index describes "
                        f"{n_bytes:,} ({n_bytes // dtype.itemsize:,} {dtype.name} ids): one of the two is truncated "
                        f"or belongs to another dataset." + FIX)
    return dtype, sizes, pointers, doc_idx


def open_indexed(prefix):
    """(mmap or None, ids, sizes): the whole .bin as one read-only array of ids, without copying, and the sequence
    sizes (the reader cuts held-out validation at their boundaries)."""
    dtype, sizes, _, _ = read_index(prefix)
    if sizes.sum() == 0:
        return None, np.zeros(0, dtype), sizes
    with open(prefix + ".bin", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, np.frombuffer(mm, dtype), sizes


class IndexedWriter:
    """Writes PREFIX.bin and PREFIX.idx, one sequence per document and each its own document, as Megatron's
    preprocess_data.py does. Both are written under .tmp names and renamed on close(), the .idx last: a crash never
    leaves a dataset under its final name that looks complete but is not. An existing dataset is never replaced."""

    def __init__(self, prefix, dtype):
        for ext in (".bin", ".idx"):
            if os.path.exists(prefix + ext):
                raise UserError(f"{prefix}{ext} exists; it is not overwritten.\nHINT: choose another prefix or "
                                f"delete it.")
        self.prefix, self.dtype, self.sizes = prefix, np.dtype(dtype), []
        self.f = open(prefix + ".bin.tmp", "wb")

    def add_document(self, ids):
        self.add_documents(ids, [len(ids)])

    def add_documents(self, ids, lengths):
        """Documents back to back in `ids`, lengths[i] ids each."""
        assert sum(lengths) == len(ids)
        self.f.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self.sizes.extend(int(n) for n in lengths)

    def close(self):
        sizes = np.array(self.sizes, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]).astype(np.int64) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(self.prefix + ".idx.tmp", "wb") as f:
            f.write(HEAD.pack(MAGIC, 1, CODES[self.dtype], len(sizes), len(doc_idx)))
            for a in (sizes, pointers[:len(sizes)], doc_idx):
                f.write(a.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.f.flush()
        os.fsync(self.f.fileno())  # on disk before the renames, so a power cut cannot leave a renamed hole
        self.f.close()
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")  # last: the dataset now exists
        return int(sizes.sum(dtype=np.int64))


def parse_blend(spec):
    """Megatron's --data-path: 'PREFIX', 'PREFIX1 PREFIX2 ...' (sampled in proportion to their sizes) or
    'W1 PREFIX1 W2 PREFIX2 ...' (sampled with probabilities W / sum W). Returns [(weight or None, prefix)]."""
    items = spec.split()
    if not items:
        raise UserError("the data path is empty.")

    def number(s):
        try:
            return float(s)
        except ValueError:
            return None
    if all(number(s) is None for s in items):
        return [(None, p) for p in items]
    if len(items) % 2:
        raise UserError(f"blend {spec!r} has {len(items)} items; a weighted blend is pairs 'WEIGHT PREFIX ...'.\n"
                        f"HINT: e.g. --data \"0.7 data/zh_text_document 0.3 data/en_text_document\".")
    pairs = []
    for w, p in zip(items[::2], items[1::2]):
        x = number(w)
        if x is None or not np.isfinite(x) or x <= 0:
            raise UserError(f"blend {spec!r}: the weight {w!r} (before {p}) is not a positive number.\nHINT: a "
                            f"weighted blend is pairs 'WEIGHT PREFIX ...' with every weight > 0.")
        pairs.append((x, p))
    return pairs
