"""The tokenizers: our byte-level BPE (trained with `tokenizers`, run as tiktoken), and the two that ASC22 used.

    python data.py train-tokenizer --input corpus/sanguo.txt --vocab-size 8192 --out out/tok/sanguo.tiktoken
    --tokenizer out/tok/sanguo.tiktoken     our BPE (or a tiktoken built-in: gpt2, p50k_base)
    --tokenizer yuan:PATH/vocab.txt         Yuan 1.0's own: jieba words, then longest-match pieces (YuanTokenizer)
    --tokenizer bert:PATH/vocab.txt         Megatron's BertWordPieceLowerCase, as ASC22 teams ran it (bert_tokenizer)

Each loads as an object with tiktoken's interface (encode_ordinary, encode_to_numpy, decode, n_vocab, eot_token)
plus an identity {kind, name, hash, n_vocab, eot} that meta.json and every checkpoint carry. A copy of the
tokenizer's files goes beside the prepared data and the checkpoints (save_copy), so they alone can decode.

Our BPE: training (once, on a bounded sample of the corpus: see prepare.sample_documents) uses Hugging Face
`tokenizers`; encoding (billions of tokens) uses tiktoken, which is faster. The rank file lists the 256 bytes, then
each merge in the order BPE learned it, so tiktoken's "merge the lowest-ranked pair first" reproduces the trained
merges. A .json beside it holds the split pattern and the end-of-document token.
"""
import base64
import hashlib
import json
import os
import re
import shutil

from runtime.errors import UserError

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


