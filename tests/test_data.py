"""The shard format and the training reader (data.py, opening the data with dataprep/windows.py). Preparing the shards
is tests/test_prepare.py."""
import json
import os
import shutil

import numpy as np
import pytest

from data import Batches, permute
from dataprep.shards import HEADER_BYTES, open_tokens, read_header, write_tokens
from dataprep.windows import TokenShards
from runtime.errors import UserError
from helpers import TOK, synthetic




def test_a_shard_is_its_header_then_the_ids(tmp_path):
    """write_tokens' file: HEADER_BYTES of header, then every array's ids as uint16, in order; read back whole."""
    path, arrays = str(tmp_path / "t.bin"), [np.array([1, 65535, 7]), np.array([], dtype=np.int64), np.arange(5)]
    assert write_tokens(path, arrays, 65536, TOK["hash"]) == 8
    assert read_header(path, 65536, TOK["hash"], count=8) == 8
    raw = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)
    assert raw.tolist() == open_tokens(path)[1].tolist() == [1, 65535, 7, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 4097])
def test_permute_is_a_permutation(n):
    keys = np.random.default_rng(n).integers(0, 2**63, 4, dtype=np.uint64)
    p = permute(np.arange(n), n, keys)
    assert sorted(p.tolist()) == list(range(n))
    if n >= 100:  # and it shuffles: few fixed points, neighbours land far apart
        assert (p == np.arange(n)).sum() < n // 20
        assert np.abs(np.diff(p)).mean() > n / 10


def test_windows_cover_shards_in_order(tmp_path):
    d = synthetic(str(tmp_path / "d"), [101, 50, 33])
    part = TokenShards([open_tokens(os.path.join(d, f"train_{k:04d}.bin")) for k in range(3)], 16)
    assert part.per_shard.tolist() == [6, 3, 2] and part.n == 11  # (n - 1) // 16 windows per shard
    arrays = [open_tokens(os.path.join(d, f"train_{k:04d}.bin"))[1] for k in range(3)]
    w = part.windows(np.arange(11))
    assert w.shape == (11, 17)
    assert (w[0] == arrays[0][:17]).all() and (w[5] == arrays[0][80:97]).all()
    assert (w[6] == arrays[1][:17]).all() and (w[10] == arrays[2][16:33]).all()


def test_epoch_reads_every_window_once_and_ranks_are_disjoint(tmp_path):
    """Three shards of different sizes: over one epoch every window is read exactly once, whatever the data-parallel
    layout, and the global batch of a step is the same for 1 process x 4 micro-batches and 4 ranks x 1."""
    d = synthetic(str(tmp_path / "d"), [16 * 40 + 1, 16 * 24 + 1, 16 * 16 + 1])  # 40 + 24 + 16 = 80 windows
    one = Batches(d, seq_len=16, micro_batch=2, seed=3, accum=4)  # 8 windows per step: an epoch is 10 steps
    ranks = [Batches(d, seq_len=16, micro_batch=2, seed=3, rank=r, dp=4) for r in range(4)]
    seen = []
    for step in range(10):
        per_rank = [set(b.train_ids(step, 0)[1].tolist()) for b in ranks]
        assert sum(map(len, per_rank)) == 8 and len(set.union(*per_rank)) == 8  # disjoint across ranks
        glob = [i for m in range(4) for i in one.train_ids(step, m)[1].tolist()]
        assert set(glob) == set.union(*per_rank)
        seen += glob
    assert sorted(seen) == list(range(80))
    # The next epoch is another order of the same windows.
    nxt = [i for s in range(10, 20) for m in range(4) for i in one.train_ids(s, m)[1].tolist()]
    assert sorted(nxt) == list(range(80)) and nxt != seen


def test_sampling_is_a_function_of_seed_and_step(tmp_path):
    d = synthetic(str(tmp_path / "d"), [5000, 3000])
    a, b = (Batches(d, seq_len=16, micro_batch=4, seed=1, accum=2) for _ in range(2))
    x1, y1 = a.train_batch(step=7, micro=1)
    x2, y2 = b.train_batch(step=7, micro=1)
    assert x1.equal(x2) and y1.equal(y2)
    assert x1.shape == (4, 16) and x1[:, 1:].equal(y1[:, :-1])  # targets are inputs shifted by one
    assert not x1.equal(a.train_batch(step=8, micro=1)[0])
    assert not x1.equal(a.train_batch(step=7, micro=0)[0])
    assert not x1.equal(Batches(d, 16, 4, seed=2, accum=2).train_batch(7, 1)[0])
    # micro-batch 1 of one process is micro-batch 0 of data-parallel rank 1 of 2
    assert x1.equal(Batches(d, 16, 4, seed=1, rank=1, dp=2).train_batch(7, 0)[0])
    v1, v2 = list(a.val_batches(3)), list(a.val_batches(3))
    assert len(v1) == 3 and all(p[0].equal(q[0]) for p, q in zip(v1, v2))


