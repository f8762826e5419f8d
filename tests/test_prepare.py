"""dataprep/prepare.py: the ASC22 cleaning, shards independent of workers and ranks, resuming, bad input."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run
from data import Batches
from dataprep.shards import open_tokens
from runtime.errors import UserError
from dataprep.prepare import prepare
from helpers import MPIEXEC, needs_mpiexec
from dataprep.tokenizer import load_tokenizer, train_tokenizer

SANGUO = os.path.join(ROOT, "corpus", "sanguo.txt")


def files_of(d):
    """{name: bytes} of a prepared directory."""
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def all_tokens(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    return {split: np.concatenate([open_tokens(os.path.join(d, s[split]))[1] for s in meta["shards"]])
            for split in ("train", "val")}


def decode_docs(d, tokenizer):
    """Every document of a prepared directory (train then val), decoded."""
    enc, info = load_tokenizer(tokenizer)
    docs = []
    for ids in all_tokens(d).values():
        cuts = np.flatnonzero(ids == info["eot"])
        docs += [enc.decode(part[:-1].tolist()) for part in np.split(ids, cuts + 1)[:-1]]
        assert len(ids) == 0 or ids[-1] == info["eot"]
    return docs


def test_asc22_cleaning(tokenizer, tmp_path, capsys):
    """<n> becomes a newline, edge <n>s go, documents under 10 or over 20,000 characters are dropped, blank lines
    are skipped, and every count reaches meta.json."""
    lines = ["<n><n>第一回 宴桃园豪杰三结义<n>话说天下大势，分久必合<n>",  # edge <n>s stripped
             "太短了",  # 3 characters: dropped
             "",  # blank
             "曹" * 20_001,  # one over the limit: dropped
             "刘" * 20_000,  # exactly the limit: kept
             "   ",  # blank
             "<n>" * 5 + "十个字十个字十个字十" + "<n>" * 5]  # exactly 10 after stripping: kept
    (tmp_path / "asc.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = prepare([str(tmp_path / "asc.txt")], tokenizer, str(tmp_path / "out"), val_fraction=0.3, workers=1)
    st = meta["stats"]
    if st["val_docs"] == 0:  # three documents: the 30% val share may well be empty, which is said
        assert "the val split is empty" in capsys.readouterr().err
    assert (st["kept"], st["short"], st["long"], st["blank"]) == (3, 1, 1, 2)
    assert st["chars"] == len("第一回 宴桃园豪杰三结义\n话说天下大势，分久必合") + 20_000 + 10
    assert sorted(decode_docs(str(tmp_path / "out"), tokenizer)) == sorted(
        ["第一回 宴桃园豪杰三结义\n话说天下大势，分久必合", "刘" * 20_000, "十个字十个字十个字十"])
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == st["train_tokens"] + st["val_tokens"]
    # thresholds are settings
    meta = prepare([str(tmp_path / "asc.txt")], tokenizer, str(tmp_path / "out2"), val_fraction=0.3, workers=1,
                   min_chars=2, max_chars=0)
    assert (meta["stats"]["kept"], meta["stats"]["short"], meta["stats"]["long"]) == (5, 0, 0)


def test_layout_and_summary(corpus, tokenizer, tmp_path):
    proc = run("data.py", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--out", tmp_path / "d",
               "--shard-mb", 0.2, "--piece-mb", 0.05, "--workers", 2)
    meta = json.load(open(tmp_path / "d" / "meta.json"))
    assert len(meta["shards"]) > 1 and meta["stats"]["kept"] == 30
    names = sorted(os.listdir(tmp_path / "d"))  # the bookkeeping (plan.json, shard_*.json, *.tmp) is gone
    assert names == sorted(["meta.json", "tokenizer.tiktoken", "tokenizer.json"] +
                           [s[split] for s in meta["shards"] for split in ("train", "val")])
    assert "30 kept" in proc.stdout and "tokens per character" in proc.stdout and "non-UTF-8" in proc.stdout
    assert "2 workers" in proc.stdout
    source = [line.rstrip("\n").replace("<n>", "\n").strip("\n") for line in open(corpus, encoding="utf-8")]
    assert sorted(decode_docs(str(tmp_path / "d"), tokenizer)) == sorted(source)


def test_byte_identical_whatever_the_workers(tokenizer, tmp_path):
    """Pieces of 50 KB cut lines in the middle; 1, 2 and 3 workers give the same bytes."""
    outs = []
    for workers in (1, 2, 3):
        out = str(tmp_path / f"w{workers}")
        prepare([SANGUO], tokenizer, out, shard_mb=0.3, piece_mb=0.05, workers=workers)
        outs.append(files_of(out))
    assert outs[0] == outs[1] == outs[2]
    assert len([n for n in outs[0] if n.startswith("train_")]) == 6  # 1.79 MB in shards of 0.3 MB


def test_jsonl_and_gzip_inputs(tokenizer, tmp_path):
    """The same documents as .txt, .jsonl, .txt.gz and .jsonl.gz give the same tokens."""
    docs = [f"第{i}个文档<n>第二行 document {i}，内容。" for i in range(60)]
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    jsonl = "".join(json.dumps({"text": d.replace("<n>", "\n"), "id": i}, ensure_ascii=False) + "\n"
                    for i, d in enumerate(docs))
    (tmp_path / "a.jsonl").write_text(jsonl, encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(docs) + "\n")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(jsonl)
    tokens = []
    for name in ("a.txt", "a.jsonl", "a.txt.gz", "a.jsonl.gz"):
        meta = prepare([str(tmp_path / name)], tokenizer, str(tmp_path / f"out_{name}"), 0.2, workers=1)
        assert meta["stats"]["kept"] == 60
        tokens.append(all_tokens(str(tmp_path / f"out_{name}")))
    for t in tokens[1:]:
        assert all((t[s] == tokens[0][s]).all() for s in ("train", "val"))


def test_directory_input_is_its_corpus_files_sorted(tokenizer, tmp_path):
    (tmp_path / "c").mkdir()
    for name in ("002.txt", "001.txt", "notes.md"):
        (tmp_path / "c" / name).write_text(f"文件 {name} 的第一个文档，足够长了。\n文件 {name} 的第二个文档，也够长。\n")
    meta = prepare([str(tmp_path / "c")], tokenizer, str(tmp_path / "out"), 0.3, workers=1)
    assert [os.path.basename(s) for s in meta["sources"]] == ["001.txt", "002.txt"]


def test_non_utf8_replaced_and_counted(tokenizer, tmp_path):
    (tmp_path / "b.txt").write_bytes("\ufeff好的文档，开头有字节顺序标记。\r\n".encode() +
                                     b"bad \xff\xfe bytes here<n>line two\n" * 3 + "好的文档，没有问题。\n".encode())
    meta = prepare([str(tmp_path / "b.txt")], tokenizer, str(tmp_path / "out"), 0.3, workers=1)
    assert meta["stats"]["bad_bytes"] == 6 and meta["stats"]["kept"] == 5
    docs = decode_docs(str(tmp_path / "out"), tokenizer)
    assert "bad \ufffd\ufffd bytes here\nline two" in docs
    assert "好的文档，开头有字节顺序标记。" in docs  # the byte-order mark and the \r are gone


def test_empty_files_skipped_with_a_warning(corpus, tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    proc = run("data.py", "prepare", "--input", tmp_path / "empty.txt", corpus, tmp_path / "blank.txt",
               "--tokenizer", tokenizer, "--out", tmp_path / "out")
    assert "empty.txt holds no documents" in proc.stderr and "blank.txt holds no documents" in proc.stderr
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    assert meta["stats"]["kept"] == 30 and len(meta["empty_files"]) == 2


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "not found"),  # missing file
    (lambda d: (d / "in.txt").write_text(""), "every input is empty"),
    (lambda d: (d / "in.txt").write_text("\n   \n\n"), "no documents kept"),
    (lambda d: (d / "in.txt").write_text("short\ntiny\n"), "2 shorter than 10"),
])
def test_no_usable_input(tokenizer, tmp_path, make, message):
    make(tmp_path)
    proc = run("data.py", "prepare", "--input", tmp_path / "in.txt", "--tokenizer", tokenizer,
               "--out", tmp_path / "out", check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_truncated_and_corrupt_gzip(tokenizer, tmp_path):
    text = "".join(f"第{i}个文档，内容足够长，用来测试压缩文件。\n" for i in range(20_000)).encode()
    whole = gzip.compress(text)
    (tmp_path / "cut.txt.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UserError, match=r"cut.txt.gz is truncated or corrupt.*breaks after byte [\d,]+ .*line [\d,]+"):
        prepare([str(tmp_path / "cut.txt.gz")], tokenizer, str(tmp_path / "o1"), workers=1)
    bad = bytearray(whole)
    bad[len(bad) // 2: len(bad) // 2 + 64] = os.urandom(64)
    (tmp_path / "bad.txt.gz").write_bytes(bytes(bad))
    with pytest.raises(UserError, match="bad.txt.gz is truncated or corrupt"):
        prepare([str(tmp_path / "bad.txt.gz")], tokenizer, str(tmp_path / "o2"), workers=2)  # raised in a worker
    (tmp_path / "plain.txt.gz").write_bytes(text[:1000])  # not gzip at all
    with pytest.raises(UserError, match="plain.txt.gz is truncated or corrupt"):
        prepare([str(tmp_path / "plain.txt.gz")], tokenizer, str(tmp_path / "o3"), workers=1)


def test_bad_jsonl_line_names_its_line(tokenizer, tmp_path):
    good = '{"text": "一个足够长的好文档，没有问题。"}\n'
    for n, bad in enumerate(['{"body": "no text field"}', '{"text": 42}', 'not json', '[1, 2]']):
        (tmp_path / f"x{n}.jsonl").write_text(good * 3000 + bad + "\n" + good)
        # pieces of 20 KB: the bad line is in a later piece, its number still counts from the file's start
        with pytest.raises(UserError, match=rf"x{n}.jsonl:3001: not a JSON object"):
            prepare([str(tmp_path / f"x{n}.jsonl")], tokenizer, str(tmp_path / f"out{n}"), piece_mb=0.02,
                    workers=1)


def test_bad_arguments(tokenizer, tmp_path, corpus):
    (tmp_path / "x.csv").write_text("a,b\n")
    for kwargs, message in [(dict(inputs=[str(tmp_path / "x.csv")]), "unknown kind of input"),
                            (dict(inputs=[corpus, corpus]), "given twice"),
                            (dict(val_fraction=1.0), "--val-fraction"),
                            (dict(min_chars=50, max_chars=20), "--min-chars"),
                            (dict(piece_mb=8, shard_mb=4), "--piece-mb")]:
        args = dict(inputs=[corpus], tokenizer=tokenizer, out=str(tmp_path / "out"), workers=1) | kwargs
        with pytest.raises(UserError, match=message):
            prepare(**args)
    assert not os.path.exists(tmp_path / "out")


def test_finished_output_is_never_overwritten(corpus, tokenizer, prepared):
    before = files_of(prepared)
    proc = run("data.py", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--out", prepared, check=False)
    assert proc.returncode != 0 and "already holds prepared data" in proc.stderr
    assert files_of(prepared) == before


def test_foreign_bin_files_refused(corpus, tokenizer, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_0000.bin").write_bytes(b"somebody else's")
    with pytest.raises(UserError, match="no plan.json"):
        prepare([corpus], tokenizer, str(tmp_path / "out"), workers=1)
    assert (tmp_path / "out" / "train_0000.bin").read_bytes() == b"somebody else's"


def start_and_kill(args, out, after_shards):
    """Start prepare in a subprocess and SIGKILL it once `after_shards` shards are committed (shard_NNNN.json)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "prepare", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        # committed: shard_NNNN.json, not the shard_NNNN.json.tmp that is renamed to it (counting that one made the
        # test flaky under load: killed between the two, one shard fewer was done than it expected)
        if os.path.isdir(out) and sum(n.startswith("shard_") and n.endswith(".json") for n in os.listdir(out)) >= \
                after_shards:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the workers too
    proc.wait()
    return proc