def hf_tokenizer(enc, eot):
    """The tiktoken encoding as a `tokenizers` byte-level BPE with the same ids (export.py's tokenizer.json).
    tiktoken keeps only ranks; a BPE needs merges: each token of two or more bytes is the merge of the split whose
    halves are both tokens, the earliest-ranked such pair (the merge BPE learned). ignore_merges=True makes a piece
    that is itself a token one token, as tiktoken does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    to_char = {b: c for c, b in _byte_alphabet().items()}
    text = lambda bs: "".join(to_char[b] for b in bs)  # noqa: E731
    ranks = enc._mergeable_ranks
    vocab = {text(bs): rank for bs, rank in ranks.items()}
    merges = []
    for bs, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(max(ranks[bs[:i]], ranks[bs[i:]]), bs[:i], bs[i:]) for i in range(1, len(bs))
                  if bs[:i] in ranks and bs[i:] in ranks and max(ranks[bs[:i]], ranks[bs[i:]]) < rank]
        if splits:
            _, a, b = min(splits)
            merges.append((text(a), text(b)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([enc.decode([eot])])
    return tok


def load_tokenizer(spec):
    """The tokenizer `spec` names (see the module docstring) and its identity {kind, name, hash, n_vocab, eot}."""
    kind, _, path = spec.partition(":")
    if kind in VOCAB_KINDS and path:
        enc = VOCAB_KINDS[kind](path)
        return enc, dict(kind=kind, name=f"{kind}:{os.path.basename(path)}", hash=enc.hash, n_vocab=enc.n_vocab,
                         eot=enc.eot_token)
    enc, tok = _load_tiktoken(spec)
    return enc, dict(kind="tiktoken", **tok)


def _load_tiktoken(spec):
    """A tiktoken.Encoding and its identity {name, hash, n_vocab, eot} from a rank file or a built-in name."""
    import tiktoken
    if os.path.isfile(spec):
        side = os.path.splitext(spec)[0] + ".json"
        if not os.path.isfile(side):
            wordpiece_without_kind(spec)
            raise UserError(f"{side} (split pattern and special tokens of {spec}) is missing.\n"
                            f"HINT: keep the .json that `data.py train-tokenizer` wrote beside the .tiktoken file.")
        raw, side_raw = open(spec, "rb").read(), open(side, "rb").read()
        try:
            ranks = {base64.b64decode(tok): int(r) for tok, r in (line.split() for line in raw.splitlines() if line)}
            extra = json.loads(side_raw)
            enc = tiktoken.Encoding(os.path.basename(spec), pat_str=extra["pattern"], mergeable_ranks=ranks,
                                    special_tokens=extra["special_tokens"])
        except Exception as e:
            wordpiece_without_kind(spec)  # a vocab.txt beside some other vocab.json
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
        raise UserError(f"tokenizer {spec!r} is neither a file, nor yuan:PATH/vocab.txt or bert:PATH/vocab.txt, nor a "
                        f"usable tiktoken built-in ({', '.join(BUILTIN_OK)}){looked_for(spec)}.\nHINT: pass the "
                        f".tiktoken file that `data.py train-tokenizer` wrote, yuan:PATH/vocab.txt or "
                        f"bert:PATH/vocab.txt (a path that exists: absolute, or relative to the current directory), or "
                        f"a built-in name.")
    if enc.n_vocab > UINT16_IDS:
        raise UserError(f"tokenizer {spec} has {enc.n_vocab:,} tokens; ids must fit uint16 (at most {UINT16_IDS:,}).")
    return enc, dict(name=os.path.basename(spec), hash=digest, n_vocab=enc.n_vocab, eot=enc.eot_token)


def looked_for(path):
    """Where a relative path that is not there was looked for: the current directory is easily not the one meant
    (a vocab path typed relative to the docs, or a job script that starts elsewhere)."""
    if os.path.isabs(path) or os.path.exists(path):
        return ""
    return f" (looked for {os.path.abspath(path)}: a relative path is taken from the current directory {os.getcwd()})"


def wordpiece_without_kind(path):
    """The error for a vocab.txt of WordPiece pieces (Yuan's, Inspur's, a BERT one) given without yuan: or bert:,
    which would otherwise be read as a .tiktoken file and be told its .json is missing. A WordPiece vocabulary is
    one piece per line with no space inside a line (a rank file's lines are "BASE64 RANK"), among them an unknown
    token ([UNK] or <unk>), "##" continuation pieces or single CJK characters. Returns when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read(1 << 24).splitlines()]
    except (OSError, UnicodeDecodeError):
        return
    pieces = [line for line in lines if line]
    if not pieces or sum(" " in line for line in pieces) > len(pieces) // 100:
        return
    signs = [f"an unknown token {unk}" for unk in ("<unk>", "[UNK]") if unk in pieces]
    cont = sum(line.startswith("##") for line in pieces)
    cjk = sum(len(line) == 1 and CHINESE.match(line) is not None for line in pieces)
    if cont:
        signs.append(f"{cont:,} ## continuation pieces")
    if cjk:
        signs.append(f"{cjk:,} single Chinese characters")
    if not signs:
        return
    if "<unk>" in pieces and "<eod>" in pieces and len(lines) > 10 and lines[10] == "\u2582":
        fits = " (this one has Yuan's <unk>, <eod> and \u2582 at line 11: yuan: fits it)"
    else:
        fits = " (this one has BERT's [UNK]: bert: fits it)" if "[UNK]" in pieces else ""
    raise UserError(
        f"--tokenizer {path} is a WordPiece vocab.txt ({len(lines):,} lines, one piece per line: "
        f"{', '.join(signs)}), not a .tiktoken file; a vocab.txt is run by one of two tokenizers, and the prefix says "
        f"which{fits}.\nHINT: --tokenizer yuan:{path} for Yuan 1.0's tokenizer as Inspur runs it (jieba words, then "
        f"WordPiece; ids identical to Inspur's), or --tokenizer bert:{path} for Megatron's BertWordPieceTokenizer, as "
        f"some ASC22 teams ran it (needs a [UNK] line).")


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


# ------------------------------------------------------------------------------------------------------------------
# A copy beside the data and the checkpoints


def copy_names(tok):
    """The fixed names a tokenizer's files take in a data or run directory."""
    return ("tokenizer.tiktoken", "tokenizer.json") if tok.get("kind", "tiktoken") == "tiktoken" \
        else ("tokenizer.vocab.txt",)


def save_copy(spec, tok, directory):
    """Copy the files behind `spec` into `directory` under copy_names (a copy already there is kept; a tiktoken
    built-in has no file to copy)."""
    kind, _, path = spec.partition(":")
    sources = [path] if kind in VOCAB_KINDS else [spec, os.path.splitext(spec)[0] + ".json"] \
        if os.path.isfile(spec) else []
    for src, name in zip(sources, copy_names(tok)):
        dst = os.path.join(directory, name)
        if os.path.isfile(src) and not os.path.exists(dst) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)