def test_shards_weighted_by_size(tmp_path):
    """Windows are uniform over the grid, so a shard 3x larger is read 3x as often."""
    d = synthetic(str(tmp_path / "d"), [16 * 3000 + 1, 16 * 1000 + 1])
    b = Batches(d, seq_len=16, micro_batch=100, seed=0)
    ids = np.concatenate([b.train_ids(s, 0)[1] for s in range(20)])  # 2,000 of the 4,000 windows
    share = (ids < 3000).mean()
    assert 0.70 < share < 0.80


def test_memory_stays_flat(tmp_path, monkeypatch):
    """Pages read through the memory maps leave the resident set when release() runs, and the reader runs it every
    RELEASE_EVERY batches: a long run's RSS does not climb towards the size of the shards."""
    def rss_file_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile")) / 1024
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux)")
    d = synthetic(str(tmp_path / "d"), [25_000_000, 25_000_000], val_sizes=[5000, 5000])
    b = Batches(d, seq_len=2048, micro_batch=64, seed=0)
    b.train_batch(0, 0)  # imports torch, whose libraries are file pages too
    b.train.release()
    before = rss_file_mb()
    b.train.grids[0].windows(np.arange(0, b.train.grids[0].n, 2))  # every other window: all 100 MB
    assert rss_file_mb() - before > 60, "reading did not map the pages; the test measures nothing"
    b.train.release()
    assert rss_file_mb() - before < 10
    calls = []
    monkeypatch.setattr(b.train, "release", lambda: calls.append(1))
    for s in range(2 * Batches.RELEASE_EVERY):
        b.train_batch(s, 0)
    assert len(calls) == 2


def test_shorter_than_window(tmp_path):
    d = synthetic(str(tmp_path / "d"), [100, 100])
    with pytest.raises(UserError, match="holds no window"):
        Batches(d, seq_len=1000, micro_batch=2, seed=0)


def test_not_prepared_or_old_layout(tmp_path):
    with pytest.raises(UserError, match="not a prepared data directory"):
        Batches(str(tmp_path), 16, 2, 0)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(UserError, match="layout version 1"):
        Batches(str(tmp_path), 16, 2, 0)


def corrupt(path, how):
    raw = bytearray(open(path, "rb").read())
    if how == "magic":
        raw[:8] = b"GARBAGE!"
    elif how == "version":
        raw[8:12] = (99).to_bytes(4, "little")
    elif how == "truncated":
        raw = raw[:-3]
    elif how == "vocab":
        raw[12:16] = (999).to_bytes(4, "little")
    elif how == "hash":
        raw[24] ^= 0xFF
    elif how == "count":  # a consistent file with fewer tokens than meta.json lists
        raw = raw[:-4]
        raw[16:24] = ((len(raw) - HEADER_BYTES) // 2).to_bytes(8, "little")
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("how, message", [("magic", "bad magic"), ("version", "format version 99"),
                                          ("truncated", "truncated"), ("vocab", "different tokenizer"),
                                          ("hash", "different tokenizer"), ("count", "meta.json says")])
def test_header_validation_names_the_file(tmp_path, how, message):
    d = synthetic(str(tmp_path / "d"), [500, 500])
    corrupt(os.path.join(d, "train_0001.bin"), how)
    with pytest.raises(UserError, match=message) as e:
        Batches(d, seq_len=16, micro_batch=2, seed=0)
    assert "train_0001.bin" in str(e.value)


def test_missing_shard(tmp_path):
    d = synthetic(str(tmp_path / "d"), [500, 500])
    os.remove(os.path.join(d, "val_0000.bin"))
    with pytest.raises(UserError, match="val_0000.bin not found"):
        Batches(d, seq_len=16, micro_batch=2, seed=0)


def test_unigram_entropy(prepared):
    h = Batches(prepared, seq_len=16, micro_batch=4, seed=1).unigram_entropy()
    assert 0 < h < np.log(512)


def test_prepared_fixture_reads(prepared, tmp_path):
    """The shards prepare writes are what Batches reads (a copy of the directory reads the same)."""
    shutil.copytree(prepared, tmp_path / "copy")
    a = Batches(prepared, seq_len=16, micro_batch=4, seed=1)
    b = Batches(str(tmp_path / "copy"), seq_len=16, micro_batch=4, seed=1)
    assert a.train_batch(3, 0)[0].equal(b.train_batch(3, 0)[0])
