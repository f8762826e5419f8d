"""Small vocabularies in the two formats ASC22 used, built from the bundled corpus (Yuan's own vocab.txt is not
committed): a Yuan vocab.txt (yuan:) and a BERT one (bert:). Deterministic: the same files on every machine, so
that ids computed once by running the reference tokenizers on them are test data (tests/data/yuan_ids.json)."""
import collections
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGLISH = ["hello", "world", "the", "game", "play", "token", "example", "com", "https", "python", "2022", "20",
           "##s", "##ing", "##ed", "##er", "##22", "##l", "##o", "##a", "##e", "a", "b", "c", "x", "y", "1", "2",
           "3", "0", "i", "##i", "##n", "##t", "it", "is", "ok", "caf", "##é"]


def _text(chars=60_000):
    with open(os.path.join(ROOT, "corpus", "sanguo.txt"), encoding="utf-8") as f:
        return f.read(chars).replace("<n>", "\n")


def _chinese(text):
    """Every Chinese character of the text in order of first use, and its 300 most frequent two-character runs."""
    chars = list(dict.fromkeys(c for c in text if "\u4e00" <= c <= "\u9fff"))
    pairs = collections.Counter(a + b for a, b in zip(text, text[1:]) if a in chars and b in chars)
    return chars, [p for p, _ in pairs.most_common(300)]


def yuan_vocab(path):
    """Yuan's first 11 lines (▂, the space, at id 10 as the reference requires), a blank line and a repeated
    piece (read as the reference reads them), punctuation, Chinese characters and words, English pieces, and
    the 190 sentinels <s_0>.. that the reference's constructor looks up."""
    chars, words = _chinese(_text())
    lines = ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2581", ",", "\u2582",
             "，", "。", "：", "“", "”", "！", "？", "、", "", ".", "!", "?", "(", ")", "-", "_", "/", "#", "##/",
             *ENGLISH, "hello", *chars, *words, *[f"<s_{i}>" for i in range(190)]]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))  # no newline after the last line, like Yuan's
    return path


def bert_vocab(path):
    """BERT's special tokens, punctuation, lower-case English pieces, and single Chinese characters."""
    chars, _ = _chinese(_text(20_000))
    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "，", "。", "：", "“", "”", ",", ".", "!", "?", "[", "]",
             "'", "-", *ENGLISH, "σ", "ς", "##σ", "##ς", "οδυσσευ", "##ς", *chars]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


# The texts whose ids the reference gave (tests/data/yuan_ids.json): each rule of the tokenizer at least once
YUAN_TEXTS = [
    "话说天下大势，分久必合，合久必分。",  # Chinese prose: jieba words, longest pieces
    "hello world",  # the space between two English pieces is dropped
    "hello 世界 world",  # ... but not next to Chinese
    "playing the games, 2022年!",  # ## continuations, digits, punctuation
    "https://example.com/a_b?x=1",  # jieba cuts ASCII runs its own way (rjieba would not)
    "！！！？？？……——。。。,,,...",  # runs of punctuation
    "x" * 201 + " ok",  # a word over 200 characters is one <unk>
    "qqqqzzzz 䮱䭕 𠀀𠀁 中䮱文",  # unknown letters; CJK extension A and B beside Chinese
    "😀🐉 emoji 👨‍👩‍👧 三国 🇨🇳",  # emoji, a ZWJ sequence, a flag
    "tab\there  two  spaces\u3000full width\nnew line\n\nend",  # whitespace of every kind
    "a",  # a single piece
    "caf\u00e9 Ωμέγα",  # accents, Greek
    "玄德曰：“吾乃中山靖王之后，孝景皇帝阁下玄孙。”",
]
