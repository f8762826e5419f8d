"""Megatron-LM indexed datasets (dataprep/indexed.py) and training on them (data.Batches).
tests/data/indexed_*.{bin,idx} were written by the references' own builders (bench/megatron_reference_check.py
--write-test-data, bench/RESULTS.md): Megatron-LM's megatron/core/datasets/indexed_dataset.py, one document per
sequence, and Yuan-1.0's copy the way Inspur's preprocess_data_cn.py calls it (documents never closed: document
index [0]); the sequences are in tests/data/indexed_docs.json."""
import json
import os
import struct

import numpy as np
import pytest

from conftest import ROOT, SMALL, read_metrics, run
from data import Batches
from runtime.errors import UserError
from dataprep.indexed import IndexedWriter, open_indexed, parse_blend, read_index

DATA = os.path.join(ROOT, "tests", "data")
DOCS = json.load(open(os.path.join(DATA, "indexed_docs.json")))


def handmade(prefix, docs, code=8, dtype=np.uint16, doc_idx=None):
    """A dataset packed by hand from the byte layout in dataprep/indexed.py's docstring."""
    sizes = [len(d) for d in docs]
    pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * np.dtype(dtype).itemsize
    doc_idx = list(range(len(docs) + 1)) if doc_idx is None else doc_idx
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(sizes), len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))
    with open(prefix + ".bin", "wb") as f:
        f.write(np.concatenate(docs).astype(dtype).tobytes())
    return prefix


def sequences(prefix):
    _, ids, sizes = open_indexed(prefix)
    return [a.tolist() for a in np.split(np.array(ids), np.cumsum(sizes)[:-1])]


def test_reads_the_documented_layout(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10]]
    for code, dtype in ((8, np.uint16), (4, np.int32), (5, np.int64), (1, np.uint8)):
        p = handmade(str(tmp_path / f"d{code}"), docs, code, dtype, doc_idx=[0, 2, 3])
        got_dtype, sizes, pointers, doc_idx = read_index(p)
        assert got_dtype == np.dtype(dtype) and sizes.tolist() == [3, 1, 2] and doc_idx.tolist() == [0, 2, 3]
        assert pointers.tolist() == [0, 3 * got_dtype.itemsize, 4 * got_dtype.itemsize]
        assert sequences(p) == docs


@pytest.mark.parametrize("name", ["indexed_megatron_uint16", "indexed_megatron_int32", "indexed_yuan_uint16_unclosed"])
def test_reads_what_the_references_wrote(name, tmp_path):
    prefix = os.path.join(DATA, name)
    assert sequences(prefix) == DOCS
    dtype, _, _, doc_idx = read_index(prefix)
    assert doc_idx.tolist() == ([0] if "unclosed" in name else list(range(len(DOCS) + 1)))
    if "unclosed" not in name:  # one document per sequence: our writer gives the same bytes
        w = IndexedWriter(str(tmp_path / "again"), dtype)
        for d in DOCS:
            w.add_document(d)
        assert w.close() == sum(map(len, DOCS))
        for ext in (".bin", ".idx"):
            assert open(prefix + ext, "rb").read() == open(str(tmp_path / "again") + ext, "rb").read()


