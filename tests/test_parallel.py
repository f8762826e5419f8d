"""parallel.py under the real launcher: mpiexec (MPICH from the venv), gloo on CPU."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from parallel import init_distributed

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def mpirun(n, *args, timeout=60):
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("n, tp", [(2, 2), (4, 2), (4, 4)])
def test_tp_layers_match_unsharded(n, tp):
    proc = mpirun(n, os.path.join(ROOT, "tests", "mpi_tp_layers.py"), tp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("all tensor-parallel layers match") == n
    if n == 4 and tp == 2:  # ranks 0,1 form one tp group, 2,3 the other; dp groups are strided
        assert "rank 3 (tp_rank 1, dp_rank 1)" in proc.stdout


def test_world_not_divisible_by_tp():
    proc = mpirun(2, os.path.join(ROOT, "tests", "mpi_tp_layers.py"), 4, timeout=60)
    assert proc.returncode != 0 and "not divisible by --tp 4" in proc.stderr


def test_single_process_is_a_world_of_one():
    dist = init_distributed(tp=1, device="cpu")
    assert (dist.rank, dist.world, dist.tp, dist.dp) == (0, 1, 1, 1) and dist.tp_group is None and dist.dp_group is None
    with dist.rng.fork():  # a no-op at tp = 1
        pass
