"""Corpus -> token shards, for corpora far larger than memory (the ASC22 corpus is 100 GB). Run via data.py:

    python data.py prepare --input asc22/ --tokenizer tok/asc22.tiktoken --out data/asc22 [--workers 64]
    mpiexec -n 4 python data.py prepare ...   # ranks share the shards; the output is the same as one process

How the work is cut, so that the output is byte-identical whatever the number of workers and ranks:

    input files -> pieces: --piece-mb byte ranges of a file, each holding the lines that *start* inside it
                   (a .gz file is one piece: gzip cannot seek)
                -> shards: runs of consecutive pieces with about --shard-mb of input. Shard k is train_{k:04d}.bin
                   and val_{k:04d}.bin, its documents in input order.

A pool of worker processes tokenizes pieces; the process that owns shard k (MPI rank k % ranks) writes the pieces'
tokens in order. Cleaning follows Inspur's Yuan 1.0 preprocessing: `<n>` becomes a newline, newlines at a document's
edges are stripped, documents shorter than --min-chars or longer than --max-chars characters are dropped, and every
kept document ends with <|endoftext|>. A document goes to val when a hash of its text falls below --val-fraction.

Resuming: plan.json records the inputs and settings when the job starts. A shard is done once its shard_NNNN.json
is renamed into place, after both of its .bin files. Run the same command again and it skips the done shards and
redoes the rest; a different command (settings, tokenizer, changed inputs) is refused. When every shard is done,
meta.json is written and the bookkeeping files are removed.
"""
import codecs
import collections
import functools
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
import zlib

import numpy as np

from dataprep.indexed import IndexedWriter, best_dtype, read_index
from dataprep.shards import META_VERSION, TokenWriter, read_header
from runtime.errors import UserError
from dataprep.tokenizer import check_vocab_and_out, load_tokenizer, save_copy, train_tokenizer

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
TEXT_KEYS = ("kept", "chars", "short", "long", "blank", "bad_bytes", "val_docs", "train_tokens", "val_tokens")

# ------------------------------------------------------------------------------------------------------------------
# Reading documents


def list_inputs(paths):
    """--input as a list of files: files as given, a directory as its corpus files in sorted order."""
    if not paths:
        raise UserError("no --input given.")
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(SUFFIXES))
            if not found:
                idx = sorted(n[:-4] for n in os.listdir(p) if n.endswith(".idx"))
                raise UserError(f"{p} is a directory without {' / '.join(SUFFIXES)} files." + (
                    f" It holds {len(idx)} Megatron indexed dataset(s) ({idx[0]}.bin/.idx ...): tokens already, not "
                    f"text to tokenize.\nHINT: train on them as they are: train.py --data {os.path.join(p, idx[0])} "
                    f"--tokenizer yuan:PATH/vocab.txt (the vocab.txt that made them)." if idx else ""))
            files += found
        elif not os.path.isfile(p):
            raise UserError(f"input not found: {p}")
        elif p.endswith((".bin", ".idx")):
            prefix = p[:-4]
            raise UserError(f"{p} looks like one file of a Megatron indexed dataset (a .bin/.idx pair): it holds "
                            f"tokens already, not text to tokenize.\nHINT: train on it as it is: train.py --data "
                            f"{prefix} --tokenizer yuan:PATH/vocab.txt (the vocab.txt that made it); prepare reads "
                            f"text ({' / '.join(SUFFIXES)}).")
        elif not p.endswith(SUFFIXES):
            raise UserError(f"{p}: unknown kind of input; expected {' / '.join(SUFFIXES)}.\nHINT: a file with one "
                            f"document per line is read as .txt: rename it (or link it) with that suffix.")
        else:
            files.append(p)
    seen = set()
    for f in files:
        if os.path.realpath(f) in seen:
            raise UserError(f"{f} is given twice; its documents would be tokenized twice.")
        seen.add(os.path.realpath(f))
    return files


def _skip_line(f):
    """Read past the end of the current line in pieces of 1 MiB (a line can be larger than memory); bytes read."""
    n = 0
    while True:
        chunk = f.readline(1 << 20)
        n += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return n


