"""Every bad input a user is likely to type, through the real command lines: a non-zero exit, no traceback, and a
message that names the problem. {data} is a prepared data directory, {out} a fresh output directory, {run} a
finished tiny run (checkpoints), {file} an existing plain file, {badmeta} a data directory whose meta.json is
damaged, {vocab} a Yuan-style vocab.txt, {lonebin} a Megatron .bin without its .idx. An expected message may name
them too. Scripts run from the repository's root, so tests/data/... is a relative path."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL, run
from dataprep.tokenizer import load_tokenizer
from runtime.errors import UserError
from vocabs import bert_vocab, yuan_vocab

TRAIN = [*SMALL, "--data", "{data}", "--out", "{out}"]
MEGATRON = "tests/data/indexed_yuan_uint16_unclosed"  # relative to ROOT, where the scripts run
PARENT = os.path.dirname(ROOT)
CASES = [
    # train.py: flags and values
    ("train.py", [*TRAIN, "--max_stepz", "3"], "Did you mean --max_steps"),
    ("train.py", [*TRAIN, "--max_steps", "three"], "expects int"),
    ("train.py", [*TRAIN, "--max_steps"], "needs a value"),
    ("train.py", [*TRAIN, "stray"], "unexpected argument"),
    ("train.py", ["--preset", "huge", "--data", "{data}", "--out", "{out}"], "unknown preset"),
    ("train.py", [*SMALL, "--data", "{data}"], "--out is required"),
    ("train.py", [*TRAIN, "--dtype", "fp8"], "not one of"),
    ("train.py", [*TRAIN, "--lr", "nan"], "lr = nan must be a finite number"),
    ("train.py", [*TRAIN, "--signal_grace_s", "-1"], "signal_grace_s = -1.0 must be a finite number"),
    ("train.py", [*TRAIN, "--lr", "-0.1"], "lr = -0.1 must be a finite number, at least 0"),
    ("train.py", [*TRAIN, "--time_limit_min", "inf"], "time_limit_min = inf"),
    ("train.py", [*TRAIN, "--seq_len", "0"], "seq_len = 0 must be at least 1"),
    ("train.py", [*TRAIN, "--max_skipped_steps", "0"], "max_skipped_steps = 0 must be at least 1"),
    ("train.py", [*TRAIN, "--collective_timeout_s", "0"], "collective_timeout_s = 0.0 must be positive"),
    ("train.py", [*TRAIN, "--dropout", "1.5"], "dropout = 1.5 must be in [0, 1)"),
    ("train.py", [*TRAIN, "--recompute", "some"], "recompute = 'some' is not one of"),
    ("train.py", [*TRAIN, "--n_embd", "66"], "n_embd = 66 is not divisible by n_head = 4"),
    ("train.py", [*TRAIN, "--tp", "3"], "must both be divisible by tp = 3"),
    ("train.py", [*TRAIN, "--tp", "2", "--sequence_parallel", "true", "--seq_len", "33"], "seq_len = 33"),
    ("train.py", [*TRAIN, "--vocab_size", "1000"], "vocab_size = 1000 is not a multiple of 128"),
    ("train.py", [*TRAIN, "--vocab_size", "128"], "smaller than the data's tokenizer"),
    ("train.py", [*TRAIN, "--batch_tokens", "1000"], "not a multiple of micro_batch * seq_len"),
    ("train.py", [*TRAIN, "--device", "cuda:0"], "sees no CUDA device"),
    ("train.py", [*TRAIN, "--device", "gpu"], "'gpu' is not a device"),
    ("train.py", [*TRAIN, "--compile", "maybe"], "expects bool"),
    ("train.py", [*TRAIN, "--resume", "--overwrite"], "pass one of them"),
    ("train.py", [*TRAIN, "--gpus", "8"], "--gpus belongs to --plan"),
    ("train.py", [*SMALL, "--data", "/nonexistent/data", "--out", "{out}"], "is neither a prepared data directory"),
    ("train.py", [*SMALL, "--data", "{corpus}", "--out", "{out}"], "is a text file, not prepared data"),
    ("train.py", [*SMALL, "--data", "{badmeta}", "--out", "{out}"], "cannot be read as JSON"),
    ("train.py", [*SMALL, "--data", "1 {data} 0 {data}", "--out", "{out}"], "is not a positive number"),
    ("train.py", [*SMALL, "--data", "{data}/train_0000", "--out", "{out}"], "nor a Megatron dataset"),
    # issue 28: an ASC22 team's trial with Inspur's vocab.txt and Megatron data
    ("train.py", [*SMALL, "--data", MEGATRON + ".bin", "--out", "{out}"],
     f"is one file of a Megatron indexed dataset (a .bin/.idx pair of tokens); --data takes the dataset's prefix, "
     f"the path without .bin / .idx, as Megatron's --data-path does.\nHINT: --data {MEGATRON};"),
    ("train.py", [*SMALL, "--data", "tests/data/indexed_megatron_uint16.idx", "--out", "{out}"],
     "HINT: --data tests/data/indexed_megatron_uint16;"),
    ("train.py", [*SMALL, "--data", "{lonebin}", "--out", "{out}"],
     "train_0000.idx is missing: both files must sit side by side.\nHINT: copy train_0000.idx from where the data "
     "was made to"),
    ("train.py", [*SMALL, "--data", f"1 {MEGATRON} 1 {MEGATRON}.bin", "--out", "{out}"],
     f"write {MEGATRON} for {MEGATRON}.bin in --data"),
    ("train.py", [*SMALL, "--data", MEGATRON, "--tokenizer", "{vocab}", "--out", "{out}"],
     "(this one has Yuan's <unk>, <eod> and \u2582 at line 11: yuan: fits it).\nHINT: --tokenizer yuan:{vocab} "
     "for Yuan 1.0's tokenizer as Inspur runs it (jieba words, then WordPiece; ids identical to Inspur's), or "
     "--tokenizer bert:{vocab} for Megatron's BertWordPieceTokenizer"),
    ("train.py", [*SMALL, "--data", MEGATRON, "--tokenizer", "yuan:../no-such-dir/vocab.txt", "--out", "{out}"],
     f"yuan:../no-such-dir/vocab.txt: no such file (looked for {PARENT}/no-such-dir/vocab.txt: a relative path is "
     f"taken from the current directory {ROOT}).\nHINT: yuan: takes the path of a vocab.txt"),
    ("train.py", [*SMALL, "--data", "{data}", "--out", "{run}"], "already holds a run"),
    ("train.py", [*SMALL, "--data", "{data}", "--out", "{run}", "--resume", "--n_layer", "3"],
     "is from another model config"),
    # train.py --plan
    ("train.py", ["--preset", "tiny", "--plan", "--gpu", "H300"], "is not a GPU runtime/accelerators.py knows"),
    ("train.py", ["--preset", "tiny", "--plan", "--tp", "2", "--gpus", "3"], "must be a positive multiple of --tp"),
    ("train.py", ["--preset", "tiny", "--plan", "--mfu", "2"], "is a fraction of the peak"),
    ("train.py", ["--preset", "tiny", "--plan", "--gpu_mem", "lots"], "take numbers"),
    ("train.py", ["--plan"], "--preset is required"),
    # data.py
    ("data.py", ["frobnicate"], "invalid choice"),
    ("data.py", ["prepare", "--input", "/nonexistent.txt", "--tokenizer", "{tok}", "--out", "{out}"],
     "input not found"),
    ("data.py", ["prepare", "--input", MEGATRON + ".bin", "--tokenizer", "{tok}", "--out", "{out}"],
     f"holds tokens already, not text to tokenize.\nHINT: train on it as it is: train.py --data {MEGATRON} "
     f"--tokenizer yuan:PATH/vocab.txt"),
    ("data.py", ["prepare", "--input", "tests/data", "--tokenizer", "{tok}", "--out", "{out}"],
     "Megatron indexed dataset(s) (indexed_megatron_int32.bin/.idx ...): tokens already, not text to tokenize.\nHINT: "
     "train on them as they are: train.py --data tests/data/indexed_megatron_int32 --tokenizer yuan:PATH/vocab.txt"),
    ("data.py", ["prepare", "--input", "{corpus}", "--tokenizer", "{vocab}", "--out", "{out}"],
     "is a WordPiece vocab.txt (3,002 lines, one piece per line: an unknown token <unk>, 14 ## continuation pieces"
     ", 2,442 single Chinese characters), not a .tiktoken file; a vocab.txt is run by one of two tokenizers, and the "
     "prefix says which (this one has Yuan's <unk>, <eod> and \u2582 at line 11: yuan: fits it).\nHINT: --tokenizer "
     "yuan:{vocab} for Yuan 1.0's tokenizer"),
    ("data.py", ["prepare", "--input", "{corpus}", "--tokenizer", "bert:{base}", "--out", "{out}"],
     "is a directory.\nHINT: bert: takes the path of the vocab.txt itself: --tokenizer bert:{base}/vocab.txt"),
    ("data.py", ["prepare", "--input", "{corpus}", "--tokenizer", "../no-such-dir/tok.tiktoken", "--out", "{out}"],
     f"(looked for {PARENT}/no-such-dir/tok.tiktoken: a relative path is taken from the current directory {ROOT})"
     f".\nHINT: pass the .tiktoken file"),
    ("data.py", ["prepare", "--input", "{corpus}", "--tokenizer", "/nonexistent.tiktoken", "--out", "{out}"],
     "is neither a file, nor yuan:PATH/vocab.txt or bert:PATH/vocab.txt, nor a usable tiktoken built-in"),
    ("data.py", ["prepare", "--input", "{corpus}", "--tokenizer", "cl100k_base", "--out", "{out}"],
     "do not fit uint16"),
    ("data.py", ["prepare", "--input", "{corpus}", "--tokenizer", "{tok}", "--out", "{file}"],
     "is a file, not a directory"),
    ("data.py", ["prepare", "--input", "{corpus}", "--tokenizer", "{tok}", "--out", "{out}", "--val-fraction", "2"],
     "must be between 0 and 1"),
    ("data.py", ["train-tokenizer", "--input", "{corpus}", "--vocab-size", "10", "--out", "{out}/t.tiktoken"],
     "is outside [257, 65,536]"),
    # export.py
    ("export.py", ["--out", "{out}", "--to", "{out}/hf"], "no complete checkpoint"),
    ("export.py", ["--out", "{run}", "--to", "{out}", "--step", "99"], "no complete checkpoint of step 99"),
    ("export.py", ["--out", "{run}", "--to", "{file}"], "is a file; the export is a directory"),
    ("export.py", ["--out", "{run}", "--to", "{out}", "--dtype", "fp8"], "invalid choice"),
    # tools/plot.py
    ("tools/plot.py", ["{out}", "--png", "{out}.png"], "no metrics.jsonl there"),
    ("tools/plot.py", ["{badmeta}/meta.json", "--png", "{out}.png"], "is not one JSON object per line"),
    ("tools/plot.py", ["{run}", "--png", "{out}.png", "--smooth", "0"], "--smooth must be at least 1"),
    # sample.py
    ("sample.py", ["--out", "{run}", "--max-new-tokens", "-3"], "--max-new-tokens must be at least 1"),
    ("sample.py", ["--out", "{run}", "--temperature", "-1"], "must be at least 0"),
    ("sample.py", ["--out", "{run}", "--top-p", "0"], "--top-p must be in (0, 1]"),
    ("sample.py", ["--out", "{run}", "--prompt-file", "/nonexistent.txt"], "cannot read --prompt-file"),
    ("sample.py", ["--out", "{out}"], "no complete checkpoint"),
    ("sample.py", ["--out", "{run}", "--step", "1"], "no complete checkpoint of step 1"),
    ("sample.py", ["--prompt", "x"], "--out (a run's directory) or --ckpt"),
    ("sample.py", ["--out", "{run}", "--ckpt", "/nonexistent.pt"], "cannot read checkpoint"),
]


@pytest.fixture(scope="module")
def places(prepared, corpus, tokenizer, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    run("train.py", *SMALL, "--data", prepared, "--out", base / "run", "--max_steps", 2)
    (base / "file").write_text("not a directory")
    shutil.copytree(prepared, base / "badmeta")
    (base / "badmeta" / "meta.json").write_text("{ not json")
    (base / "lone").mkdir()
    shutil.copyfile(os.path.join(ROOT, MEGATRON + ".bin"), base / "lone" / "train_0000.bin")
    return dict(data=prepared, corpus=corpus, tok=tokenizer, run=str(base / "run"), file=str(base / "file"),
                badmeta=str(base / "badmeta"), vocab=yuan_vocab(str(base / "vocab.txt")), base=str(base),
                lonebin=str(base / "lone" / "train_0000.bin"))


@pytest.fixture(scope="module")
def outcomes(places, tmp_path_factory):
    """Every case run once, each as its own process forked from one that has imported torch (tests/forked.py), two
    at a time. The earlier run's files are listed before and after all of them."""
    base = tmp_path_factory.mktemp("cases")
    before = sorted(os.listdir(places["run"]))
    cases = []
    for i, (script, args, _) in enumerate(CASES):
        args = [a.format(**places, out=base / f"{i:02d}" / "out") for a in map(str, args)]
        cases.append([script, args, str(base / f"{i:02d}.stdout"), str(base / f"{i:02d}.stderr")])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "forked.py")], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=600, check=True)
    read = lambda path: open(path, encoding="utf-8", errors="replace").read()  # noqa: E731
    procs = [subprocess.CompletedProcess(c[:2], code, read(c[2]), read(c[3]))
             for c, code in zip(cases, json.loads(proc.stdout))]
    messages = [message.format(**places) for _, _, message in CASES]
    return procs, before, sorted(os.listdir(places["run"])), messages


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{i:02d}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_a_clean_error(outcomes, i):
    procs, before, after, messages = outcomes
    proc, message = procs[i], messages[i]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
    assert after == before  # nothing earlier is lost or added


def test_vocab_txt_without_a_kind(tokenizer, tmp_path):
    """A vocab.txt given without yuan: or bert: is recognised, and the HINT says which prefix fits it; a file that is
    not a WordPiece vocabulary (a .tiktoken rank file without its .json, plain text) keeps the message about the
    .json (issue 28)."""
    with pytest.raises(UserError, match=r"BERT's \[UNK\]: bert: fits it\)\.\nHINT: --tokenizer yuan:"):
        load_tokenizer(bert_vocab(str(tmp_path / "bert.txt")))
    shutil.copyfile(tokenizer, tmp_path / "tok.tiktoken")
    (tmp_path / "notes.txt").write_text("some notes\nabout the run\n")
    for name in ("tok.tiktoken", "notes.txt"):
        with pytest.raises(UserError, match=r"\.json \(split pattern and special tokens of .* is missing"):
            load_tokenizer(str(tmp_path / name))