def test_written_and_read_back_is_byte_identical(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 53_248, rng.integers(1, 500)) for _ in range(50)]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    w = IndexedWriter(a, np.uint16)
    w.add_documents(np.concatenate(docs), [len(d) for d in docs])
    w.close()
    w = IndexedWriter(b, read_index(a)[0])
    for s in sequences(a):
        w.add_document(s)
    w.close()
    for ext in (".bin", ".idx"):
        assert open(a + ext, "rb").read() == open(b + ext, "rb").read()
    with pytest.raises(UserError, match="not overwritten"):
        IndexedWriter(a, np.uint16)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(p + ".idx", "r+b").write(b"NOTANIDX!"), "is not a Megatron mmap index"),
    (lambda p: open(p + ".idx", "r+b").truncate(60), "is truncated"),
    (lambda p: open(p + ".idx", "ab").write(b"\0" * 8), "longer than its header says"),
    (lambda p: open(p + ".bin", "r+b").truncate(6), "one of the two is truncated"),
    (lambda p: os.remove(p + ".bin"), "not found beside"),
    (lambda p: os.remove(p + ".idx"), "is not a Megatron dataset"),
    (lambda p: open(p + ".idx", "r+b").write(b"MMIDIDX\x00\x00" + struct.pack("<QB", 1, 7)), "dtype code 7"),
    (lambda p: open(p + ".idx", "r+b").write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 2)), "index version 2"),
])
def test_damaged_dataset_is_a_clean_error(tmp_path, damage, message):
    p = handmade(str(tmp_path / "d"), [[1, 2, 3], [4, 5]])
    damage(p)
    with pytest.raises(UserError, match=message):
        read_index(p)


def test_blend_parsing():
    assert parse_blend("a") == [(None, "a")]
    assert parse_blend("a b") == [(None, "a"), (None, "b")]
    assert parse_blend(" 0.7 a 3e-1 b ") == [(0.7, "a"), (0.3, "b")]
    for bad in ("0 a 1 b", "-1 a", "0.5 a nan b", "0.5 a x b"):
        with pytest.raises(UserError, match="is not a positive number"):
            parse_blend(bad)
    with pytest.raises(UserError, match="is pairs"):
        parse_blend("0.5 a 0.5")


def stream(tmp_path, name, n, seed, lo=0, hi=500):
    """A dataset of n tokens in documents of 1-99 tokens."""
    rng = np.random.default_rng(seed)
    w = IndexedWriter(str(tmp_path / name), np.uint16)
    left = n
    while left:
        k = min(left, int(rng.integers(1, 100)))
        w.add_document(rng.integers(lo, hi, k))
        left -= k
    w.close()
    return str(tmp_path / name)


def test_blend_draws_by_weight_and_keeps_the_reader_guarantees(tmp_path, tokenizer):
    """Weighted blend: each dataset's share of the windows is its weight; a step's global batch does not depend on
    the data-parallel layout, ranks never share a window, and each dataset is read through whole epochs."""
    a = stream(tmp_path, "a", 16 * 300 + 1, 0, 0, 250)  # ids below 250 / above 250 tell the datasets apart
    b = stream(tmp_path, "b", 16 * 100 + 1, 1, 250, 500)
    spec = f"3 {a} 1 {b}"
    one = Batches(spec, 16, 4, seed=5, accum=4, tokenizer=tokenizer, val_data=spec)
    ranks = [Batches(spec, 16, 4, seed=5, rank=r, dp=4, tokenizer=tokenizer, val_data=spec) for r in range(4)]
    seen = {0: [], 1: []}
    for step in range(25):  # 400 windows: 300 of a (one epoch of 300), 100 of b (one epoch of 100)
        glob = [one.train_ids(step, m) for m in range(4)]
        per_rank = [r.train_ids(step, 0) for r in ranks]
        assert all((g[0] == r[0]).all() and (g[1] == r[1]).all() for g, r in zip(glob, per_rank))
        for grid, ids in glob:
            for g, i in zip(grid, ids):
                seen[int(g)].append(int(i))
    assert sorted(seen[0]) == list(range(300)) and sorted(seen[1]) == list(range(100))
    x, _ = one.train_batch(3, 1)
    assert x.shape == (4, 16) and x.equal(ranks[1].train_batch(3, 0)[0])
    assert x.equal(Batches(spec, 16, 4, seed=5, accum=4, tokenizer=tokenizer, val_data=spec).train_batch(3, 1)[0])
    vals = [v for v, _ in one.val_batches(4)]  # 16 windows, 12 from a and 4 from b
    assert sum(int((v < 250).all(dim=1).sum()) for v in vals) == 12