def copy_spec(directory, tok):
    """The spec that loads the copy save_copy left in `directory`; a built-in's name where there is none."""
    first = os.path.join(directory, copy_names(tok)[0])
    if not os.path.exists(first):
        return tok["name"]
    kind = tok.get("kind", "tiktoken")
    return first if kind == "tiktoken" else f"{kind}:{first}"


# ------------------------------------------------------------------------------------------------------------------
# vocab.txt, read as both references read it (Yuan-1.0's tokenization_enc_dec.py and Megatron's bert_tokenization.py)


def read_vocab(path, kind, required):
    """{piece: id} and the number of ids: line i (from 0) is id i, stripped of surrounding whitespace. A blank line
    takes an id (the piece ""), and a repeated piece keeps its last id; the earlier one is never produced."""
    if os.path.isdir(path):
        raise UserError(f"{kind}:{path} is a directory.\nHINT: {kind}: takes the path of the vocab.txt itself: "
                        f"--tokenizer {kind}:{os.path.join(path, 'vocab.txt')}")
    if not os.path.isfile(path):
        where = looked_for(path)
        raise UserError(f"{kind}:{path}: no such file{where}.\nHINT: {kind}: takes the path of a vocab.txt, one "
                        f"piece per line (Yuan's is src/vocab.txt in github.com/Shawn-IEITSystems/Yuan-1.0)"
                        + (f"; give it as an absolute path, or relative to {os.getcwd()}." if where else "."))
    vocab, n = {}, 0
    try:
        with open(path, encoding="utf-8") as f:  # text mode: a line ends at \n, \r\n or \r, as in the references
            for n, line in enumerate(f, 1):
                vocab[line.strip()] = n - 1
    except UnicodeDecodeError as e:
        raise UserError(f"{kind}:{path} is not a vocab.txt: it is not UTF-8 text ({e.reason} at byte {e.start:,}).\n"
                        f"HINT: pass the vocab.txt the data was (or will be) prepared with.") from None
    missing = [piece for piece in required if piece not in vocab]
    if missing:
        raise UserError(f"{kind}:{path} is not a {'Yuan' if kind == 'yuan' else 'BERT'} vocab.txt: it has no line "
                        f"{' or '.join(missing)} ({n:,} lines read).\nHINT: pass the vocab.txt the data was (or will "
                        f"be) prepared with{TOKENIZER_HINTS[kind]}")
    with open(path, "rb") as f:
        digest = hashlib.sha256(kind.encode() + b":" + f.read()).hexdigest()  # the same file is two tokenizers
    if n > UINT16_IDS:
        raise UserError(f"{kind}:{path} has {n:,} lines; token ids must fit uint16 (at most {UINT16_IDS:,}).")
    return vocab, n, digest


TOKENIZER_HINTS = {
    "yuan": ".",
    "bert": ". Megatron's BertWordPiece maps unknown characters to [UNK]; Yuan's vocab.txt has none (its unknown is "
            "<unk>): append a line [UNK] to a copy, as ASC22 teams did (53,229 lines), or use yuan: instead.",
}


# ------------------------------------------------------------------------------------------------------------------
# yuan: Yuan 1.0's EncDecTokenizer (src/megatron/tokenizer/tokenization_enc_dec.py in Shawn-IEITSystems/Yuan-1.0)

CHINESE = re.compile("[\u4e00-\u9fff]")  # the reference's is_contain_chinese
TO_MARKS = str.maketrans(" \n", "\u2582\u2583")  # space -> ▂, newline -> ▃ (pieces of the vocabulary)
ASCII_END, ASCII_WORD = re.compile("[!-~]$"), re.compile("[A-Za-z0-9]")  # decode: a space between "x" and "y"


