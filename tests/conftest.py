"""Shared fixtures: a small slice of the bundled corpus, a tokenizer trained on it, and the prepared data."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A model small enough that a training step takes milliseconds on one CPU core.
SMALL = ["--preset", "tiny", "--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--seq_len", "32",
         "--micro_batch", "4", "--batch_tokens", "256", "--warmup_steps", "3", "--eval_interval", "5",
         "--eval_batches", "2", "--dtype", "fp32", "--device", "cpu"]


def run(script, *args, check=True, env=None):
    """Run one of the project's command-line scripts the way a user would."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left():
    """MPICH's shared-memory segments that the suite's killed or aborted runs leave in /dev/shm (about 2 MB each,
    77 in one run) are removed at the end: left to pile up over sessions (1,304 of them here), a new run whose PMI
    job id named one of them hung in MPI_Init (tests/slurm.conf)."""
    shm = "/dev/shm"
    before = set(os.listdir(shm)) if os.path.isdir(shm) else set()
    yield
    if os.path.isdir(shm):
        for name in set(os.listdir(shm)) - before:
            if name.startswith("mpich_shm_"):
                try:
                    os.remove(os.path.join(shm, name))
                except OSError:
                    pass


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The first 30 chapters of 三国演义, in the ASC22 format (one chapter per line, <n> for newlines)."""
    with open(os.path.join(ROOT, "corpus", "sanguo.txt"), encoding="utf-8") as f:
        lines = f.readlines()[:30]
    path = tmp_path_factory.mktemp("corpus") / "sanguo30.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "sanguo512.tiktoken")
    run("data.py", "train-tokenizer", "--input", corpus, "--vocab-size", 512, "--out", path)
    return path


@pytest.fixture(scope="session")
def prepared(corpus, tokenizer, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "sanguo30")
    run("data.py", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--out", out, "--val-fraction", 0.2)
    return out


@pytest.fixture(scope="session")
def reference(prepared, tmp_path_factory):
    """Five steps of SMALL in one process: the numbers every parallel layout must reproduce (helpers.losses)."""
    from helpers import losses
    out = tmp_path_factory.mktemp("ref") / "run"
    run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 5)
    return losses(out)