def test_held_out_validation_and_unweighted_prefixes(tmp_path, tokenizer):
    """Without --val_data the last ceil(fraction * sequences) sequences of each prefix are validation."""
    a = stream(tmp_path, "a", 5000, 2)
    _, ids, sizes = open_indexed(a)
    b = Batches(a, 16, 2, 0, tokenizer=tokenizer, val_fraction=0.1)
    held = int(np.ceil(0.1 * len(sizes)))
    cut = int(sizes[:-held].sum())
    assert np.array_equal(b.train.grids[0].arrays[0], ids[:cut]) and np.array_equal(b.val.grids[0].arrays[0], ids[cut:])
    two = Batches(f"{a} {stream(tmp_path, 'b', 3000, 3)}", 16, 2, 0, tokenizer=tokenizer)
    assert len(two.train.grids) == 1 and len(two.train.grids[0].arrays) == 2  # one grid, weighted by size


def test_megatron_data_mistakes_are_clean_errors(tmp_path, tokenizer):
    good = stream(tmp_path, "good", 3000, 0, 0, 512)
    with pytest.raises(UserError, match="do not record their tokenizer"):
        Batches(good, 16, 2, 0)
    with pytest.raises(UserError, match="nor a Megatron dataset"):
        Batches(str(tmp_path / "typo"), 16, 2, 0, tokenizer=tokenizer)
    high = stream(tmp_path, "high", 3000, 0, 0, 1000)  # ids up to 999; the tokenizer has 512
    with pytest.raises(UserError, match="at or above the vocabulary's 512 ids"):
        Batches(high, 16, 2, 0, tokenizer=tokenizer)
    with pytest.raises(UserError, match="too few to hold out"):
        Batches(handmade(str(tmp_path / "one"), [list(range(100))]), 16, 2, 0, tokenizer=tokenizer)
    with pytest.raises(UserError, match="would never be drawn"):
        Batches(f"1 {good} 1e-9 {good}", 16, 2, 0, tokenizer=tokenizer)
    with pytest.raises(UserError, match="holds no window"):
        Batches(good, 4000, 2, 0, tokenizer=tokenizer)
    assert sorted(os.listdir(tmp_path)) == sorted(f"{n}.{e}" for n in ("good", "high", "one") for e in ("bin", "idx"))


def test_megatron_format_trains_as_the_shards_do(corpus, tokenizer, prepared, tmp_path):
    """prepare --format megatron holds the same tokens as the shards; training on it, as a prepared directory or as
    Megatron prefixes with --tokenizer, gives the same fp32 losses as training on the shards."""
    meg = str(tmp_path / "meg")
    out = run("data.py", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--out", meg, "--val-fraction", 0.2,
              "--format", "megatron").stdout
    assert f"--data-path 1 {meg}/train_0000" in out
    meta = json.load(open(os.path.join(meg, "meta.json")))
    for split in ("train", "val"):
        with open(os.path.join(prepared, f"{split}_0000.bin"), "rb") as f:
            assert f.read()[64:] == open(os.path.join(meg, f"{split}_0000.bin"), "rb").read()
        assert read_index(os.path.join(meg, f"{split}_0000"))[1].sum() == meta["tokens"][split]
    losses = []
    for i, data in enumerate([["--data", prepared], ["--data", meg],
                              ["--data", f"{meg}/train_0000", "--val_data", f"{meg}/val_0000", "--tokenizer",
                               tokenizer]]):
        run("train.py", *SMALL, *data, "--out", tmp_path / f"run{i}", "--max_steps", 6)
        losses.append([(r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / f"run{i}")])
    assert losses[0] == losses[1] == losses[2] and len(losses[0]) >= 7
    assert os.path.isfile(tmp_path / "run2" / "tokenizer.tiktoken")  # sample.py can decode the run
    with pytest.raises(AssertionError, match="already holds prepared data"):
        run("data.py", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--out", meg, "--format", "megatron")
