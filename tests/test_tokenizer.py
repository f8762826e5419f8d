import os

import pytest

from conftest import run
from data import Stats, load_tokenizer, read_documents, train_tokenizer
from model import UserError


@pytest.mark.parametrize("text", ["话说天下大势，分久必合，合久必分。", "Hello, world! It's 2026.", "😀🐉 emoji 三国",
                                  "", "玄德曰：\n“吾乃中山靖王之后。”", "\u0000 tab\tand  spaces  "])
def test_round_trip(tokenizer, text):
    enc, info = load_tokenizer(tokenizer)
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert all(0 <= i < info["n_vocab"] for i in ids)


def test_trained_tokenizer_identity_and_compression(tokenizer):
    enc, info = load_tokenizer(tokenizer)
    assert info["n_vocab"] == enc.n_vocab == 512 and info["eot"] == 511
    assert enc.decode([info["eot"]]) == "<|endoftext|>"
    # Merges were learned: common text takes fewer tokens than its UTF-8 bytes.
    text = "却说曹操引兵追赶"
    assert len(enc.encode_ordinary(text)) < len(text.encode())
    assert len(info["hash"]) == 64


def test_newline_marker_becomes_newline(tmp_path):
    path = tmp_path / "asc.txt"
    path.write_text("第一段<n>第二段\n\n   \nsecond doc<n><n>end\n", encoding="utf-8")
    docs = list(read_documents(str(path), Stats()))
    assert docs == ["第一段\n第二段", "second doc\n\nend"]


def test_vocab_over_uint16_refused(corpus, tmp_path):
    with pytest.raises(UserError, match="uint16"):
        train_tokenizer([corpus], 65537, str(tmp_path / "big.tiktoken"))


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_builtin_too_big_refused(name):
    with pytest.raises(UserError, match="65,536"):
        load_tokenizer(name)


def test_builtin_offline_explains_cache(tmp_path):
    """No network: the error names TIKTOKEN_CACHE_DIR and the offline alternative, not a traceback."""
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    (tmp_path / "a.txt").write_text("hello\n")
    proc = run("data.py", "prepare", "--input", tmp_path / "a.txt", "--tokenizer", "gpt2", "--out",
               tmp_path / "d", check=False, env=env)
    assert proc.returncode != 0
    assert "TIKTOKEN_CACHE_DIR" in proc.stderr and "train-tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_tokenizer_spec():
    with pytest.raises(UserError, match="neither a file"):
        load_tokenizer("no_such_tokenizer")


def test_tokenizer_not_overwritten(tokenizer, corpus):
    before = open(tokenizer, "rb").read()
    proc = run("data.py", "train-tokenizer", "--input", corpus, "--vocab-size", 300, "--out", tokenizer, check=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert open(tokenizer, "rb").read() == before


def test_missing_sidecar_json(tokenizer, tmp_path):
    lonely = tmp_path / "lonely.tiktoken"
    lonely.write_bytes(open(tokenizer, "rb").read())
    with pytest.raises(UserError, match="lonely.json"):
        load_tokenizer(str(lonely))