def iter_lines(path, start=0, end=None, max_bytes=0):
    """(offset, line) for each line of `path` that starts in [start, end) (a .gz file: every line). A line longer
    than max_bytes comes as (offset, None) and is skipped without being held in memory (max_bytes 0: no limit)."""
    gz = path.endswith(".gz")
    end = math.inf if end is None or gz else end
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        pos = start
        if start > 0:  # the line that runs into this piece belongs to the piece before
            f.seek(start - 1)
            if f.read(1) != b"\n":
                pos += _skip_line(f)
        while pos < end:
            line = f.readline(max_bytes + 1) if max_bytes else f.readline()
            if not line:
                return
            n = len(line)
            if max_bytes and n > max_bytes and not line.endswith(b"\n"):
                n += _skip_line(f)
                line = None
            yield pos, line
            pos += n


def _line_number(path, offset):
    """1-based line number of the byte at `offset` (errors only: it reads the file up to there again)."""
    n, left = 1, offset
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            n, left = n + chunk.count(b"\n"), left - len(chunk)
    return n


class Clean:
    """The document filter: lengths in characters after `<n>` -> newline and stripping newlines at the edges."""

    def __init__(self, min_chars=10, max_chars=20_000):
        if min_chars < 0 or max_chars < 0 or (max_chars and max_chars < min_chars):
            raise UserError(f"--min-chars {min_chars} / --max-chars {max_chars}: need 0 <= min <= max "
                            f"(max 0 = no limit).")
        self.min_chars, self.max_chars = min_chars, max_chars

    def max_line_bytes(self, jsonl):
        """A line longer than this cannot hold a document of max_chars: UTF-8 takes at most 4 bytes a character,
        JSON's \\uXXXX\\uXXXX escapes 12 (plus room for other fields and edge <n>s)."""
        return (12 if jsonl else 4) * self.max_chars + 65536 if self.max_chars else 0


def read_documents(path, clean, stats, start=0, end=None):
    """Yield the kept, cleaned documents of the lines of `path` that start in [start, end), streaming. Bytes that
    are not UTF-8 become U+FFFD and are counted in stats["bad_bytes"]; blank lines are skipped and counted."""
    def count_bad(err):
        stats["bad_bytes"] += err.end - err.start
        return "\ufffd", err.end
    codecs.register_error("nanoyuan_count", count_bad)  # one handler per file; re-registering replaces it
    jsonl = path.endswith((".jsonl", ".jsonl.gz"))
    offset = start
    try:
        for offset, raw in iter_lines(path, start, end, clean.max_line_bytes(jsonl)):
            if raw is None:
                stats["long"] += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="nanoyuan_count")
            line = line.rstrip("\r\n")
            if offset == 0 and line.startswith("\ufeff"):  # a byte-order mark, as Windows editors write
                line = line[1:]
            if not line.strip():
                stats["blank"] += 1
                continue
            if jsonl:
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{_line_number(path, offset)}: not a JSON object with a \"text\" "
                                    f"string.\nHINT: fix or delete that line.")
            else:
                text = line.replace("<n>", "\n")
            text = text.strip("\n")
            if len(text) < clean.min_chars:
                stats["short"] += 1
            elif clean.max_chars and len(text) > clean.max_chars:
                stats["long"] += 1
            else:
                stats["kept"] += 1
                stats["chars"] += len(text)
                yield text
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path} is truncated or corrupt: the gzip stream breaks after byte {offset:,} of its text "
                        f"(line {_safe_line_number(path, offset)}): {e}\nHINT: copy or download the file again, "
                        f"or leave it out of --input.") from None


def _safe_line_number(path, offset):
    try:
        return f"{_line_number(path, offset):,}"
    except Exception:
        return "?"


def sample_documents(files, sample_mb, clean, stats):
    """Documents to train the tokenizer on, bounded and reproducible: every document when the inputs total at most
    sample_mb; otherwise each file gives a share of sample_mb proportional to its size, read as evenly spaced blocks
    (at least 16, at most 1 MB each; a .gz file, which cannot seek, gives the first share of its text)."""
    sizes = [os.path.getsize(f) for f in files]
    total, budget = sum(sizes), sample_mb * 1e6
    for path, size in zip(files, sizes):
        if total <= budget:
            yield from read_documents(path, clean, stats)
        elif path.endswith(".gz"):
            taken = 0
            for text in read_documents(path, clean, stats):
                yield text
                taken += len(text.encode())
                if taken >= budget * size / total:
                    break
        else:
            share = budget * size / total
            blocks = max(16, math.ceil(share / 1e6))
            for i in range(blocks):
                start = i * size // blocks
                yield from read_documents(path, clean, stats, start, start + share / blocks)


