"""What the first GPU run would have hit, pinned on CPU by faking the GPU semantics each fix relies on (issue 27):
NCCL's waits, device placement at resume (the meta device stands for a GPU), memory at data-parallel sizes 1, 2, 4
(tests/mpi_memory.py under mpiexec) and checkpoint writes slower than the collective timeout."""
import datetime
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist

import parallel
from conftest import ROOT
from data_parallel import ZeroAdamW
from distributed import Dist
from mixed_precision import MasterAdamW, use_master_weights
from data_parallel import adamw
from helpers import MPIEXEC, needs_mpiexec


class FakeWork:
    """A collective's work handle that records how it was waited for."""

    def __init__(self):
        self.waits = []

    def wait(self, **kwargs):
        self.waits.append(kwargs)
        return True


@pytest.mark.parametrize("device, expected", [("cuda", {}), ("cpu", {"timeout": datetime.timedelta(seconds=7)})])
def test_nccl_waits_leave_the_cpu_free(monkeypatch, device, expected):
    """Finding 1. On NCCL, work.wait(timeout=...) blocks the CPU thread until the collective is done; work.wait()
    only orders the current stream after it. ParallelMatmul's backward (the ~81 waits of a tensor-parallel
    micro-batch) must wait without a timeout on a GPU; gloo keeps its deadline."""
    works = []
    monkeypatch.setattr(tdist, "all_reduce", lambda x, group=None, async_op=False: works.append(FakeWork()) or
                        works[-1])
    dist = Dist(tp=2, device=torch.device(device), timeout_s=7)
    x = torch.randn(2, 4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    parallel.ParallelMatmul.apply(x, w, None, dist, True).sum().backward()  # column-parallel at tp 2
    assert [w.waits for w in works] == [[expected]]  # the input gradient's all-reduce, waited for once


def _groups(model):
    return [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}]


def _plain_state(model, step=3.0):
    """A checkpoint's optimizer state as load_checkpoint gives it: torch AdamW's format, on the host."""
    state = {i: {"step": torch.tensor(step), "exp_avg": torch.full(p.shape, 0.5), "exp_avg_sq": torch.full(p.shape, 2.)}
             for i, p in enumerate((model.weight, model.bias))}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": wd, "amsgrad": False, "maximize": False,
               "foreach": None, "capturable": False, "differentiable": False, "fused": True, "params": [i]}
              for i, wd in enumerate((0.1, 0.0))]
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("kind", ["zero1", "zero1-bf16", "master"])
def test_resume_puts_optimizer_state_on_the_parameters_device(kind):
    """Finding 2. load_checkpoint maps every tensor to the host; the optimizer's state must land where its
    parameters are, as torch's own load_state_dict puts it: the moments on their device and dtype, and `step` on
    the device too for a fused AdamW (CUDA's fused kernel reads it there). The meta device stands for the GPU;
    torch's fused AdamW accepts it (its kernels are never run here)."""
    with torch.device("meta"):
        model = torch.nn.Linear(8, 8)
    dist = Dist(device=torch.device("meta"))
    if kind == "master":
        use_master_weights(model, torch.bfloat16)
        opt = MasterAdamW(_groups(model), adamw, lr=1e-3)
    else:
        if kind == "zero1-bf16":
            use_master_weights(model, torch.bfloat16)
        opt = ZeroAdamW(_groups(model), dist, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    inner = opt.inner
    assert all(g["fused"] for g in inner.param_groups)  # as adamw() makes it on a GPU
    opt.load_state_dict(_plain_state(model))
    assert inner.state, "nothing was loaded"
    for p, st in inner.state.items():
        for key, value in st.items():
            assert value.device == p.device, f"{kind}: {key} on {value.device}, its parameter on {p.device}"
            assert value.dtype == torch.float32
    assert opt.param_groups is inner.param_groups  # what the loop sets the lr on is what the optimizer reads


@needs_mpiexec
def test_plan_counts_what_data_parallel_training_allocates():
    """Finding 3. tests/mpi_memory.py at dp 1, 2 and 4, plain and ZeRO-1, in bf16: the plan within 10% of the bytes
    alive through training steps and a checkpoint write (before the fix: the all-reduce's copy of every bucket,
    ZeRO-1's full-size send buffer per bucket, and a checkpoint gathering every moment on the device)."""
    for n in (1, 2, 4):
        proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, os.path.join(ROOT, "tests", "mpi_memory.py")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count(f"dp {n} zero1=") == 2 * n, proc.stdout


@needs_mpiexec
def test_checkpoint_slower_than_the_collective_timeout(prepared, tmp_path):
    """Finding 5. At dp 2 only data-parallel rank 0 writes; rank 1 used to wait in the next collective, and a write
    longer than --collective_timeout_s ended the job (gloo's deadline here, NCCL's watchdog on GPUs). With every
    save 4 s slower than a 2 s timeout the run finishes, and a run resumed from its middle checkpoint ends where
    the uninterrupted one does."""
    from conftest import SMALL, read_metrics

    def train(out, steps, *extra):
        args = [*SMALL, "--data", prepared, "--out", out, "--collective_timeout_s", 2, "--ckpt_interval", 3,
                "--lr_decay_steps", 6, "--max_steps", steps, *extra]
        proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "tests", "slow_save.py"), "4",
                               *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    train(tmp_path / "a", 6)
    train(tmp_path / "b", 3)
    train(tmp_path / "b", 6, "--resume")
    strip = lambda out: [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]  # noqa: E731
    assert strip(tmp_path / "a") == strip(tmp_path / "b") and len(strip(tmp_path / "a")) == 6
