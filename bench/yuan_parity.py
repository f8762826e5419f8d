"""The yuan: tokenizer against Yuan 1.0's own: the same ids on varied text, and how much faster.

    python bench/yuan_parity.py --vocab PATH/vocab.txt --reference DIR [--mb 10] [--text FILE] [--speed-mb 1]
                                [--repeat 3] [--workers 2]

DIR holds Yuan 1.0's tokenization_enc_dec.py (src/megatron/tokenizer/ in github.com/Shawn-IEITSystems/Yuan-1.0;
it needs `jieba` and `six`); it is imported from there and never copied here. The text (written to --text, one
document per line in the corpus's form, `<n>` for a newline) is generated from corpus/sanguo.txt and fixed random
draws, in seven kinds: Chinese prose; Chinese mixed with English, digits and code; runs of punctuation; long unknown
words (letters, rare CJK, other scripts); emoji (skin tones, ZWJ sequences, flags); odd whitespace; English-heavy
(two lines of English prose and code to one of Chinese). Each line is encoded by the reference's
EncDecTokenizer.encode (jieba 0.42.1) and by ours, as it runs (a pattern where no dictionary is needed, rjieba,
jieba where rjieba differs) and with jieba alone, and the ids must be equal line for line.
Speed: the whole process, as a user runs each: --speed-mb of each kind alone in a file, the reference's
EncDecTokenizer in a small script that prints each line's ids, against `data.py encode`, one core each, the
fastest of --repeat runs; their output must be equal too. Results in bench/RESULTS.md.
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


def generate(mb, seed=0, only=None):
    """Documents of the seven kinds (or `only` that one) until `mb` MB of UTF-8, in a fixed order."""
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
        # the English-heavy corpus: two lines of English prose or code to one of Chinese
        "english": lambda: (" ".join(rng.choices(english, k=rng.randint(6, 40))) if rng.random() < 2 / 3 else
                            "，".join(rng.choices(sentences, k=rng.randint(1, 4))) + "。"),
    }
    docs, size, counts = [], 0, dict.fromkeys(kinds, 0)
    while size < mb * 1e6:
        kind = only or rng.choice(list(kinds))
        doc = kinds[kind]().replace("\n", "<n>").replace("\r", "")
        if doc.strip():
            docs.append(doc)
            size += len(doc.encode()) + 1
            counts[kind] += 1
    return docs, counts


KINDS = ("prose", "mixed", "punct", "unknown", "emoji", "space", "english")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", required=True)
    p.add_argument("--reference", required=True, help="directory holding Yuan 1.0's tokenization_enc_dec.py")
    p.add_argument("--mb", type=float, default=10.0)
    p.add_argument("--speed-mb", type=float, default=1.0, help="MB of each kind for the whole-process timing")
    p.add_argument("--repeat", type=int, default=3, help="runs of each command timed; the fastest counts")
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

    # speed: the whole process, as a user runs each (start-up, the vocabulary, jieba's dictionaries, printing), on
    # --speed-mb of each kind alone, side by side on one core; the printed ids must be equal too
    runner = os.path.join(os.path.dirname(args.text), "yuan_reference_encode.py")
    with open(runner, "w", encoding="utf-8") as f:
        f.write(RUNNER)
    print(f"speed, whole process, best of {args.repeat}: reference `python {runner} REFERENCE VOCAB < FILE`, ours "
          f"`python data.py encode --tokenizer yuan:VOCAB < FILE`")
    print(f"  {'kind':<8} {'MB':>5} {'reference s':>11} {'ours s':>7} {'ref MB/s':>8} {'ours MB/s':>9} "
          f"{'ours / ref':>10}")
    worst = None
    for kind in KINDS:
        path = f"{args.text}.{kind}"
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(d + "\n" for d in generate(args.speed_mb, seed=1, only=kind)[0])
        mb = os.path.getsize(path) / 1e6
        t_ref, out_ref = whole_process([sys.executable, runner, os.path.abspath(args.reference), args.vocab], path,
                                       args.repeat)
        t_ours, out_ours = whole_process([sys.executable, os.path.join(ROOT, "data.py"), "encode", "--tokenizer",
                                          f"yuan:{args.vocab}"], path, args.repeat)
        same = "" if out_ref == out_ours else "  IDS DIFFER"
        print(f"  {kind:<8} {mb:>5.2f} {t_ref:>11.2f} {t_ours:>7.2f} {mb / t_ref:>8.2f} {mb / t_ours:>9.2f} "
              f"{t_ref / t_ours:>9.1f}x{same}")
        worst = min(worst or t_ref / t_ours, t_ref / t_ours)
    print(f"speed: the slowest kind is {worst:.1f}x the reference, whole process (goal: at least 4x on every kind)")
    if args.workers:
        prepare_scaling(args.vocab, args.text, args.workers)


# The reference as a user runs it on a file of documents, one per line (<n> a newline): its own EncDecTokenizer,
# imported from the directory given, each line's ids printed as data.py encode prints ours.
RUNNER = """import sys
sys.path.insert(0, sys.argv[1])
from tokenization_enc_dec import EncDecTokenizer
enc = EncDecTokenizer(sys.argv[2])
for line in sys.stdin:
    print(" ".join(map(str, enc.encode(line.rstrip("\\n").replace("<n>", "\\n")))), flush=True)
"""


def whole_process(command, path, repeat):
    """(the fastest wall time of `repeat` runs of command with the file on stdin, what it printed)."""
    import subprocess
    best = None
    for _ in range(repeat):
        with open(path, "rb") as f:
            t0 = time.perf_counter()
            out = subprocess.run(command, stdin=f, capture_output=True, check=True).stdout
            t = time.perf_counter() - t0
        best = min(best or t, t)
    return best, out


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