def test_kill_and_resume(tokenizer, tmp_path):
    """Killed mid-job, the same command finishes it without redoing committed shards, and the result is the bytes
    of an uninterrupted run. A different command is refused; a damaged committed shard is redone."""
    big = tmp_path / "big.txt"
    with open(SANGUO, "rb") as f:
        big.write_bytes(f.read() * 4)  # 7 MB, 24 shards
    args = ["--input", big, "--tokenizer", tokenizer, "--shard-mb", 0.3, "--piece-mb", 0.1, "--workers", 2]
    ref = str(tmp_path / "ref")
    run("data.py", "prepare", *args, "--out", ref)
    out = str(tmp_path / "out")
    killed = start_and_kill([*args, "--out", out], out, after_shards=3)
    assert killed.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not os.path.exists(os.path.join(out, "meta.json"))
    # a different job into the same directory is refused, and touches nothing
    proc = run("data.py", "prepare", *args[:-4], "--shard-mb", 0.5, "--piece-mb", 0.1, "--out", out, check=False)
    assert proc.returncode != 0 and "different job" in proc.stderr and "shard_mb" in proc.stderr
    # so is another tokenizer: its ids would be mixed with these
    other = str(tmp_path / "other.tiktoken")
    train_tokenizer(["一些别的文字，用来训练另一个分词器。"] * 10, 300, other)
    proc = run("data.py", "prepare", *args[:2], "--tokenizer", other, *args[4:], "--out", out, check=False)
    assert proc.returncode != 0 and "different job (tokenizer.name" in proc.stderr
    # damage one committed shard: resuming must notice and redo it
    with open(os.path.join(out, "train_0001.bin"), "r+b") as f:
        f.truncate(100)
    proc = run("data.py", "prepare", *args, "--out", out)
    done = int(proc.stdout.split("resuming; ")[1].split(" of")[0])
    assert 2 <= done < 24
    assert files_of(out) == files_of(ref)


