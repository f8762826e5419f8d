"""The GPU hot path's settings, tested where a CPU can test them (issue 10): CUDA_DEVICE_MAX_CONNECTIONS under the
real launcher, and the pinned-memory option of the batch reader. bench/gpu_check.sh runs this file on the GPU too,
where the pinned batches are checked for real."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SMALL, read_metrics, run
from data import Batches
from helpers import MPIEXEC, needs_mpiexec, synthetic

# One rank's view of the variable after init_distributed (gloo on CPU: no CUDA involved, only the environment).
SHOW_ENV = ("import os, sys\n"
            "from distributed import init_distributed\nfrom runtime.mpi import run_or_abort\n"
            "def main():\n"
            "    d = init_distributed(tp=int(sys.argv[1]), device='cpu')\n"
            "    print(f'rank {d.rank}: CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get(\"CUDA_DEVICE_MAX_CONNECTIONS\")}',"
            " flush=True)\n"
            "run_or_abort(main)\n")


def launch(tp, value):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    if value is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = value
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", SHOW_ENV, str(tp)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@needs_mpiexec
@pytest.mark.parametrize("tp, user, seen", [(2, None, "1"), (2, "4", "4"), (1, None, "None")],
                         ids=["tp2-set", "tp2-user-value-kept", "tp1-untouched"])
def test_cuda_device_max_connections(tp, user, seen):
    out = launch(tp, user)
    # in both ranks' environments (the launcher may run the two ranks' lines together: search, don't split lines)
    assert all(f"rank {r}: CUDA_DEVICE_MAX_CONNECTIONS={seen}" in out for r in (0, 1)), out
    assert out.count("note: CUDA_DEVICE_MAX_CONNECTIONS=4 from the environment is kept") == (user == "4"), out


def test_pin_memory_without_cuda_warns_and_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = synthetic(str(tmp_path / "d"), [5000, 3000])
    plain = Batches(d, seq_len=16, micro_batch=3, seed=1, accum=2)
    with pytest.warns(UserWarning, match="no CUDA device"):
        pinned = Batches(d, seq_len=16, micro_batch=3, seed=1, accum=2, pin_memory=True)
    assert pinned.pin_memory is False
    for a, b in zip(plain.train_batch(4, 1), pinned.train_batch(4, 1)):
        assert a.equal(b)


def test_pinned_batches_are_contiguous_copies(tmp_path, monkeypatch):
    """The pinned branch on a CPU: torch.empty(pin_memory=True) needs a CUDA build, so a stand-in records the request
    and allocates ordinary memory; the batches must be contiguous (a strided source would make the GPU copy wait)
    and equal to the unpinned ones."""
    d = synthetic(str(tmp_path / "d"), [5000, 3000])
    plain = Batches(d, seq_len=16, micro_batch=3, seed=1, accum=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    requests, empty = [], torch.empty

    def fake_empty(*shape, pin_memory=False, **kw):
        requests.append(pin_memory)
        return empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", fake_empty)
    pinned = Batches(d, seq_len=16, micro_batch=3, seed=1, accum=2, pin_memory=True)
    for got, want in ((pinned.train_batch(4, 1), plain.train_batch(4, 1)), (next(pinned.val_batches(1)),
                                                                             next(plain.val_batches(1)))):
        assert not want[0].is_contiguous()  # the unpinned views, [B, T] of [B, T + 1]
        assert all(t.is_contiguous() for t in got) and got[0].equal(want[0]) and got[1].equal(want[1])
    assert requests == [True] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_batches_on_a_gpu_machine(tmp_path):
    d = synthetic(str(tmp_path / "d"), [5000, 3000])
    x, y = Batches(d, seq_len=16, micro_batch=3, seed=1, pin_memory=True).train_batch(0, 0)
    assert x.is_pinned() and y.is_pinned() and x.is_contiguous() and y.is_contiguous()
    x_gpu = x.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert x_gpu.cpu().equal(Batches(d, seq_len=16, micro_batch=3, seed=1).train_batch(0, 0)[0])


@pytest.mark.parametrize("recompute, dtype, whole", [("none", "fp32", True), ("full", "fp32", False),
                                                    ("selective", "fp32", False), ("none", "bf16", False)])
def test_compile_takes_the_whole_model_where_it_can(recompute, dtype, whole):
    """--compile: the whole model at tp 1 in fp32 without recomputation, each block elsewhere (step.build says
    why; tp > 1 too, tested by tests/test_parallel_train.py -k compile). Only the choice is checked here (nothing
    compiles until a forward); the numbers are the next test's and, in bf16, tests/test_mixed_precision.py's."""
    import step
    from run.config import make_config
    from distributed import Dist
    cfg = make_config("tiny", n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=512, dtype=dtype,
                      compile=True, recompute=recompute)
    model = step.build(cfg, Dist())[0]
    assert (model._compiled_call_impl is not None) == whole
    assert all((b._compiled_call_impl is not None) != whole for b in model.blocks)


@pytest.mark.parametrize("dtype, rel", [("fp32", 1e-5), ("bf16", 1e-3)])
def test_compile_equals_eager(prepared, tmp_path, dtype, rel):
    """fp32: the whole model compiled; bf16: each block (the matmuls' main_grad updates break a whole-model graph),
    inductor fusing the elementwise work between the matmuls. 3 steps equal to eager within rel (bf16 measured 6e-5:
    the fused kernels round differently)."""
    args = [*SMALL, "--n_layer", 1, "--data", prepared, "--max_steps", 3, "--eval_interval", 3, "--dtype", dtype]
    run("train.py", *args, "--out", tmp_path / "eager")
    run("train.py", *args, "--out", tmp_path / "compiled", "--compile", "true")
    eager, compiled = (read_metrics(tmp_path / d) for d in ("eager", "compiled"))
    for key in ("loss", "grad_norm", "val_loss"):
        a, b = ([r[key] for r in rows if key in r] for rows in (eager, compiled))
        assert len(a) == (1 if key == "val_loss" else 3) and b == pytest.approx(a, rel=rel), key
