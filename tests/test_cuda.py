"""The training loop on a CUDA GPU (skipped without one; run by bench/gpu_check.sh on the GPU machines)."""
import pytest
import torch

from conftest import SMALL, read_metrics, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains(prepared, tmp_path, dtype):
    run("train.py", *SMALL, "--data", prepared, "--out", tmp_path / dtype, "--device", "cuda", "--dtype", dtype,
        "--max_steps", 30, "--lr", 3e-3)
    rows = [r for r in read_metrics(tmp_path / dtype) if "loss" in r]
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert not any(r["skipped"] for r in rows[5:])  # fp16 may skip its first steps while the scale settles
    name = torch.cuda.get_device_name()
    if any(k in name for k in ("H100", "H200", "A100")):
        assert all(0 < r["mfu"] < 1 for r in rows)


def test_cuda_fp32_matches_cpu(prepared, tmp_path):
    """The same model and batches on the GPU and on the CPU, in fp32: the first steps agree closely."""
    for device in ("cpu", "cuda"):
        run("train.py", *SMALL, "--data", prepared, "--out", tmp_path / device, "--device", device, "--max_steps", 3)
    cpu, gpu = ([r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("cpu", "cuda"))
    assert gpu == pytest.approx(cpu, rel=1e-4)


def test_fused_weight_gradient_accumulation():
    """mixed_precision.accumulate_wgrad on CUDA: the weight gradient added into the fp32 main_grad by one GEMM with an
    fp32 output (torch.addmm out_dtype), equal to the unfused fp32 arithmetic; if this torch has no such kernel the
    unfused branch ran, and the test says so."""
    from mixed_precision import _FUSED, accumulate_wgrad
    gen = torch.Generator(device="cuda").manual_seed(0)
    grad, x = (torch.randn(4096, n, device="cuda", generator=gen).to(torch.bfloat16) for n in (768, 1024))
    main = torch.randn(768, 1024, device="cuda", generator=gen)
    want = main + grad.float().t() @ x.float()
    accumulate_wgrad(main, grad, x)
    assert _FUSED[("cuda", torch.Tensor)], "torch.addmm(out_dtype=float32) is missing here: the unfused branch ran"
    assert torch.allclose(main, want, rtol=1e-4, atol=1e-3)
