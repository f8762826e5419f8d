"""mixed_precision.accumulate_wgrad: when it gives up the fused weight-gradient GEMM (torch.addmm with an fp32
out_dtype, CUDA's) and what it does instead. The GPU's answers are faked on the CPU by patching torch.addmm; the real
CUDA kernel is tested in tests/test_cuda.py::test_fused_weight_gradient_accumulation."""
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mixed_precision
from mixed_precision import accumulate_wgrad

KEY = ("cpu", torch.Tensor)  # what _FUSED is keyed by for these tensors


@pytest.fixture
def fused(monkeypatch):
    """An empty _FUSED for the test: nothing learned by earlier tests in this process."""
    table = {}
    monkeypatch.setattr(mixed_precision, "_FUSED", table)
    return table


def inputs():
    gen = torch.Generator().manual_seed(0)
    grad, x = (torch.randn(64, n, generator=gen).to(torch.bfloat16) for n in (13, 7))  # [N, out], [N, in]
    main = torch.randn(13, 7, generator=gen)  # [out, in], fp32
    return main, grad, x


def raising(err):
    def addmm(*args, **kwargs):
        raise err
    return addmm


class GemmDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product that reaches the kernels (mm, addmm and their variants)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_", "matmul", "bmm", "baddbmm"):
            self.seen.append((name, *(a.dtype for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("err", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling cublasLtMatmul"),
], ids=["out-of-memory", "cublas-failure"])
def test_errors_other_than_a_missing_kernel_are_raised(fused, monkeypatch, err):
    """An out-of-memory (a RuntimeError) or any other failure of the fused GEMM is the caller's to see: it is raised,
    main_grad is left as it was, and the fused kernel stays chosen for the next call."""
    monkeypatch.setattr(torch, "addmm", raising(err))
    main, grad, x = inputs()
    before = main.clone()
    with pytest.raises(type(err), match=re.escape(str(err))):
        accumulate_wgrad(main, grad, x)
    assert fused.get(KEY, True), "the fused kernel was switched off for good by one failed call"
    assert torch.equal(main, before)


@pytest.mark.parametrize("err", [
    NotImplementedError("Could not run 'aten::addmm.dtype_out' with arguments from the 'CUDA' backend."),
    TypeError("addmm() received an invalid combination of arguments - got (..., out_dtype=torch.dtype)"),
    RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16"),
], ids=["no-kernel", "old-torch", "dtype-combination"])
def test_a_missing_kernel_falls_back_to_a_bf16_gemm_and_says_so_once(fused, monkeypatch, capsys, err):
    """Where this torch has no fused kernel: the weight gradient is one bf16 GEMM (fp32 sums inside, its output
    rounded to bf16) added into main_grad, as Megatron-LM without gradient accumulation fusion; not an fp32 GEMM
    (no tensor cores, no TF32). The switch is said once on stderr, not at every call."""
    monkeypatch.setattr(torch, "addmm", raising(err))
    main, grad, x = inputs()
    product = grad.float().t() @ x.float()  # [out, in]
    want = main + 2 * product
    with GemmDtypes() as gemms:
        accumulate_wgrad(main, grad, x)
        accumulate_wgrad(main, grad, x)
    assert fused[KEY] is False
    assert gemms.seen == [("mm", torch.bfloat16, torch.bfloat16)] * 2, f"the fallback's GEMMs: {gemms.seen}"
    # each call's product is rounded to bf16 once (relative error <= 2^-8, 2^-9 plus the fp32 sums' own error)
    assert ((main - want).abs() <= 2 * product.abs() * 2.0**-8 + 1e-5).all(), (main - want).abs().max()
    err_text = capsys.readouterr().err
    assert err_text.count("no fused weight-gradient GEMM on cpu") == 1, err_text
    assert type(err).__name__ in err_text and "bfloat16 GEMM" in err_text and "HINT" in err_text


def test_said_once_per_device_type(fused, monkeypatch, capsys):
    """A second device type gets its own warning; a second call on either gets none."""
    monkeypatch.setattr(torch, "addmm", raising(NotImplementedError("Could not run 'aten::addmm.dtype_out'")))
    for device in ("cpu", "meta", "cpu", "meta"):
        main, grad, x = (t.to(device) for t in inputs())
        accumulate_wgrad(main, grad, x)
    err_text = capsys.readouterr().err
    assert err_text.count("no fused weight-gradient GEMM on cpu") == 1
    assert err_text.count("no fused weight-gradient GEMM on meta") == 1


def test_on_this_cpu(fused, capsys):
    """The real torch on the CPU. 2.13 has no kernel there (NotImplementedError, "Could not run
    'aten::addmm.dtype_out' with arguments from the 'CPU' backend"), which is recognised as such: the fallback, equal
    to the reference within bf16's rounding. Should a later torch have one, the fused result is held to fp32's."""
    main, grad, x = inputs()
    product = grad.float().t() @ x.float()  # [out, in]
    want = main + product
    accumulate_wgrad(main, grad, x)
    if fused[KEY]:
        assert torch.allclose(main, want, rtol=1e-5, atol=1e-5)
    else:
        assert ((main - want).abs() <= product.abs() * 2.0**-8 + 1e-5).all()
        assert "no fused weight-gradient GEMM on cpu (NotImplementedError" in capsys.readouterr().err