# jieba-rs (rjieba) gives jieba's words but in two places. (1) Its blocks also take the CJK extensions and
# compatibility ideographs (RARE), which jieba puts each in a word of its own: the text is cut at each of those first,
# and each part on its own (jieba cuts its blocks one by one: nothing is lost). (2) Letters and digits joined by
# ".", "_" or "-" outside a dictionary word are one word to it ("a.b", "B-H100", "3.5AT0"); jieba cuts them with
# finalseg's pattern ("a" "." "b", "B" "-" "H100", "3.5" "AT0"): such a word is cut again the same way. Checked
# against jieba on 400,000 random mixes of Chinese, ASCII words, punctuation and RARE, and on bench/yuan_parity.py.
RARE = "\u3400-\u4DBF\u9FD6-\u9FFF\uF900-\uFAFF\U00020000-\U0002FA1F"  # in jieba-rs's blocks, not in jieba's
RARE_ONE = re.compile(f"([{RARE}])")
JOINED = re.compile("[a-zA-Z0-9+#&%]*[._\\-][a-zA-Z0-9+#&._%\\-]*$")  # an ASCII word with ".", "_" or "-"
FINALSEG = re.compile("([a-zA-Z0-9]+(?:\\.\\d+)?%?)")  # jieba.finalseg's re_skip
NEAR_JOINER = re.compile("[a-zA-Z0-9+#&%][._\\-]|[._\\-][a-zA-Z0-9+#&%]")
# Text with no Chinese character and none of the five ASCII words of jieba's dictionary (AT&T, c#, C#, c++, C++) is cut
# by jieba without its dictionary: each run of block characters [a-zA-Z0-9+#&._%-] into finalseg's pieces, every
# other character alone, "\r\n" whole. One pattern does all three, without loading a dictionary (English lines).
NEEDS_A_DICTIONARY = re.compile("[\u4E00-\u9FD5]|AT&T|[cC]#|[cC]\\+\\+")
# ([0-9], not finalseg's \d: that runs inside one block, where every digit is ASCII; here \d would take "٣" or "１")
NO_DICTIONARY = re.compile("[a-zA-Z0-9]+(?:\\.[0-9]+)?%?|[+#&._%\\-]+|\r\n|.", re.S)


def _jieba_cut():
    """jieba 0.42.1's precise mode (HMM on), as a function text -> words. jieba itself is the reference; where
    rjieba (jieba-rs) is installed, it cuts the text, many times faster and with the same words (above; checked on
    10 MB: bench/RESULTS.md, "Yuan tokenizer parity"). Text that needs no dictionary is cut by a pattern. Each
    dictionary is loaded when a text first needs it: rjieba's takes a tenth of a second, jieba's half a second."""
    import importlib.util
    if importlib.util.find_spec("jieba") is None:  # a clear error at once; the dictionaries load when needed
        raise UserError("the yuan: tokenizer segments words with jieba, which is not installed.\n"
                        "HINT: .venv/bin/pip install jieba==0.42.1 rjieba  (rjieba is optional: it is faster)")
    loaded = {}

    def jieba_cut(text):
        if "jieba" not in loaded:
            import jieba
            jieba.setLogLevel(60)  # no "Building prefix dict ..." on stderr
            loaded["jieba"] = jieba.lcut
        return loaded["jieba"](text)

    def dictionary_cut(text):
        if "rjieba" not in loaded:
            try:
                from rjieba import cut
            except ImportError:  # jieba itself, everywhere
                cut = jieba_cut
            loaded["rjieba"] = cut
        try:
            words = loaded["rjieba"](text)
        except UnicodeEncodeError:  # a lone surrogate (a .jsonl's "\ud800"): rjieba takes UTF-8 only, jieba any str
            return jieba_cut(text)
        if NEAR_JOINER.search(text):  # else no word of the text can be one to cut again
            joined = [i for i, w in enumerate(words) if len(w) > 1 and JOINED.match(w)]
            for i in reversed(joined):  # (2) above
                words[i:i + 1] = [x for x in FINALSEG.split(words[i]) if x]
        return words

    def cut(text):
        if not NEEDS_A_DICTIONARY.search(text):
            return NO_DICTIONARY.findall(text)
        if not RARE_ONE.search(text):
            return dictionary_cut(text)
        words = []
        for i, part in enumerate(RARE_ONE.split(text)):  # [text, one RARE character, text, ...]
            if i % 2:
                words.append(part)
            elif part:
                words += dictionary_cut(part)
        return words
    return cut


