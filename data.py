"""Text -> tiktoken tokens -> memory-mapped uint16 files -> batches.

    python data.py train-tokenizer --input data/sanguo.txt --vocab-size 8192 --out out/tok/sanguo.tiktoken
    python data.py prepare --input data/sanguo.txt --tokenizer out/tok/sanguo.tiktoken --out out/data/sanguo

Inputs: `.txt` with one document per line (the ASC22 corpus writes in-document newlines as the literal `<n>`), or
`.jsonl` with a "text" field. Every document is followed by the end-of-document token. Output: DIR/train.bin and
DIR/val.bin, each a 64-byte header (see HEADER) followed by uint16 token ids, and DIR/meta.json.
"""
import argparse
import base64
import codecs
import hashlib
import json
import os
import struct
import sys

import numpy as np
import torch

from errors import UserError

# Pre-tokenizer split (GPT-2's, which tiktoken's r50k_base also uses). Runs of Chinese characters stay one piece,
# so BPE can learn multi-character words such as 玄德 or 丞相.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
UINT16_IDS = 65536
BUILTIN_OK = ("gpt2", "r50k_base", "p50k_base")  # ids < 65,536
BUILTIN_TOO_BIG = ("cl100k_base", "o200k_base", "o200k_harmony")

# ------------------------------------------------------------------------------------------------------------------
# Tokenizer: trained with `tokenizers`, stored and used as tiktoken


