"""The tensor-parallel layers and their collectives on two GPUs with NCCL: tests/mpi_tp_layers.py (which first checks
all_gather_seq and reduce_scatter_seq on their own) under `mpiexec -n 2`, as tests/test_parallel.py runs it on CPU
with gloo. Kept ready for a machine with two GPUs and an MPI launcher; skipped elsewhere (bench/gpu_check.sh runs
it, so on a one-GPU card it reports as skipped)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from helpers import MPIEXEC

LAUNCHER = MPIEXEC if os.path.exists(MPIEXEC) else shutil.which("mpiexec")
pytestmark = [pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
              pytest.mark.skipif(LAUNCHER is None, reason="needs mpiexec (MPICH in the venv, or one on PATH)")]


def test_tp_layers_match_unsharded_on_two_gpus():
    pytest.importorskip("mpi4py")  # without it each process would be a world of one
    proc = subprocess.run([LAUNCHER, "-n", "2", sys.executable, os.path.join(ROOT, "tests", "mpi_tp_layers.py"), "2",
                           "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("all tensor-parallel layers match (nccl)") == 2, proc.stdout + proc.stderr
