import collections
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run
from runtime.errors import UserError
from dataprep.prepare import Clean, read_documents
from dataprep.tokenizer import load_tokenizer, train_tokenizer


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
    docs = list(read_documents(str(path), Clean(0, 0), collections.Counter()))
    assert docs == ["第一段\n第二段", "second doc\n\nend"]


def test_vocab_over_uint16_refused(corpus, tmp_path):
    with pytest.raises(UserError, match="uint16"):
        train_tokenizer(["text"], 65537, str(tmp_path / "big.tiktoken"))


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


def test_numpy_encoding_equals_encode_ordinary(tokenizer):
    """prepare uses encode_to_numpy with special tokens disabled; it must give encode_ordinary's ids, also for
    text that spells out the end-of-document token."""
    enc, _ = load_tokenizer(tokenizer)
    for text in ["话说天下大势<|endoftext|>分久必合", "plain <|endoftext|> text", "曹操\n\n刘备  ", ""]:
        assert enc.encode_to_numpy(text, disallowed_special=()).tolist() == enc.encode_ordinary(text)


def test_sample_is_bounded_and_reproducible(tmp_path):
    """--sample-mb 0.2 of the 1.8 MB corpus: fewer documents, and the same tokenizer twice."""
    corpus = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus", "sanguo.txt")
    outs = []
    for name in ("a", "b"):
        proc = run("data.py", "train-tokenizer", "--input", corpus, "--vocab-size", 400, "--sample-mb", 0.2,
                   "--out", tmp_path / f"{name}.tiktoken")
        outs.append(open(tmp_path / f"{name}.tiktoken", "rb").read())
        n_docs = int(proc.stdout.split("trained on ")[1].split(" documents")[0])
        assert 0 < n_docs < 40, proc.stdout  # the corpus has 120 chapters of ~15 KB
    assert outs[0] == outs[1]


def test_sample_spreads_over_the_file(tmp_path):
    """Blocks are evenly spaced: the sample sees the start and the end of the file."""
    path = tmp_path / "n.txt"
    path.write_text("".join(f"document number {i:06d} of the corpus\n" for i in range(100_000)))  # 3.8 MB
    from dataprep.prepare import sample_documents
    docs = list(sample_documents([str(path)], 0.4, Clean(), collections.Counter()))
    assert docs[0] == "document number 000000 of the corpus"
    assert 9000 < len(docs) < 11000 and int(docs[-1].split()[2]) > 90_000
    assert docs == list(sample_documents([str(path)], 0.4, Clean(), collections.Counter()))


def transcode(cmd, tokenizer, text):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), cmd, "--tokenizer", tokenizer], input=text,
                          capture_output=True, text=True, timeout=60)


def test_encode_and_decode_by_hand(tokenizer):
    """data.py encode: one line of ids per stdin line, the tokenizer's own ids, no end-of-document token, <n> a
    newline as in the corpus; data.py decode gives the lines back."""
    lines = ["话说天下大势，分久必合，合久必分。", "Yuan 1.0 has 245B params, 源1.0 有2450亿参数!", "第一回<n>宴桃园 😀"]
    enc = load_tokenizer(tokenizer)[0]
    encoded = transcode("encode", tokenizer, "\n".join(lines) + "\n")
    assert encoded.returncode == 0, encoded.stderr
    rows = encoded.stdout.splitlines()
    assert rows == [" ".join(map(str, enc.encode_ordinary(line.replace("<n>", "\n")))) for line in lines]
    assert all(str(enc.eot_token) not in row.split() for row in rows)
    decoded = transcode("decode", tokenizer, encoded.stdout)
    assert decoded.returncode == 0 and decoded.stdout.splitlines() == lines, decoded.stderr


@pytest.mark.parametrize("ids, message", [("1 2 x", "line 2 of the input is not token ids"),
                                          ("1 70000", "line 2: token id 70000 is outside")])
def test_decode_refuses_what_is_not_ids(tokenizer, ids, message):
    proc = transcode("decode", tokenizer, "5 6\n" + ids + "\n")
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