def train_tokenizer_cli(inputs, vocab_size, out, sample_mb, min_chars, max_chars):
    check_vocab_and_out(vocab_size, out)
    if sample_mb <= 0:
        raise UserError(f"--sample-mb {sample_mb} must be positive.")
    files, clean, stats = list_inputs(inputs), Clean(min_chars, max_chars), collections.Counter()
    t0 = time.time()
    n = train_tokenizer(sample_documents(files, sample_mb, clean, stats), vocab_size, out)
    if stats["kept"] == 0:
        os.remove(out)
        os.remove(os.path.splitext(out)[0] + ".json")
        raise UserError(f"no documents in {', '.join(inputs)} pass the filter ({stats['short']} shorter than "
                        f"{min_chars}, {stats['long']} longer than {max_chars} characters, {stats['blank']} blank).")
    print(f"tokenizer: {n:,} tokens ({n - 257:,} merges) trained on {stats['kept']:,} documents, "
          f"{stats['chars']:,} characters in {time.time() - t0:.1f} s -> {out}")
    if n < vocab_size:
        print(f"note: the text only supports {n:,} of the {vocab_size:,} tokens asked for.")


# ------------------------------------------------------------------------------------------------------------------
# Tokenizing one piece (in a worker process)


@functools.lru_cache(maxsize=1)
def _encoder(spec):
    return load_tokenizer(spec)[0]


def tokenize_piece(task):
    """Worker: the documents of one piece -> ({"train": uint16 ids, "val": uint16 ids}, stats). Document order is
    the input order; val membership depends on the text alone."""
    (file_index, path, start, end), spec, clean, val_fraction = task
    enc = _encoder(spec)
    eot = np.array([enc.eot_token], dtype=np.uint32)
    threshold = int(val_fraction * 2**64)
    stats, ids, lengths = collections.Counter(), {"train": [], "val": []}, {"train": [], "val": []}
    for text in read_documents(path, clean, stats, start, end):
        split = "val" if int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") < \
            threshold else "train"
        # the same ids as encode_ordinary (special-token text is plain text), as an array rather than a list of ints
        ids[split] += [enc.encode_to_numpy(text, disallowed_special=()), eot]
        lengths[split].append(len(ids[split][-2]) + 1)  # a document and its end token: one Megatron sequence
    stats["val_docs"] = len(ids["val"]) // 2
    stats[f"docs_in_{file_index}"] = stats["kept"] + stats["short"] + stats["long"]
    out = {s: np.concatenate(a).astype(np.uint16) if a else np.zeros(0, np.uint16) for s, a in ids.items()}
    stats["train_tokens"], stats["val_tokens"] = len(out["train"]), len(out["val"])
    return out, {s: np.array(a, dtype=np.int64) for s, a in lengths.items()}, stats


def _in_order(pool, fn, tasks, window):
    """fn over tasks on the pool, results in task order, at most `window` tasks in flight (bounded memory)."""
    if pool is None:
        yield from map(fn, tasks)
        return
    tasks, pending = iter(tasks), collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ------------------------------------------------------------------------------------------------------------------
# The plan, resuming, and the job


def make_shards(files, piece_bytes, shard_bytes):
    """[[piece, ...] per shard], piece = (file index, path, start byte, end byte)."""
    pieces = []
    for i, path in enumerate(files):
        size = os.path.getsize(path)
        if path.endswith(".gz"):
            pieces.append((i, path, 0, size))
        else:
            pieces += [(i, path, s, min(s + piece_bytes, size)) for s in range(0, size, piece_bytes)]
    shards, run, run_bytes = [], [], 0
    for piece in pieces:
        run.append(piece)
        run_bytes += piece[3] - piece[2]
        if run_bytes >= shard_bytes:
            shards.append(run)
            run, run_bytes = [], 0
    return shards + [run] if run else shards


def shard_names(k, fmt="nanoyuan"):
    """Shard k's train and val files (Megatron: the dataset prefixes, PREFIX.bin + PREFIX.idx) and its record."""
    if fmt == "megatron":
        return f"train_{k:04d}", f"val_{k:04d}", f"shard_{k:04d}.json"
    return f"train_{k:04d}.bin", f"val_{k:04d}.bin", f"shard_{k:04d}.json"


