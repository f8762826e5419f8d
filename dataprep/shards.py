"""The token shard format, shared by the writer (dataprep/prepare.py) and the reader (dataprep/windows.py), which
import it; it imports neither. A shard is a 64-byte header (HEADER) followed by uint16 token ids:

    magic "NYUANTOK", format version, vocabulary size, token count, the tokenizer's hash (16 bytes), zero padding

The header is checked against the file's size, the tokenizer and meta.json's count before a single id is read.
"""
import mmap
import os
import struct

import numpy as np

from runtime.errors import UserError

MAGIC, VERSION = b"NYUANTOK", 1
HEADER = struct.Struct("<8sIIQ16s")  # magic, format version, vocab size, token count, tokenizer hash (16 bytes)
HEADER_BYTES = 64  # HEADER padded with zeros, so the token array starts aligned
META_VERSION = 2  # meta.json layout: 2 = numbered shards (1 was a single train.bin / val.bin)

class TokenWriter:
    """Appends uint16 arrays to path.tmp and renames it to path on close(): a crash never leaves a file under the
    final name that looks complete but is not."""

    def __init__(self, path, n_vocab, tok_hash):
        self.path, self.n_vocab, self.tok_hash, self.count = path, n_vocab, tok_hash, 0
        self.f = open(path + ".tmp", "wb")
        self.f.write(b"\0" * HEADER_BYTES)

    def write(self, ids):
        self.f.write(np.asarray(ids, dtype=np.uint16).tobytes())
        self.count += len(ids)

    def close(self):
        self.f.seek(0)
        self.f.write(HEADER.pack(MAGIC, VERSION, self.n_vocab, self.count, bytes.fromhex(self.tok_hash)[:16]))
        self.f.flush()
        os.fsync(self.f.fileno())  # on disk before the rename, so a power cut cannot leave a renamed hole
        self.f.close()
        os.replace(self.path + ".tmp", self.path)
        return self.count


def write_tokens(path, arrays, n_vocab, tok_hash):
    w = TokenWriter(path, n_vocab, tok_hash)
    for a in arrays:
        w.write(a)
    return w.close()


def read_header(path, n_vocab=None, tok_hash=None, count=None):
    """Check a token file's header against the file size and, if given, the expected tokenizer and token count.
    Returns the token count."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found.\nHINT: run `python data.py prepare ... --out {os.path.dirname(path)}`.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if size < HEADER_BYTES or head[:8] != MAGIC:
        raise UserError(f"{path} is not a nanoyuan token file (bad magic).\nHINT: re-create it with data.py prepare.")
    _, version, vocab, n, h = HEADER.unpack(head)
    if version != VERSION:
        raise UserError(f"{path} has format version {version}; this code reads version {VERSION}.\n"
                        f"HINT: re-run data.py prepare with this version of the code.")
    if size != HEADER_BYTES + 2 * n:
        raise UserError(f"{path} is truncated or corrupt: header says {n:,} tokens = {HEADER_BYTES + 2 * n:,} "
                        f"bytes, file has {size:,}.\nHINT: re-run data.py prepare into a fresh directory.")
    if n_vocab is not None and (vocab != n_vocab or (tok_hash and h != bytes.fromhex(tok_hash)[:16])):
        raise UserError(f"{path} was written with a different tokenizer (vocab {vocab:,}) than meta.json's "
                        f"(vocab {n_vocab:,}).\nHINT: re-run data.py prepare into a fresh directory.")
    if count is not None and n != count:
        raise UserError(f"{path} holds {n:,} tokens but meta.json says {count:,}: the file was replaced or cut.\n"
                        f"HINT: re-run data.py prepare into a fresh directory.")
    return n


def open_tokens(path, n_vocab=None, tok_hash=None, count=None):
    """Memory-map a token file after read_header's checks (a numpy view of an mmap object: see TokenShards.release in
    windows.py)."""
    n = read_header(path, n_vocab, tok_hash, count)
    if n == 0:
        return None, np.zeros(0, dtype=np.uint16)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the mapping outlives the file object
    return mm, np.frombuffer(mm, dtype=np.uint16, offset=HEADER_BYTES, count=n)
