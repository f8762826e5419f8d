import json
import os
import shutil

import numpy as np
import pytest

from conftest import run
from data import HEADER, HEADER_BYTES, Batches, load_tokenizer, open_tokens, prepare
from model import UserError


def test_prepare_layout(prepared, tokenizer):
    meta = json.load(open(os.path.join(prepared, "meta.json")))
    enc, info = load_tokenizer(tokenizer)
    assert meta["tokenizer"] == info and meta["documents"] == 30
    assert 0 < meta["val_documents"] < 30
    for split in ("train", "val"):
        arr = open_tokens(os.path.join(prepared, f"{split}.bin"), info["n_vocab"], info["hash"])
        assert len(arr) == meta["tokens"][split]
        assert os.path.getsize(os.path.join(prepared, f"{split}.bin")) == HEADER_BYTES + 2 * len(arr)
    train = open_tokens(os.path.join(prepared, "train.bin"))
    # Documents are separated by the end-of-document token and decode back to the source text.
    n_docs = int((np.asarray(train) == info["eot"]).sum()) + int((np.asarray(open_tokens(
        os.path.join(prepared, "val.bin"))) == info["eot"]).sum())
    assert n_docs == 30 and train[-1] == info["eot"]
    first_doc = enc.decode(train[: list(train).index(info["eot"])].tolist())
    source = open(meta["sources"][0], encoding="utf-8").read().split("\n")
    assert first_doc in [line.replace("<n>", "\n") for line in source]


def test_prepare_is_deterministic(corpus, tokenizer, prepared, tmp_path):
    run("data.py", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--out", tmp_path / "again",
        "--val-fraction", 0.2)
    for name in ("train.bin", "val.bin"):
        assert open(tmp_path / "again" / name, "rb").read() == open(os.path.join(prepared, name), "rb").read()


def test_prepare_never_overwrites(corpus, tokenizer, prepared):
    before = open(os.path.join(prepared, "train.bin"), "rb").read()
    proc = run("data.py", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--out", prepared, check=False)
    assert proc.returncode != 0 and "already holds prepared data" in proc.stderr
    assert open(os.path.join(prepared, "train.bin"), "rb").read() == before


def test_jsonl_and_non_utf8(tokenizer, tmp_path):
    docs = [f"第{i}个文档，内容是 document number {i}。" for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes here<n>line two\n" * 3)
    meta = prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], tokenizer, str(tmp_path / "out"), 0.3)
    assert meta["documents"] == 43 and meta["replaced_bytes"] == 6
    enc, _ = load_tokenizer(tokenizer)
    text = enc.decode(np.concatenate([open_tokens(str(tmp_path / "out" / f"{s}.bin")) for s in ("train", "val")])
                      .tolist())
    assert "bad \ufffd\ufffd bytes here\nline two" in text and docs[7] in text


def test_bad_jsonl_line(tokenizer, tmp_path):
    for n, bad in enumerate(['{"body": "no text field"}', '{"text": 42}', 'not json', '[1, 2]']):
        (tmp_path / f"x{n}.jsonl").write_text('{"text": "ok"}\n' + bad + "\n")
        with pytest.raises(UserError, match=rf"x{n}.jsonl:2"):
            prepare([str(tmp_path / f"x{n}.jsonl")], tokenizer, str(tmp_path / f"out{n}"))


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "not found"),  # missing file
    (lambda d: (d / "empty.txt").write_text(""), "no documents"),
    (lambda d: (d / "empty.txt").write_text("\n   \n\n"), "no documents"),
])
def test_missing_or_empty_input(tokenizer, tmp_path, make, message):
    make(tmp_path)
    proc = run("data.py", "prepare", "--input", tmp_path / "empty.txt", "--tokenizer", tokenizer,
               "--out", tmp_path / "out", check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


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
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("how, message", [("magic", "bad magic"), ("version", "format version 99"),
                                          ("truncated", "truncated"), ("vocab", "different tokenizer")])
def test_header_validation(prepared, tmp_path, how, message):
    copy = tmp_path / "d"
    shutil.copytree(prepared, copy)
    corrupt(copy / "val.bin", how)
    with pytest.raises(UserError, match=message) as e:
        Batches(str(copy), seq_len=16, micro_batch=2, seed=0)
    assert "val.bin" in str(e.value)


def test_header_struct_fits():
    assert HEADER.size <= HEADER_BYTES


def test_corpus_shorter_than_window(prepared):
    with pytest.raises(UserError, match="fewer than one window"):
        Batches(prepared, seq_len=10**6, micro_batch=2, seed=0)


def test_sampling_is_a_function_of_seed_step_rank(prepared):
    a = Batches(prepared, seq_len=16, micro_batch=4, seed=1)
    b = Batches(prepared, seq_len=16, micro_batch=4, seed=1)
    x1, y1 = a.train_batch(step=7, micro=1)
    x2, y2 = b.train_batch(step=7, micro=1)
    assert x1.equal(x2) and y1.equal(y2)
    assert x1.shape == (4, 16) and x1[:, 1:].equal(y1[:, :-1])  # targets are inputs shifted by one
    assert not x1.equal(a.train_batch(step=8, micro=1)[0])
    assert not x1.equal(a.train_batch(step=7, micro=0)[0])
    assert not x1.equal(Batches(prepared, 16, 4, seed=1, rank=1, dp=2).train_batch(7, 1)[0])
    # The global batch does not depend on the data-parallel layout: micro-batch 1 of one process is micro-batch 0
    # of data-parallel rank 1 of 2.
    assert x1.equal(Batches(prepared, 16, 4, seed=1, rank=1, dp=2).train_batch(7, 0)[0])
    v1, v2 = list(a.val_batches(3)), list(a.val_batches(3))
    assert len(v1) == 3 and all(p[0].equal(q[0]) for p, q in zip(v1, v2))


def test_unigram_entropy(prepared):
    h = Batches(prepared, seq_len=16, micro_batch=4, seed=1).unigram_entropy()
    assert 0 < h < np.log(512)