def _byte_alphabet():
    """Byte-level BPE writes each byte as a printable character (GPT-2's table); this maps them back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def train_tokenizer(inputs, vocab_size, out):
    """Byte-level BPE with `tokenizers`, saved as a tiktoken rank file `out` plus `out` with suffix .json."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    if not 257 <= vocab_size <= UINT16_IDS:
        raise UserError(f"--vocab-size {vocab_size} is outside [257, {UINT16_IDS:,}]: token ids are stored as "
                        f"uint16, and 256 byte tokens plus {EOT} are the minimum.")
    side = os.path.splitext(out)[0] + ".json"
    for path in (out, side):
        if os.path.exists(path):
            raise UserError(f"{path} already exists; it is not overwritten.\nHINT: delete it or choose another --out.")
    stats = Stats()
    docs = [d for path in check_inputs(inputs) for d in read_documents(path, stats)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    # tiktoken ranks: the 256 bytes first, then each merge in the order BPE learned it, so that tiktoken's
    # "merge the lowest-ranked pair" reproduces the trained merges.
    to_byte = _byte_alphabet()
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in json.loads(tok.to_str())["model"]["merges"]:
        merged = bytes(to_byte[c] for c in a + b)
        ranks.setdefault(merged, len(ranks))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    with open(side + ".tmp", "w") as f:
        json.dump({"pattern": SPLIT_PATTERN, "special_tokens": {EOT: len(ranks)}}, f, indent=1)
    os.replace(side + ".tmp", side)
    os.replace(out + ".tmp", out)
    print(f"tokenizer: {len(ranks) + 1:,} tokens ({len(ranks) - 256:,} merges) trained on {stats.docs:,} documents "
          f"-> {out}")
    if len(ranks) + 1 < vocab_size:
        print(f"note: the corpus only supports {len(ranks) + 1:,} of the {vocab_size:,} tokens asked for.")


def load_tokenizer(spec):
    """A tiktoken.Encoding and its identity {name, hash, n_vocab, eot} from a rank file or a built-in name."""
    import tiktoken
    if os.path.isfile(spec):
        side = os.path.splitext(spec)[0] + ".json"
        if not os.path.isfile(side):
            raise UserError(f"{side} (split pattern and special tokens of {spec}) is missing.\n"
                            f"HINT: keep the .json that `data.py train-tokenizer` wrote beside the .tiktoken file.")
        raw, side_raw = open(spec, "rb").read(), open(side, "rb").read()
        try:
            ranks = {base64.b64decode(tok): int(r) for tok, r in (line.split() for line in raw.splitlines() if line)}
            extra = json.loads(side_raw)
            enc = tiktoken.Encoding(os.path.basename(spec), pat_str=extra["pattern"], mergeable_ranks=ranks,
                                    special_tokens=extra["special_tokens"])
        except Exception as e:
            raise UserError(f"{spec} is not a tiktoken rank file with its .json ({e}).") from None
        digest = hashlib.sha256(raw + side_raw).hexdigest()
    elif spec in BUILTIN_TOO_BIG:
        raise UserError(f"tokenizer {spec} has ids up to ~{200_000 if 'o200k' in spec else 100_000:,}, which do not "
                        f"fit uint16 (< 65,536).\nHINT: use gpt2 or p50k_base, or train one: "
                        f"python data.py train-tokenizer --input FILE --vocab-size 53228 --out tok.tiktoken")
    elif spec in BUILTIN_OK:
        try:
            enc = tiktoken.get_encoding(spec)
        except Exception as e:
            raise UserError(
                f"could not load tiktoken's built-in {spec!r}: {type(e).__name__}: {str(e)[:200]}\n"
                f"tiktoken downloads built-in encodings once and caches them in $TIKTOKEN_CACHE_DIR "
                f"(default: a data-gym-cache folder in the temp dir).\nHINT: on a machine without internet, copy that "
                f"cache folder from a machine that has run tiktoken.get_encoding({spec!r}) and set "
                f"TIKTOKEN_CACHE_DIR to it, or train a tokenizer offline with `python data.py train-tokenizer`."
            ) from None
        digest = hashlib.sha256(f"tiktoken:{spec}".encode()).hexdigest()
    else:
        raise UserError(f"tokenizer {spec!r} is neither a file nor a usable tiktoken built-in "
                        f"({', '.join(BUILTIN_OK)}).")
    if enc.n_vocab > UINT16_IDS:
        raise UserError(f"tokenizer {spec} has {enc.n_vocab:,} tokens; ids must fit uint16 (at most {UINT16_IDS:,}).")
    return enc, dict(name=os.path.basename(spec), hash=digest, n_vocab=enc.n_vocab, eot=enc.eot_token)


# ------------------------------------------------------------------------------------------------------------------
# Reading documents


class Stats:
    def __init__(self):
        self.docs, self.chars, self.bad_bytes, self.empty_files = 0, 0, 0, []


def check_inputs(paths):
    if not paths:
        raise UserError("no --input files given.")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"input file(s) not found: {', '.join(missing)}")
    return paths


def read_documents(path, stats):
    """Yield the documents of one .txt (one per line, `<n>` = newline) or .jsonl ({"text": ...}) file, streaming.
    Bytes that are not UTF-8 become U+FFFD and are counted in stats.bad_bytes."""
    def count_bad(err):
        stats.bad_bytes += err.end - err.start
        return "\ufffd", err.end
    codecs.register_error("nanoyuan_count", count_bad)  # re-registering replaces the handler: one per file
    is_jsonl = path.endswith(".jsonl")
    n_before = stats.docs
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="nanoyuan_count").rstrip("\r\n")
            if not line.strip():
                continue
            if is_jsonl:
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: not a JSON object with a \"text\" string.")
            else:
                text = line.replace("<n>", "\n")
            stats.docs += 1
            stats.chars += len(text)
            yield text
    if stats.docs == n_before:
        stats.empty_files.append(path)
        print(f"warning: {path} holds no documents; skipped.", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------------
# The token file: header + uint16 ids

MAGIC, VERSION = b"NYUANTOK", 1
HEADER = struct.Struct("<8sIIQ16s")  # magic, format version, vocab size, token count, tokenizer hash (16 bytes)
HEADER_BYTES = 64  # HEADER padded with zeros, so the token array starts aligned


def write_tokens(path, chunks, n_vocab, tok_hash):
    """Write uint16 arrays to path.tmp, then rename it to path: a crash never leaves a complete-looking file."""
    n = 0
    with open(path + ".tmp", "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        for chunk in chunks:
            f.write(chunk.astype(np.uint16).tobytes())
            n += len(chunk)
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, n_vocab, n, bytes.fromhex(tok_hash)[:16]))
    os.replace(path + ".tmp", path)
    return n