class Words(dict):
    """word -> its ids, each word split (the function given) the first time it is asked for."""

    def __init__(self, split):
        super().__init__()
        self.split = split

    def __missing__(self, word):
        ids = self[word] = self.split(word.translate(TO_MARKS))
        return ids


class YuanTokenizer:
    """Text -> jieba words -> pieces, as Yuan 1.0's EncDecTokenizer.encode does it:

      1. jieba's precise mode cuts the text into words; in each word a space becomes ▂ and a newline ▃;
      2. each word is split greedily into the longest pieces of the vocabulary, left to right: a piece that holds a
         Chinese character (U+4E00..U+9FFF) is looked up as it is, any other piece after the word's first character
         as "##piece"; a character that starts no piece becomes <unk>, and so does a word of over 200 characters;
      3. a space (id 10, ▂) between two non-Chinese pieces is dropped.

    The ids are the reference's (checked on 10 MB by running it: bench/yuan_parity.py). Differences, by design:
    empty text is [] (the reference fails on it), and decode joins "##" pieces to the piece before them (the
    reference prints them as "play ##ing"), and decode puts a space back only between a piece that ends in ASCII and
    one that starts with a letter or digit ("hello world", "Hello, world"): the reference's decode puts one between
    any two non-Chinese pieces, which are also "：", "”" and the newline ("曰： \n “吾乃 ... 之后。 ”"). A document
    ends with <eod>, which prepare appends."""

    SPACE = 10  # the reference hard-codes the id of ▂

    def __init__(self, path):
        self.vocab, self.n_vocab, self.hash = read_vocab(path, "yuan", ("<unk>", "<eod>"))
        if self.vocab.get("\u2582") != self.SPACE:
            raise UserError(f"yuan:{path} is not a Yuan vocab.txt: line {self.SPACE + 1} is not \u2582 (the space), "
                            f"and Yuan's tokenizer takes id {self.SPACE} as the space.\nHINT: pass Yuan's vocab.txt "
                            f"(src/vocab.txt in Shawn-IEITSystems/Yuan-1.0), or use bert: for a BERT vocabulary.")
        self.unk, self.eot_token = self.vocab["<unk>"], self.vocab["<eod>"]
        self.piece = {i: p for p, i in self.vocab.items()}
        # "English" ids: no Chinese character in the piece; the space itself is not one
        chinese = {i for p, i in self.vocab.items() if CHINESE.search(p)}
        self.english = [i in self.piece and i not in chinese for i in range(self.n_vocab)]
        self.english[self.SPACE] = False
        self.cut = _jieba_cut()
        self.words = Words(self._split)  # word -> its ids; a corpus repeats its words, so most words are split once
        # character -> (the longest piece that begins with it, the longest that follows a "##"), in characters
        self.reach = {}
        for p in filter(None, self.vocab):
            whole, after = self.reach.get(p[0], (0, 0))
            self.reach[p[0]] = (max(whole, len(p)), after)
            if p.startswith("##") and len(p) > 2:
                whole, after = self.reach.get(p[2], (0, 0))
                self.reach[p[2]] = (whole, max(after, len(p) - 2))

    def _split(self, word):
        """Step 2 for one word (▂ and ▃ already in it). The longest match from each start looks no further than the
        longest piece that begins with that character (self.reach: as it is, and after "##")."""
        if len(word) > 200:
            return [self.unk]
        vocab, n, ids, start = self.vocab, len(word), [], 0
        if word in vocab:  # the longest match from the start: the whole word, one piece (most Chinese words)
            return [vocab[word]]
        first = CHINESE.search(word)
        plain = first.start() if first else n  # word[start:end] holds a Chinese character iff end > plain
        while start < n:
            if start > plain:  # past that Chinese character: the next one
                first = CHINESE.search(word, start)
                plain = first.start() if first else n
            whole, after = self.reach.get(word[start], (0, 0))
            for end in range(min(n, start + (whole if start == 0 else max(whole, after))), start, -1):
                i = vocab.get(word[start:end] if start == 0 or end > plain else "##" + word[start:end])
                if i is not None:
                    ids.append(i)
                    start = end
                    break
            else:
                ids.append(self.unk)
                start += 1
        return ids

    def encode_ordinary(self, text):
        words = self.words
        ids = [x for word in self.cut(text) for x in words[word]]
        if len(words) >= 1 << 20:  # bound the memory; the frequent words come back at once
            words.clear()
        if self.SPACE not in ids[1:-1]:
            return ids
        en, space = self.english, self.SPACE
        return ids[:1] + [x for prev, x, nxt in zip(ids, ids[1:-1], ids[2:])
                          if not (x == space and en[prev] and en[nxt])] + ids[1:][-1:]

    def encode_to_numpy(self, text, disallowed_special=()):
        import numpy as np  # not at the top: data.py encode needs none
        return np.array(self.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids, errors=None):
        out = []
        for x in ids:
            piece = self.piece.get(x, "<unk>")
            if piece.startswith("##") and len(piece) > 2:
                piece = piece[2:]
            elif out and ASCII_END.search(out[-1]) and ASCII_WORD.match(piece):
                out.append(" ")  # where encode may have dropped one
            out.append(piece)
        return "".join(out).replace("\u2582", " ").replace("\u2583", "\n")


