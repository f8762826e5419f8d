"""parallel.py under the real launcher: mpiexec (MPICH from the venv), gloo on CPU."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import mpirun, needs_mpiexec

@needs_mpiexec
@pytest.mark.parametrize("n, tp", [(2, 2), (4, 2), (4, 4)])
def test_tp_layers_match_unsharded(n, tp):
    proc = mpirun(n, os.path.join(ROOT, "tests", "mpi_tp_layers.py"), tp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("all tensor-parallel layers match") == n
    if n == 4 and tp == 2:  # ranks 0,1 form one tp group, 2,3 the other; dp groups are strided
        assert "rank 3 (tp_rank 1, dp_rank 1)" in proc.stdout


@needs_mpiexec
def test_world_not_divisible_by_tp():
    proc = mpirun(2, os.path.join(ROOT, "tests", "mpi_tp_layers.py"), 4, timeout=60)
    assert proc.returncode != 0 and "not divisible by --tp 4" in proc.stderr


def test_single_process_is_a_world_of_one():
    """A plain `python` process (no launcher) is rank 0 of 1, with no groups; run in a subprocess so that the
    test process itself never initialises MPI."""
    code = ("from distributed import init_distributed\n"
            "d = init_distributed(tp=1, device='cpu')\n"
            "assert (d.rank, d.world, d.tp, d.dp) == (0, 1, 1, 1) and d.tp_group is None and d.dp_group is None\n"
            "with d.rng.fork():\n    pass\n"
            "print('world of one')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "world of one" in proc.stdout, proc.stderr


def test_broken_mpi_library_does_not_stop_a_single_process(tmp_path):
    """A plain `python train.py` is a world of one even where mpi4py cannot load libmpi."""
    fake = tmp_path / "mpi4py"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "MPI.py").write_text("raise RuntimeError('cannot load MPI library (simulated)')\n")
    code = "from distributed import init_distributed; d = init_distributed(); print('world', d.world)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0 and "world 1" in proc.stdout, proc.stderr
