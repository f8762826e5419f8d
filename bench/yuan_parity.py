"""The yuan: tokenizer against Yuan 1.0's own: the same ids on varied text, and how much faster.

    python bench/yuan_parity.py --vocab PATH/vocab.txt --reference DIR [--mb 10] [--text FILE] [--speed-mb 1.7] [--workers 2]

DIR holds Yuan 1.0's tokenization_enc_dec.py (src/megatron/tokenizer/ in github.com/Shawn-IEITSystems/Yuan-1.0;
it needs `jieba` and `six`); it is imported from there and never copied here. The text (written to --text, one
document per line in the corpus's form, `<n>` for a newline) is generated from corpus/sanguo.txt and fixed random
draws, in six kinds: Chinese prose; Chinese mixed with English, digits and code; runs of punctuation; long unknown
words (letters, rare CJK, other scripts); emoji (skin tones, ZWJ sequences, flags); odd whitespace. Each line is
encoded by the reference's EncDecTokenizer.encode (jieba 0.42.1) and by ours, as it runs (jieba, with rjieba for
the blocks of Chinese characters) and with jieba alone, and the
ids must be equal line for line. Speed: the reference and ours on the first --speed-mb of corpus/sanguo.txt (1.8 MB of Chinese prose), one core,
side by side. Results in bench/RESULTS.md.
"""
import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~，。！？、；：“”‘’（）《》【】…—～·「」『』〈〉〔〕")
SCRIPTS = [(0x0410, 0x044F), (0x0391, 0x03C9), (0x0627, 0x064A), (0xAC00, 0xD7A3), (0x3041, 0x3096),
           (0x0E01, 0x0E3A), (0x0905, 0x0939), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x4E00, 0x9FFF)]
EMOJI = [chr(c) for c in range(0x1F600, 0x1F64F)] + [chr(c) for c in range(0x1F300, 0x1F3FF)] + \
    ["\U0001F468\u200D\U0001F469\u200D\U0001F467", "\U0001F44D\U0001F3FD", "\U0001F1E8\U0001F1F3",
     "\u2764\ufe0f", "\U0001F9D1\u200D\U0001F4BB", "\u263a"]
SPACES = [" ", "  ", "\t", "\u3000", "\xa0", "<n>", "<n><n>", " <n> "]


def english_words():
    """English prose and code: the docstrings of some standard-library modules (offline, varied, fixed)."""
    import importlib
    words = []
    for name in ("argparse", "collections", "json", "re", "subprocess", "pathlib", "inspect", "unittest", "typing"):
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            doc = getattr(getattr(module, attr), "__doc__", None)
            if isinstance(doc, str):
                words += doc.split()
    return words


