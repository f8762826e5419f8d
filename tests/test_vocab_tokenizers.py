"""The ASC22 tokenizers: yuan: (Yuan 1.0's EncDecTokenizer) and bert: (Megatron's BertWordPieceLowerCase).
Their ids are checked against the references themselves: yuan: against ids Yuan 1.0's own code gave on these
texts (tests/data/yuan_ids.json; 10 MB more by hand, bench/yuan_parity.py), bert: against transformers here."""
import json
import os
import sys

import pytest

from conftest import ROOT, SMALL, run
from runtime.errors import UserError
from dataprep.tokenizer import BertTokenizer, YuanTokenizer, load_tokenizer
from vocabs import YUAN_TEXTS, bert_vocab, yuan_vocab


@pytest.fixture(scope="module")
def yuan(tmp_path_factory):
    return yuan_vocab(str(tmp_path_factory.mktemp("yuan") / "vocab.txt"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return bert_vocab(str(tmp_path_factory.mktemp("bert") / "vocab.txt"))


def test_yuan_ids_equal_the_reference(yuan):
    with open(os.path.join(ROOT, "tests", "data", "yuan_ids.json"), encoding="utf-8") as f:
        expected = json.load(f)["ids"]
    enc, info = load_tokenizer(f"yuan:{yuan}")
    assert [enc.encode_ordinary(t) for t in YUAN_TEXTS] == expected
    # the reference reads a blank line as a piece and keeps a repeated piece's last id: ids count the lines
    assert info["n_vocab"] == enc.n_vocab == 3002 and info["eot"] == 7 and info["kind"] == "yuan"
    assert enc.vocab[""] == 19 and enc.vocab["hello"] > enc.vocab["world"]
    assert enc.encode_ordinary("") == [] and list(enc.encode_to_numpy("hello world")) == expected[1]


def test_yuan_fast_path_cuts_as_jieba(yuan):
    """rjieba cuts all but the runs jieba-rs would cut differently; jieba alone gives the same ids."""
    import jieba
    fast, slow = YuanTokenizer(yuan), YuanTokenizer(yuan)
    slow.cut = jieba.lcut
    texts = YUAN_TEXTS + ["数据集2022年12月发布COVID-19疫情iPhone手机example.com网站𠀀字䮱字"]
    assert [fast.encode_ordinary(t) for t in texts] == [slow.encode_ordinary(t) for t in texts]


CUT_CASES = ["a.b", "B-H100", "3.5AT0", "COVIDxBa.b_危气似", "时a.b可得乎", "19_C_", "3.14%", "1.2.3", "a_b-c.d",
             "--", "x+-y", "AT&T", "c++与C#", "用c#写", "T恤A股B超卡拉OK", "hello world\r\nagain", "\t 中 \u3000文",
             "𠀀字䮱字\uf900a.b𨡓", "\u9fd6\u9fffx-1", "example.com网站", "数据集2022年12月发布COVID-19疫情iPhone手机",
             "E.g. assert_never() --> sorted(c), v1.2 / 3.0-rc1", "😀ア한é", "3.٣ a.５b x 3.५%", "中\ud800文", ""]


def test_yuan_cuts_words_as_jieba():
    """The word cutter (a pattern for text that needs no dictionary, rjieba elsewhere, its two differences from
    jieba mended) gives jieba's words: on hard cases and on random mixes of Chinese, ASCII words, punctuation, CJK
    extensions and other scripts (bench/yuan_parity.py holds the ids against Yuan's own code on 10 MB)."""
    import random
    import jieba
    from dataprep.tokenizer import _jieba_cut
    cut, rng = _jieba_cut(), random.Random(0)
    chinese = "话说天下大势分久必合合久必分周末七国分争并入于秦及秦灭之后楚汉分争又并入于汉玄德曰吾乃中山靖王之后"
    parts = ["a.b", "-", "_", ".", "+", "#", "&", "%", "3.5", "C++", "c#", "AT&T", "iPhone", "2022", "H100", "k8s",
             "x", "..", "-1", "T恤", "A股", "卡拉OK", " ", "，", "。", "\t", "\n", "\r\n", "😀", "\u3400", "\U00020000",
             "\uf900", "\u9fd6", "ア", "é", "٣", "５", "\x0b", "\x85"]
    texts = CUT_CASES + ["".join(rng.choice(parts) if rng.random() < 0.6 else chinese[rng.randrange(40):][:5]
                                 for _ in range(rng.randint(1, 10))) for _ in range(3000)]
    assert [cut(t) for t in texts] == [jieba.lcut(t) for t in texts]


def test_yuan_decode(yuan):
    enc = YuanTokenizer(yuan)
    for text in ("话说天下大势，分久必合。", "玄德曰：\n“吾乃中山靖王之后。”", "hello world", "hello 世界 world",
                 "playing the games"):
        assert enc.decode(enc.encode_ordinary(text)) == text  # ▂ ▃ back to space and newline; ## joined
    # a dropped space comes back before a letter or digit
    assert enc.decode(enc.encode_ordinary("hello, world")) == "hello, world"  # the reference: "hello , world"


def test_bert_ids_equal_transformers(bert):
    from transformers import BertTokenizer as Reference
    ref = Reference(bert, do_lower_case=True, split_special_tokens=True)
    ref.backend_tokenizer.model.max_input_chars_per_word = 200  # Megatron's (transformers' default is 100)
    enc, info = load_tokenizer(f"bert:{bert}")
    texts = [t for t in YUAN_TEXTS if "\u03a3" not in t] + [
        "Hello WORLD, it's [SEP] and [CLS] as text", "Café ÉLAN naïve", "x" * 150 + " ok", "三国\u0000演义\ufffd"]
    for text in texts:
        assert enc.encode_ordinary(text) == ref.encode(text, add_special_tokens=False), text
    # Megatron appends [BOS] and [EOS] (the end of a document) to a vocabulary that lacks them
    lines = sum(1 for _ in open(bert, encoding="utf-8"))
    assert info["n_vocab"] == lines + 2 and info["eot"] == lines + 1 and info["kind"] == "bert"
    assert enc.decode(enc.encode_ordinary("话说天下, playing games")) == "话说天下, play ##ing game ##s".replace(
        " ##", "")


def test_bert_lower_cases_as_python_does(bert):
    """A word-final capital sigma becomes ς, as Python's lower() (Megatron's) does; transformers 5's Rust lower
    case gives σ there, the one difference from Megatron in 10 MB (bench/RESULTS.md)."""
    enc = BertTokenizer(bert)
    assert enc.encode_ordinary("ΟΔΥΣΣΕΥΣ") == [enc.vocab["οδυσσευ"], enc.vocab["##ς"]]


@pytest.mark.parametrize("kind, content, message", [
    ("yuan", b"\xff\xfe\x00binary", "not UTF-8 text"),
    ("yuan", b"IQ== 0\nIg== 1\n", "has no line <unk> or <eod>"),
    ("yuan", "\n".join(["<unk>", "<eod>"] + [f"p{i}" for i in range(20)]).encode(), "line 11 is not \u2582"),
    ("bert", "\n".join(["[PAD]", "<unk>", "a"]).encode(), "append a line [UNK]"),
])
def test_not_a_vocab_txt(tmp_path, kind, content, message):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_tokenizer(f"{kind}:{path}")
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(f"{kind}:{tmp_path}/missing.txt")


def test_missing_package_is_a_clear_error(yuan, bert, monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # import jieba raises ImportError
    with pytest.raises(UserError, match="pip install jieba"):
        YuanTokenizer(yuan)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError, match="pip install tokenizers"):
        BertTokenizer(bert)


def test_prepare_train_sample_with_yuan(yuan, corpus, tmp_path):
    """prepare ends each document with <eod>, keeps a copy of vocab.txt beside the tokens and the checkpoints, and
    sample.py decodes with it; the vocabulary is padded to 128."""
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    run("data.py", "prepare", "--input", corpus, "--tokenizer", f"yuan:{yuan}", "--out", data)
    meta = json.load(open(os.path.join(data, "meta.json")))
    assert meta["tokenizer"]["kind"] == "yuan" and os.path.isfile(os.path.join(data, "tokenizer.vocab.txt"))
    import numpy as np
    tokens = np.fromfile(os.path.join(data, "train_0000.bin"), dtype=np.uint16, offset=64)
    enc = YuanTokenizer(yuan)
    first = open(corpus, encoding="utf-8").readline().strip().replace("<n>", "\n")
    assert list(tokens[:len(enc.encode_ordinary(first)) + 1]) == enc.encode_ordinary(first) + [7]
    run("train.py", *SMALL, "--data", data, "--out", out, "--max_steps", "2", "--vocab_size", "0")
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 3072  # 3,002 ids padded to 128
    assert os.path.isfile(os.path.join(out, "tokenizer.vocab.txt"))
    sampled = run("sample.py", "--out", out, "--prompt", "话说天下", "--max-new-tokens", "5").stdout
    assert "话说天下" in sampled
    log = run("export.py", "--out", out, "--to", tmp_path / "hf").stdout
    assert "vocab.txt" in os.listdir(tmp_path / "hf") and "has no tokenizer.json form" in log


def test_bert_export_encodes_alike(bert):
    enc = BertTokenizer(bert)
    for text in YUAN_TEXTS:
        assert enc.exported().encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text)