@needs_mpiexec
def test_mpiexec_ranks_share_the_work(tokenizer, tmp_path):
    """Two ranks, two workers each: the same bytes as one process."""
    args = ["--input", SANGUO, "--tokenizer", tokenizer, "--shard-mb", 0.3, "--piece-mb", 0.1]
    run("data.py", "prepare", *args, "--workers", 1, "--out", tmp_path / "one")
    cmd = [MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "data.py"), "prepare", *map(str, args),
           "--workers", "2", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 workers x 2 ranks" in proc.stdout
    assert files_of(str(tmp_path / "two")) == files_of(str(tmp_path / "one"))


def test_huge_line_is_skipped_in_bounded_memory(tokenizer, tmp_path):
    """A single 200 MB line (no newline anywhere) is dropped as too long without being read into memory."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux)")
    with open(tmp_path / "huge.txt", "wb") as f:
        f.write("好的第一个文档，长度正常。\n".encode())
        for _ in range(200):
            f.write(b"x" * 1_000_000)
        f.write("\n好的最后一个文档，长度正常。\n".encode())
    # VmHWM: this process's peak RSS (ru_maxrss would inherit the pytest parent's peak across fork + exec)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from dataprep.prepare import prepare; "
            "m = prepare([sys.argv[2]], sys.argv[3], sys.argv[4], 0.5, workers=1); "
            "hwm = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')); "
            "print(m['stats']['kept'], m['stats']['long'], hwm)")
    proc = subprocess.run([sys.executable, "-c", code, ROOT, str(tmp_path / "huge.txt"), tokenizer,
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    kept, long, peak_kb = map(int, proc.stdout.split()[-3:])
    assert (kept, long) == (2, 1)
    assert peak_kb < 150_000, f"peak RSS {peak_kb / 1e3:.0f} MB: the line was held in memory"


def test_prepared_data_trains(prepared, tmp_path):
    """The shards feed train.py (the parallel and resume tests train on them too)."""
    b = Batches(prepared, seq_len=32, micro_batch=4, seed=0)
    x, y = b.train_batch(0, 0)
    assert x.shape == (4, 32) and int(x.max()) < b.tokenizer["n_vocab"]


def test_prepare_does_not_import_torch(corpus, tokenizer, tmp_path):
    """torch's import costs seconds, once in the job and once in every spawned worker: a data job has no use for it
    (issue 11). Run data.py prepare in a process that then says whether torch was ever imported."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['data.py', 'prepare', '--input', {corpus!r}, '--tokenizer', {tokenizer!r}, '--out', "
            f"{str(tmp_path / 'd')!r}, '--workers', '2']\n"
            "try:\n"
            "    runpy.run_path('data.py', run_name='__main__')\n"
            "finally:\n"
            "    print('torch imported:', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "torch imported: False" in proc.stdout, proc.stdout + proc.stderr
    assert os.path.exists(tmp_path / "d" / "meta.json")