def generate(mb, seed=0):
    """Documents of the six kinds until `mb` MB of UTF-8, in a fixed order."""
    rng = random.Random(seed)
    with open(os.path.join(ROOT, "corpus", "sanguo.txt"), encoding="utf-8") as f:
        prose = [line.strip() for line in f if line.strip()]
    sentences = [s for line in prose for s in line.replace("<n>", "。").split("。") if s]
    english = english_words()

    def rare_word():
        lo, hi = rng.choice(SCRIPTS)
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.choice([1, 3, 20, 150, 210, 400])))

    def letters():
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
                       for _ in range(rng.choice([5, 30, 199, 200, 201, 260])))

    kinds = {
        "prose": lambda: rng.choice(prose)[:rng.randint(10, 3000)],
        "mixed": lambda: "".join(rng.choice([rng.choice(sentences) + rng.choice("，。 "),
                                             " ".join(rng.choices(english, k=rng.randint(1, 12))),
                                             str(rng.randint(0, 10**rng.randint(1, 12))), f"{rng.random():.4f}",
                                             "https://example.com/a_b?x=1&y=2", "x = f(y[3]) + 2**8;",
                                             rng.choice(SPACES)]) for _ in range(rng.randint(3, 40))),
        "punct": lambda: "".join(rng.choice([rng.choice(sentences),
                                             "".join(rng.choices(PUNCT, k=rng.randint(1, 30)))])
                                 for _ in range(rng.randint(2, 20))),
        "unknown": lambda: "".join(rng.choice([rare_word(), letters(), rng.choice(sentences), " "])
                                   for _ in range(rng.randint(2, 12))),
        "emoji": lambda: "".join(rng.choice([rng.choice(sentences), "".join(rng.choices(EMOJI, k=rng.randint(1, 8))),
                                             rng.choice(english)]) for _ in range(rng.randint(2, 15))),
        "space": lambda: "".join(rng.choice([rng.choice(sentences), rng.choice(english), rng.choice(SPACES)])
                                 for _ in range(rng.randint(2, 30))),
    }
    docs, size, counts = [], 0, dict.fromkeys(kinds, 0)
    while size < mb * 1e6:
        kind = rng.choice(list(kinds))
        doc = kinds[kind]().replace("\n", "<n>").replace("\r", "")
        if doc.strip():
            docs.append(doc)
            size += len(doc.encode()) + 1
            counts[kind] += 1
    return docs, counts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", required=True)
    p.add_argument("--reference", required=True, help="directory holding Yuan 1.0's tokenization_enc_dec.py")
    p.add_argument("--mb", type=float, default=10.0)
    p.add_argument("--speed-mb", type=float, default=1.7)
    p.add_argument("--text", default="/tmp/yuan_parity.txt")
    p.add_argument("--workers", type=int, default=0, help="also time data.py prepare with 1 and this many workers")
    args = p.parse_args()
    sys.path.insert(0, os.path.abspath(args.reference))
    import jieba
    from tokenization_enc_dec import EncDecTokenizer  # the reference, from --reference
    from dataprep import tokenizer as ours
    jieba.setLogLevel(60)
    docs, counts = generate(args.mb)
    with open(args.text, "w", encoding="utf-8") as f:
        f.writelines(d + "\n" for d in docs)
    print(f"text: {len(docs):,} documents, {os.path.getsize(args.text) / 1e6:.2f} MB -> {args.text}; by kind: {counts}")
    print(f"jieba {jieba.__version__}; reference: {os.path.abspath(args.reference)}")

    ref = EncDecTokenizer(args.vocab)
    texts = [d.replace("<n>", "\n") for d in docs]
    t0 = time.time()
    expected = [ref.encode(t) for t in texts]
    t_ref = time.time() - t0
    print(f"reference: {sum(map(len, expected)):,} ids in {t_ref:.1f} s")
    for segmenter in ("jieba + rjieba", "jieba"):
        enc = ours.YuanTokenizer(args.vocab)
        if segmenter == "jieba":
            enc.cut = jieba.lcut
        t0 = time.time()
        got = [enc.encode_ordinary(t) for t in texts]
        bad = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
        print(f"ours with {segmenter}: {time.time() - t0:.1f} s; documents with different ids: {len(bad)} of "
              f"{len(docs):,}" + (f"; first: line {bad[0] + 1}" if bad else ""))
        for i in bad[:3]:
            print(f"  line {i + 1}: {docs[i][:120]!r}\n    reference {expected[i][:30]}\n    ours      {got[i][:30]}")

    # speed, side by side on Chinese prose (the ASC22 corpus is Chinese web text), one core each
    prose, size = [], 0
    with open(os.path.join(ROOT, "corpus", "sanguo.txt"), encoding="utf-8") as f:
        for line in f:
            if size >= args.speed_mb * 1e6:
                break
            prose.append(line.strip().replace("<n>", "\n"))
            size += len(line.encode())
    mb = sum(len(t.encode()) for t in prose) / 1e6
    rates = {}
    for name, encode in (("reference EncDecTokenizer.encode", EncDecTokenizer(args.vocab).encode),
                         ("ours (jieba + rjieba)", ours.YuanTokenizer(args.vocab).encode_ordinary)):
        t0 = time.time()
        n = sum(len(encode(t)) for t in prose if t)
        rates[name] = mb / (time.time() - t0)
        print(f"speed: {name}: {mb:.2f} MB, {n:,} ids in {mb / rates[name]:.1f} s = {rates[name]:.2f} MB/s")
    ratio = rates["ours (jieba + rjieba)"] / rates["reference EncDecTokenizer.encode"]
    print(f"speed: ours / reference = {ratio:.1f}x per core (goal: at least 5x)")
    if args.workers:
        prepare_scaling(args.vocab, args.text, args.workers)


def prepare_scaling(vocab, text, most):
    """data.py prepare with yuan: on the parity text, 1 worker and then `most`: MB/s of the whole command, and of
    the tokenizing alone (the whole command less the same command's time on a one-document input: start-up, loading
    the vocabulary and jieba's dictionary in each worker), and the ratios to N x one."""
    import shutil
    import subprocess
    import tempfile
    tiny = os.path.join(tempfile.mkdtemp(prefix="yuan_tiny_"), "one.txt")
    with open(text, encoding="utf-8") as f, open(tiny, "w", encoding="utf-8") as g:
        g.write(f.readline())

    def seconds(path, workers):
        out = tempfile.mkdtemp(prefix="yuan_prepare_")
        shutil.rmtree(out)
        t0 = time.time()
        subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "prepare", "--input", path, "--tokenizer",
                        f"yuan:{vocab}", "--out", out, "--workers", str(workers), "--piece-mb", "0.5"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(out)
        return time.time() - t0
    mb, whole, work = os.path.getsize(text) / 1e6, {}, {}
    for workers in (1, most):
        fixed = seconds(tiny, workers)
        t = seconds(text, workers)
        whole[workers], work[workers] = mb / t, mb / (t - fixed)
        print(f"prepare: {workers} worker{'s' * (workers > 1)}: {t:.1f} s = {whole[workers]:.2f} MB/s whole command; "
              f"{fixed:.1f} s of it start-up (the same command on one document): {work[workers]:.2f} MB/s tokenizing")
    print(f"prepare: {most} workers / ({most} x one) = {whole[most] / (most * whole[1]):.2f} whole command, "
          f"{work[most] / (most * work[1]):.2f} tokenizing (goal: at least 0.9)")


if __name__ == "__main__":
    main()