# ------------------------------------------------------------------------------------------------------------------
# bert: Megatron's BertWordPieceLowerCase (the BERT tokenizer, lower case), through Hugging Face `tokenizers`

CJK_GAP = re.compile("(?<=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]) | (?=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])")


class BertTokenizer:
    """BERT's lower-case WordPiece as Megatron runs it for --tokenizer-type BertWordPieceLowerCase: clean the text,
    put spaces around each Chinese character, lower-case and strip accents, split on whitespace and punctuation,
    then greedy longest-match pieces ("##" after a word's first piece; [UNK] for a word with no match or over 200
    characters). Megatron appends [BOS] and [EOS] to the vocabulary when the file lacks them; [EOS] ends each
    document. Text that spells a special token ("[SEP]") is plain text, as in Megatron. The ids are those of
    transformers' BertTokenizer (do_lower_case, split_special_tokens) and of Megatron's own FullTokenizer
    (tests/test_tokenizer.py; bench/RESULTS.md). Decoding joins pieces with spaces, except around Chinese."""

    def __init__(self, path):
        self.vocab, self.n_vocab, self.hash = read_vocab(path, "bert", ("[UNK]",))
        for extra in ("[BOS]", "[EOS]"):  # Megatron's _BertWordPieceTokenizer.add_token
            if extra not in self.vocab:
                self.vocab[extra], self.n_vocab = self.n_vocab, self.n_vocab + 1
        try:
            from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        except ImportError:
            raise UserError("the bert: tokenizer runs on Hugging Face tokenizers, which is not installed.\n"
                            "HINT: .venv/bin/pip install tokenizers") from None
        self.tok = Tokenizer(models.WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=200))
        # lower case in Python, as Megatron does (a word-final Σ becomes ς, where Rust's lower case gives σ)
        self.tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                         strip_accents=True, lowercase=False)
        self.tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.piece = {i: p for p, i in self.vocab.items()}
        self.eot_token = self.vocab["[EOS]"]

    def encode_ordinary(self, text):
        return self.tok.encode(text.lower(), add_special_tokens=False).ids

    def encode_to_numpy(self, text, disallowed_special=()):
        import numpy as np  # not at the top: data.py encode needs none
        return np.array(self.encode_ordinary(text), dtype=np.uint32)

    def exported(self):
        """The `tokenizers` object for export.py's tokenizer.json, lower-casing in Rust (see __init__)."""
        from tokenizers import Tokenizer, decoders, normalizers
        tok = Tokenizer.from_str(self.tok.to_str())
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
        tok.decoder = decoders.WordPiece()
        return tok

    def decode(self, ids, errors=None):
        return CJK_GAP.sub("", " ".join(self.piece.get(x, "[UNK]") for x in ids).replace(" ##", ""))


VOCAB_KINDS = {"yuan": YuanTokenizer, "bert": BertTokenizer}
