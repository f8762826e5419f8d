"""The tokenizer: a byte-level BPE trained with `tokenizers`, stored and run as tiktoken.

    python data.py train-tokenizer --input corpus/sanguo.txt --vocab-size 8192 --out out/tok/sanguo.tiktoken

Training (once, on a bounded sample of the corpus: see prepare.sample_documents) uses Hugging Face `tokenizers`;
encoding (billions of tokens) uses tiktoken, which is faster. The rank file lists the 256 bytes, then each merge in
the order BPE learned it, so tiktoken's "merge the lowest-ranked pair first" reproduces the trained merges. A .json
beside it holds the split pattern and the end-of-document token.
"""
import base64
import hashlib
import json
import os

from errors import UserError

# Pre-tokenizer split (GPT-2's, which tiktoken's r50k_base also uses). Runs of Chinese characters stay one piece,
# so BPE can learn multi-character words such as 玄德 or 丞相.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
UINT16_IDS = 65536  # token ids are stored as uint16
BUILTIN_OK = ("gpt2", "r50k_base", "p50k_base")  # ids < 65,536
BUILTIN_TOO_BIG = ("cl100k_base", "o200k_base", "o200k_harmony")


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


def check_vocab_and_out(vocab_size, out):
    """The mistakes to catch before reading any text."""
    if not 257 <= vocab_size <= UINT16_IDS:
        raise UserError(f"--vocab-size {vocab_size} is outside [257, {UINT16_IDS:,}]: token ids are stored as "
                        f"uint16, and 256 byte tokens plus {EOT} are the minimum.")
    for path in (out, os.path.splitext(out)[0] + ".json"):
        if os.path.exists(path):
            raise UserError(f"{path} already exists; it is not overwritten.\nHINT: delete it or choose another --out.")


def train_tokenizer(documents, vocab_size, out):
    """Byte-level BPE on an iterable of strings, saved as a tiktoken rank file `out` plus `out` with suffix .json.
    Returns the number of tokens, which is below vocab_size when the text supports fewer merges."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    check_vocab_and_out(vocab_size, out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    to_byte = _byte_alphabet()
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in json.loads(tok.to_str())["model"]["merges"]:
        ranks.setdefault(bytes(to_byte[c] for c in a + b), len(ranks))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    side = os.path.splitext(out)[0] + ".json"
    with open(out + ".tmp", "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    with open(side + ".tmp", "w") as f:
        json.dump({"pattern": SPLIT_PATTERN, "special_tokens": {EOT: len(ranks)}}, f, indent=1)
    os.replace(side + ".tmp", side)
    os.replace(out + ".tmp", out)
    return len(ranks) + 1


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


def encode_lines(enc, lines):
    """`data.py encode`: each input line (one document in the corpus's .txt form: `<n>` is a newline, as prepare
    reads it) as its token ids, space-separated, one line of ids per line; no end-of-document token (prepare adds
    one after each document)."""
    for line in lines:
        yield " ".join(map(str, enc.encode_ordinary(line.rstrip("\r\n").replace("<n>", "\n"))))


def decode_lines(enc, lines):
    """`data.py decode`: the reverse of encode_lines; a newline in the text is written back as `<n>`, so that each
    line of ids stays one line of text."""
    for number, line in enumerate(lines, 1):
        try:
            ids = [int(word) for word in line.split()]
        except ValueError:
            raise UserError(f"line {number} of the input is not token ids: {line.strip()[:80]!r}.\nHINT: data.py "
                            f"decode reads space-separated integers, one document per line (what encode prints).")
        bad = [i for i in ids if not 0 <= i < enc.n_vocab]
        if bad:
            raise UserError(f"line {number}: token id {bad[0]} is outside this tokenizer's vocabulary "
                            f"(0..{enc.n_vocab - 1}).\nHINT: decode with the tokenizer that encoded the ids.")
        yield enc.decode(ids).replace("\n", "<n>")