def start_or_resume(out, plan):
    """Create out/ with plan.json, or check that an unfinished job there is this same job. Nothing finished is
    ever overwritten: a finished directory or foreign files are refused."""
    plan_path = os.path.join(out, "plan.json")
    if os.path.exists(os.path.join(out, "meta.json")):
        raise UserError(f"{out} already holds prepared data (meta.json); it is not overwritten.\n"
                        f"HINT: delete {out} or choose another --out.")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if old != plan:
            diff = []
            for key, new in plan.items():
                was = old.get(key)
                if isinstance(new, dict) and isinstance(was, dict):
                    diff += [f"{key}.{k} {was.get(k)} -> {new[k]}" for k in new if was.get(k) != new[k]]
                elif was != new:
                    diff.append("inputs (files, sizes or modification times)" if key == "inputs" else key)
            raise UserError(f"{out} holds an unfinished prepare of a different job ({'; '.join(diff)}); its "
                            f"shards are not mixed with this one's.\nHINT: re-run the exact "
                            f"command that started it to finish it, or delete {out} or choose another --out.")
        for name in os.listdir(out):  # partial files of the interrupted run
            if name.endswith(".tmp"):
                os.remove(os.path.join(out, name))
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory: prepare writes a directory of shards there.\n"
                        f"HINT: choose another --out (the file is left as it is).")
    if os.path.isdir(out) and any(n.endswith(".bin") for n in os.listdir(out)):
        raise UserError(f"{out} holds .bin files that no unfinished prepare here owns (no plan.json); they are not "
                        f"overwritten or mixed.\nHINT: delete {out} or choose another --out.")
    os.makedirs(out, exist_ok=True)
    with open(plan_path + ".tmp", "w") as f:
        json.dump(plan, f, indent=1, ensure_ascii=False)
    os.replace(plan_path + ".tmp", plan_path)


def finished_shard(out, k, tok, fmt):
    """The record of shard k if it is complete and its files check out, else None (it will be redone)."""
    train, val, rec = (os.path.join(out, n) for n in shard_names(k, fmt))
    if not os.path.exists(rec):
        return None
    try:
        with open(rec) as f:
            record = json.load(f)
        for path, split in ((train, "train"), (val, "val")):
            if fmt == "megatron":
                if int(read_index(path)[1].sum(dtype=np.int64)) != record["stats"][split + "_tokens"]:
                    return None
            else:
                read_header(path, tok["n_vocab"], tok["hash"], record["stats"][split + "_tokens"])
        return record
    except (UserError, ValueError, KeyError):
        return None


def write_shards(out, shards, todo, tok, how, workers, progress, fmt="nanoyuan"):
    """Tokenize the pieces of shards `todo` on `workers` processes (`how` = tokenizer spec, Clean, val fraction);
    write each shard in piece order, in format `fmt`. Yields each finished shard's record."""
    pieces = [(k, i) for k in todo for i in range(len(shards[k]))]
    ctx = multiprocessing.get_context("spawn")  # no fork: this process may hold MPI and thread state
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        writers, stats = None, None
        tasks = ((shards[k][i], *how) for k, i in pieces)
        for (k, i), (ids, lengths, st) in zip(pieces, _in_order(pool, tokenize_piece, tasks, 2 * workers)):
            if i == 0:
                paths = dict(zip(("train", "val"), (os.path.join(out, n) for n in shard_names(k, fmt))))
                if fmt == "megatron":
                    for stale in (p + e for p in paths.values() for e in (".bin", ".idx")):
                        if os.path.exists(stale):  # an unfinished shard of this same job (plan.json): redone
                            os.remove(stale)
                    writers = {s: IndexedWriter(p, best_dtype(tok["n_vocab"])) for s, p in paths.items()}
                else:
                    writers = {s: TokenWriter(p, tok["n_vocab"], tok["hash"]) for s, p in paths.items()}
                stats = collections.Counter()
            for split, w in writers.items():
                if fmt == "megatron":
                    w.add_documents(ids[split], lengths[split])
                else:
                    w.write(ids[split])
            stats.update(st)
            progress(shards[k][i], st)
            if i == len(shards[k]) - 1:
                for w in writers.values():
                    w.close()
                record = {"shard": k, "stats": dict(stats)}
                rec = os.path.join(out, shard_names(k, fmt)[2])
                with open(rec + ".tmp", "w") as f:
                    json.dump(record, f)
                os.replace(rec + ".tmp", rec)  # the commit point of shard k
                yield record
    finally:
        if pool is not None:
            pool.terminate()


