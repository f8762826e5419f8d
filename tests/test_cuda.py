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


def test_cuda_zero1_resume_is_exact(prepared, tmp_path):
    """Issue 27, finding 2 on the real thing: ZeRO-1 in bf16 (fused CUDA AdamW), stopped at step 3 and resumed, ends
    where the uninterrupted run ends. Before the fix the resumed run handed CPU tensors to the fused kernel."""
    common = [*SMALL, "--data", prepared, "--device", "cuda", "--dtype", "bf16", "--zero1", "true",
              "--lr_decay_steps", 6, "--ckpt_interval", 3]
    run("train.py", *common, "--out", tmp_path / "a", "--max_steps", 6)
    run("train.py", *common, "--out", tmp_path / "b", "--max_steps", 3)
    run("train.py", *common, "--out", tmp_path / "b", "--max_steps", 6, "--resume")
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_cuda_auto_dtype_matches_the_planner():
    """Issue 27, finding 7: --dtype auto gives bf16 where the GPU has it natively (sm80+), fp16 elsewhere, as
    tools/plan.py assumes for the card of that name."""
    from run.config import make_config
    from tools.plan import gpu_dtype
    from step import resolve_dtype
    cfg = make_config("tiny", dtype="auto")
    resolve_dtype(cfg, torch.device("cuda", 0))
    assert cfg.dtype == ("bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16")
    assert cfg.dtype == gpu_dtype(make_config("tiny", dtype="auto"), torch.cuda.get_device_name(0))


@pytest.mark.parametrize("zero1", [False, True])
def test_cuda_peak_memory_within_the_plan(zero1):
    """Issue 27, finding 3 on the real allocator: the peak torch.cuda allocates over two steps of a model whose
    parameters dominate, in bf16, within 10% of tools/plan.py's estimate (flash attention, as the plan assumes)."""
    from distributed import Dist
    from mixed_precision import LossScaler
    from run.config import make_config
    from tools.plan import estimate
    from step import build, train_step
    cfg = make_config("tiny", n_layer=4, n_embd=1024, n_head=8, seq_len=256, vocab_size=8192, micro_batch=2,
                      dtype="bf16", zero1=zero1)
    dist = Dist(device=torch.device("cuda", 0))
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model, opt, reducer, clip = build(cfg, dist)
    scaler = LossScaler(enabled=False)
    for _ in range(2):
        batch = lambda micro: (torch.randint(0, cfg.vocab_size, (cfg.micro_batch, cfg.seq_len)),) * 2  # noqa: E731
        train_step(model, opt, reducer, scaler, clip, 2, cfg, dist, batch)
    got = torch.cuda.max_memory_allocated() - base
    want = estimate(cfg, tp=1, dp=1, dtype="bf16")["total_bytes"]
    assert abs(want - got) < 0.10 * got, f"plan {want / 1e6:.1f} MB, measured {got / 1e6:.1f} MB"