def open_tokens(path, n_vocab=None, tok_hash=None):
    """Memory-map a token file after checking its header and size against the expected tokenizer."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found.\nHINT: run `python data.py prepare ... --out {os.path.dirname(path)}`.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if size < HEADER_BYTES or head[:8] != MAGIC:
        raise UserError(f"{path} is not a nanoyuan token file (bad magic).\nHINT: re-create it with data.py prepare.")
    _, version, vocab, count, h = HEADER.unpack(head)
    if version != VERSION:
        raise UserError(f"{path} has format version {version}; this code reads version {VERSION}.\n"
                        f"HINT: re-run data.py prepare with this version of the code.")
    if size != HEADER_BYTES + 2 * count:
        raise UserError(f"{path} is truncated or corrupt: header says {count:,} tokens = "
                        f"{HEADER_BYTES + 2 * count:,} bytes, file has {size:,}.\nHINT: re-run data.py prepare.")
    if n_vocab is not None and (vocab != n_vocab or (tok_hash and h != bytes.fromhex(tok_hash)[:16])):
        raise UserError(f"{path} was written with a different tokenizer (vocab {vocab:,}) than meta.json's "
                        f"(vocab {n_vocab:,}).\nHINT: re-run data.py prepare into a fresh directory.")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))


def prepare(inputs, tokenizer, out, val_fraction=0.05):
    """Tokenize documents into out/train.bin, out/val.bin and out/meta.json. A document goes to val when a hash of
    its text falls below val_fraction: deterministic, independent of file order, duplicates never straddle."""
    enc, tok = load_tokenizer(tokenizer)
    check_inputs(inputs)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive).")
    if os.path.exists(os.path.join(out, "meta.json")) or os.path.exists(os.path.join(out, "train.bin")):
        raise UserError(f"{out} already holds prepared data; it is not overwritten.\n"
                        f"HINT: delete {out} or choose another --out.")
    os.makedirs(out, exist_ok=True)
    stats = Stats()
    split = {"train": [], "val": []}
    threshold = int(val_fraction * 2**64)
    for path in inputs:
        for text in read_documents(path, stats):
            is_val = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") < threshold
            split["val" if is_val else "train"].append(text)
    if stats.docs == 0:
        raise UserError(f"no documents in {', '.join(inputs)} (empty files or blank lines only).")
    counts = {}
    for name, docs in split.items():
        if not docs:
            raise UserError(f"the {name} split is empty ({stats.docs} documents, --val-fraction {val_fraction}).\n"
                            f"HINT: add documents or change --val-fraction.")
        ids = enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)
        chunks = (np.array(d + [tok["eot"]], dtype=np.uint16) for d in ids)
        counts[name] = write_tokens(os.path.join(out, f"{name}.bin"), chunks, tok["n_vocab"], tok["hash"])
    if os.path.isfile(tokenizer):  # keep a copy, so the data directory alone can decode its tokens
        for src in (tokenizer, os.path.splitext(tokenizer)[0] + ".json"):
            with open(src, "rb") as f, open(os.path.join(out, "tokenizer" + os.path.splitext(src)[1]), "wb") as g:
                g.write(f.read())
    meta = dict(format_version=VERSION, tokenizer=tok, tokenizer_spec=tokenizer, sources=inputs,
                documents=stats.docs, val_documents=len(split["val"]), characters=stats.chars,
                replaced_bytes=stats.bad_bytes, empty_files=stats.empty_files, tokens=counts,
                val_fraction=val_fraction)
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
    print(f"prepared {stats.docs:,} documents, {stats.chars:,} characters -> {counts['train']:,} train + "
          f"{counts['val']:,} val tokens ({(counts['train'] + counts['val']) / max(stats.chars, 1):.3f} tokens/char)"
          f"; {stats.bad_bytes} non-UTF-8 bytes replaced -> {out}")
    return meta


# ------------------------------------------------------------------------------------------------------------------
# Batches for training


class Batches:
    """Windows of seq_len + 1 tokens from a prepared directory. Training windows are a pure function of
    (seed, step, global micro-batch index): a resumed run reads exactly the batches the uninterrupted run would
    have read, and every data-parallel rank reads different ones."""

    def __init__(self, data_dir, seq_len, micro_batch, seed, rank=0, dp=1):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{meta_path} not found: {data_dir} is not a prepared data directory.\n"
                            f"HINT: python data.py prepare --input FILE --tokenizer TOK --out {data_dir}")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.tokenizer = self.meta["tokenizer"]
        self.seq_len, self.micro_batch, self.seed, self.rank, self.dp = seq_len, micro_batch, seed, rank, dp
        self.train, self.val = (open_tokens(os.path.join(data_dir, f"{s}.bin"), self.tokenizer["n_vocab"],
                                            self.tokenizer["hash"]) for s in ("train", "val"))
        for name, arr in (("train", self.train), ("val", self.val)):
            if len(arr) < seq_len + 1:
                raise UserError(f"{data_dir}/{name}.bin has {len(arr):,} tokens, fewer than one window of seq_len + 1 "
                                f"= {seq_len + 1:,}.\nHINT: lower --seq_len or prepare more text.")

    def unigram_entropy(self, max_tokens=10_000_000):
        """Entropy (nats/token) of the token frequencies in train.bin (its first max_tokens): the loss of the best
        model that ignores context. A trained model's val loss should end far below it."""
        counts = np.bincount(self.train[:max_tokens], minlength=self.tokenizer["n_vocab"])
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def _stack(self, arr, starts):
        w = np.stack([arr[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)  # [B, T+1]
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]  # inputs [B, T], targets [B, T]

    def train_batch(self, step, micro):
        """Micro-batch `micro` of data-parallel rank `rank`. Its windows depend on its index in the global batch,
        micro * dp + rank, so the global batch of a step is the same whatever the data-parallel size."""
        rng = np.random.default_rng([self.seed, step, micro * self.dp + self.rank])
        return self._stack(self.train, rng.integers(0, len(self.train) - self.seq_len, size=self.micro_batch))

    def val_batches(self, n):
        """n fixed micro-batches spread evenly over val.bin (the same ones at every evaluation)."""
        starts = np.linspace(0, len(self.val) - self.seq_len - 1, n * self.micro_batch).astype(np.int64)
        for i in range(n):
            yield self._stack(self.val, starts[i * self.micro_batch:(i + 1) * self.micro_batch])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE, saved as a tiktoken rank file")
    t.add_argument("--input", nargs="+", required=True, help=".txt (ASC22 format) or .jsonl files")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens including <|endoftext|>, at most 65536")
    t.add_argument("--out", required=True, help="PATH.tiktoken; PATH.json is written beside it")
    r = sub.add_parser("prepare", help="tokenize text into DIR/train.bin, DIR/val.bin, DIR/meta.json")
    r.add_argument("--input", nargs="+", required=True, help=".txt (ASC22 format) or .jsonl files")
    r.add_argument("--tokenizer", required=True, help="a .tiktoken file from train-tokenizer, or gpt2 / p50k_base")
    r.add_argument("--out", required=True, help="output directory (must not hold prepared data yet)")
    r.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "train-tokenizer":
            train_tokenizer(args.input, args.vocab_size, args.out)
        else:
            prepare(args.input, args.tokenizer, args.out, args.val_fraction)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