LAUNCHER_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")  # set by mpiexec of MPICH, Open MPI, PMIx


def _mpi():
    """(rank, world, ranks on this node, comm or None). MPI is only started under a launcher (or srun with several
    tasks): a plain run, and the worker processes, never touch it."""
    if not any(v in os.environ for v in LAUNCHER_VARS) and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return 0, 1, 1, None
    from runtime.mpi import mpi_world
    MPI, comm = mpi_world()
    if comm is None or comm.Get_size() == 1:
        return 0, 1, 1, None
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    return comm.Get_rank(), comm.Get_size(), local.Get_size(), comm


def prepare(inputs, tokenizer, out, val_fraction=0.05, min_chars=10, max_chars=20_000, shard_mb=4096.0,
            piece_mb=32.0, workers=0, fmt="nanoyuan"):
    """Tokenize the corpus `inputs` into out/ (see the module docstring) in format `fmt`: "nanoyuan" shards or
    "megatron" indexed datasets (dataprep/indexed.py). Returns meta (on rank 0; None on the others)."""
    t0 = time.time()
    enc, tok = load_tokenizer(tokenizer)
    files, clean = list_inputs(inputs), Clean(min_chars, max_chars)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive).")
    if not 0 < piece_mb <= shard_mb:
        raise UserError(f"--piece-mb {piece_mb} / --shard-mb {shard_mb}: need 0 < piece <= shard.")
    rank, world, local_world, comm = _mpi()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if world > 1 and rank == 0 and cores < (os.cpu_count() or 1):
        print(f"note: the launcher bound this rank to {cores} of the node's {os.cpu_count()} cores, and its workers "
              f"inherit that.\nHINT: launch with --bind-to none (Open MPI) or -bind-to none (MPICH), or give "
              f"--workers.", file=sys.stderr)
    workers = workers or max(1, cores // local_world)
    settings = dict(val_fraction=val_fraction, min_chars=min_chars, max_chars=max_chars, shard_mb=shard_mb,
                    piece_mb=piece_mb, format=fmt)
    plan = dict(inputs=[dict(path=os.path.abspath(f), bytes=os.path.getsize(f), mtime_ns=os.stat(f).st_mtime_ns)
                        for f in files], tokenizer=tok, settings=settings)
    shards = make_shards(files, int(piece_mb * 1e6), int(shard_mb * 1e6))
    if not shards:
        raise UserError(f"every input is empty: {', '.join(files)}")
    if rank == 0:
        start_or_resume(out, plan)
    if comm is not None:
        comm.Barrier()
    mine = [k for k in range(len(shards)) if k % world == rank]
    records = {k: r for k in mine if (r := finished_shard(out, k, tok, fmt)) is not None}
    todo = [k for k in mine if k not in records]
    if records:
        print(f"rank {rank}: resuming; {len(records)} of its {len(mine)} shards are already done", flush=True)
    workers = max(1, min(workers, sum(len(shards[k]) for k in todo)))
    total_mb = sum(p[3] - p[2] for k in todo for p in shards[k]) / 1e6
    progress = Progress(total_mb, rank, world, workers)
    for record in write_shards(out, shards, todo, tok, (tokenizer, clean, val_fraction), workers, progress, fmt):
        records[record["shard"]] = record
    progress.close()
    gathered = comm.gather(records, root=0) if comm is not None else [records]
    if rank != 0:
        return None
    records = {k: r for part in gathered for k, r in part.items()}
    return finish(out, files, inputs, tokenizer, tok, settings, [records[k] for k in range(len(shards))],
                  time.time() - t0, workers, world)


class Progress:
    """A bar in MB and documents on a terminal; on rank 0 without one (a batch job's log), a line every 30 s."""

    def __init__(self, total_mb, rank, world, workers):
        from tqdm import tqdm
        self.total, self.done, self.docs, self.t0 = total_mb, 0.0, 0, time.time()
        self.next_line = self.t0 + 30
        label = f"rank 0 of {world}, " if world > 1 else ""
        self.bar = tqdm(total=round(total_mb, 1), unit="MB", desc=f"tokenizing ({label}{workers} workers)",
                        disable=None if rank == 0 else True)
        self.lines = rank == 0 and self.bar.disable

    def __call__(self, piece, stats):
        mb = (piece[3] - piece[2]) / 1e6
        self.done, self.docs = self.done + mb, self.docs + stats["kept"]
        self.bar.update(round(mb, 1))
        self.bar.set_postfix(docs=f"{self.docs:,}", refresh=False)
        if self.lines and time.time() >= self.next_line:
            rate = self.done / max(time.time() - self.t0, 1e-9)
            print(f"tokenized {self.done:,.1f} of {self.total:,.1f} MB, {self.docs:,} documents, "
                  f"{rate:.1f} MB/s", flush=True)
            self.next_line = time.time() + 30

    def close(self):
        self.bar.close()


def finish(out, files, inputs, tokenizer, tok, settings, records, seconds, workers, world):
    """Check the totals, copy the tokenizer, write meta.json, remove the bookkeeping, print the summary."""
    stats = collections.Counter()
    for r in records:
        stats.update(r["stats"])
    empty = [f for i, f in enumerate(files) if stats[f"docs_in_{i}"] == 0]
    for f in empty:
        print(f"warning: {f} holds no documents; skipped.", file=sys.stderr)
    n_docs = stats["kept"] + stats["short"] + stats["long"]
    if stats["kept"] == 0:
        raise UserError(f"no documents kept from {', '.join(inputs)}: {n_docs} found, {stats['short']} shorter "
                        f"than {settings['min_chars']}, {stats['long']} longer than {settings['max_chars']} "
                        f"characters.\nHINT: check the input format, or --min-chars / --max-chars.")
    for split in ("train", "val"):
        if stats[f"{split}_tokens"] == 0:  # the tokens are still good for something else; train.py will refuse
            print(f"warning: the {split} split is empty ({stats['kept']} documents kept, --val-fraction "
                  f"{settings['val_fraction']}); train.py needs both.\nHINT: add documents or change "
                  f"--val-fraction (in a fresh --out).", file=sys.stderr)
    save_copy(tokenizer, tok, out)  # so that the data directory alone can decode its tokens
    fmt = settings["format"]
    names = [shard_names(r["shard"], fmt) for r in records]
    shards = [dict(train=n[0], train_tokens=r["stats"]["train_tokens"], val=n[1], val_tokens=r["stats"]["val_tokens"])
              for n, r in zip(names, records)]
    meta = dict(format_version=META_VERSION, format=fmt, tokenizer=tok, tokenizer_spec=tokenizer, sources=files,
                settings=settings, stats={k: stats[k] for k in TEXT_KEYS}, empty_files=empty,
                tokens=dict(train=stats["train_tokens"], val=stats["val_tokens"]), shards=shards)
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
    for k in range(len(records)):
        os.remove(os.path.join(out, names[k][2]))
    os.remove(os.path.join(out, "plan.json"))
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    ext = ".bin" if fmt == "nanoyuan" else " (.bin + .idx)"
    too_long = f"longer than {settings['max_chars']:,} characters" if settings["max_chars"] else "too long (no limit)"
    tokens = stats["train_tokens"] + stats["val_tokens"]
    print(f"prepared {len(records)} shard{'s' * (len(records) > 1)} from {len(files)} file"
          f"{'s' * (len(files) > 1)} ({mb:,.1f} MB) in {seconds:.1f} s, {workers} worker{'s' * (workers > 1)} x "
          f"{world} rank{'s' * (world > 1)}\n"
          f"  documents: {stats['kept']:,} kept ({stats['val_docs']:,} to val); dropped {stats['short']:,} shorter "
          f"than {settings['min_chars']:,} and {stats['long']:,} {too_long}; "
          f"{stats['blank']:,} blank lines skipped\n"
          f"  characters: {stats['chars']:,}; tokens: {stats['train_tokens']:,} train + {stats['val_tokens']:,} val "
          f"({(tokens - stats['kept']) / stats['chars']:.3f} tokens per character, end-of-document tokens aside)\n"
          f"  non-UTF-8 bytes replaced: {stats['bad_bytes']:,}" + (f"; files with no documents: {', '.join(empty)}"
                                                                  if empty else "") +
          f"\n  -> {out}/train_*{ext}, val_*{ext}, meta.json", flush=True)
    if fmt == "megatron":  # the same tokens for Megatron-LM: a blend weighted as nanoyuan samples them (by size)
        total = max(1, stats["train_tokens"])
        blend = [f"{s['train_tokens'] / total:.6g} {os.path.join(out, s['train'])}"
                 for s in shards if s["train_tokens"]]
        print("  Megatron-LM: --data-path " + " ".join(blend), flush=True)
    return meta
