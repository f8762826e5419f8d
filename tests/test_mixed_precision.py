"""Master weights (mixed_precision.py): bf16 working weights, fp32 masters and main gradients, in one process.
Under mpiexec (tp 2 x dp 2, ZeRO-1) see tests/test_parallel_train.py."""
import pytest
import torch

from conftest import SMALL, read_metrics, run
from data_parallel import adamw
from mixed_precision import MasterAdamW, fp32_state_dict, load_fp32_state_dict
from model import Yuan
from run.config import make_config
from distributed import Dist
from mixed_precision import LossScaler
from step import build, train_step

STEPS, ACCUM = 5, 2


def tiny(dtype):
    return make_config("tiny", n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=256, micro_batch=4,
                       dtype=dtype, lr=3e-3, warmup_steps=0)


def batches():
    return torch.randint(0, 256, (STEPS, ACCUM, 4, 33), generator=torch.Generator().manual_seed(0))


def train(dtype):
    """STEPS steps of step.build + step.train_step; (losses, model, optimizer)."""
    cfg, dist, data = tiny(dtype), Dist(), batches()
    model, opt, reducer, clip = build(cfg, dist)
    scaler, losses = LossScaler(enabled=dtype == "fp16"), []
    for s in range(STEPS):
        batch = lambda m: (data[s, m, :, :-1], data[s, m, :, 1:])  # noqa: E731
        losses.append(train_step(model, opt, reducer, scaler, clip, ACCUM, cfg, dist,
                                 batch)[0].item())
    return losses, model, opt


def train_with_autocast():
    """The step as it was before master weights: fp32 parameters, bf16 autocast, AdamW on the fp32 gradients."""
    cfg, data = tiny("bf16"), batches()
    torch.manual_seed(cfg.seed)
    model = Yuan(cfg, Dist())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    opt = adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                 {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for s in range(STEPS):
        total = 0.0
        for m in range(ACCUM):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(data[s, m, :, :-1], data[s, m, :, 1:])[1]
            (loss / ACCUM).backward()
            total += loss.item() / ACCUM
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def test_bf16_master_weights_train_as_autocast_did():
    """Tolerance: 1e-3 relative on the loss over 5 steps (measured: 1e-4; bf16 keeps 8 bits of mantissa, the
    difference is where activations are rounded: here the whole residual stream is bf16)."""
    losses, model, _ = train("bf16")
    assert losses == pytest.approx(train_with_autocast(), rel=1e-3)
    assert losses == pytest.approx(train("fp32")[0], rel=1e-3)
    assert train("fp16")[0] == pytest.approx(losses, rel=1e-3)
    p = model.blocks[0].mlp.fc.weight
    assert p.dtype == torch.bfloat16 and p.master.dtype == torch.float32 and p.grad is None
    assert torch.equal(p, p.master.to(torch.bfloat16))  # the working copy is the master, rounded


def test_main_grad_is_the_fp32_gradient():
    """One backward: every main_grad (fused into the matmul for the linear weights, added by the hook for the rest)
    equals the fp32 model's gradient within bf16 rounding, and the placeholder gradients are gone."""
    cfg, data = tiny("bf16"), batches()
    model, *_ = build(cfg, Dist())
    ref = Yuan(tiny("fp32"), Dist())
    ref.load_state_dict(fp32_state_dict(model))
    for m in (model, ref):
        m(data[0, 0, :, :-1], data[0, 0, :, 1:])[1].backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is None and p.main_grad.dtype == torch.float32, name
        err = (p.main_grad - q.grad).norm() / q.grad.norm()
        assert err < 0.02, f"{name}: relative error {err:.4f}"


def test_master_adamw_shows_what_a_torch_optimizer_shows():
    """Callers read a torch optimizer's defaults, param_groups and state (bench/vs_plain.py reads defaults["fused"]);
    MasterAdamW has them all, its state keyed by the working parameters that callers hold, not by the masters.
    (The weight-gradient accumulation into main_grad is tested in tests/test_wgrad.py.)"""
    _, model, opt = train("bf16")
    assert isinstance(opt, MasterAdamW)
    assert opt.defaults["lr"] == 3e-3 and opt.defaults["betas"] == (0.9, 0.95) and "fused" in opt.defaults
    assert opt.param_groups[0]["lr"] == 3e-3
    p = model.blocks[0].mlp.fc.weight
    assert len(opt.state) == len(list(model.parameters())) and p in opt.state and p.master not in opt.state
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and int(opt.state[p]["step"]) == STEPS


def test_bench_vs_plain_runs_in_bf16():
    """bench/vs_plain.py (step 3 of bench/gpu_check.sh, which runs it in bf16 on the GPU) at a tiny size: it builds
    torch's AdamW for the plain model from nanoyuan's optimizer's defaults, here a MasterAdamW."""
    proc = run("bench/vs_plain.py", "--preset", "tiny", "--n_layer", 1, "--seq_len", 32, "--micro_batch", 2,
               "--steps", 1, "--dtype", "bf16")
    assert ", bf16, " in proc.stdout and "nanoyuan / plain = " in proc.stdout, proc.stdout


def test_checkpoints_hold_fp32_masters_and_load_everywhere():
    _, model, _ = train("bf16")
    sd = fp32_state_dict(model)
    assert all(v.dtype == torch.float32 for v in sd.values())
    fp32 = Yuan(tiny("fp32"), Dist())
    fp32.load_state_dict(sd)  # an fp32 model (sample.py, older code) takes it as it is
    again, *_ = build(tiny("bf16"), Dist())
    load_fp32_state_dict(again, sd)
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p.master, q.master) and torch.equal(p, q)


def test_bf16_resume_is_exact_and_continues_an_fp32_run(prepared, tmp_path):
    """train.py in bf16, stopped at step 4 and resumed, ends where the uninterrupted run ends (fp32 masters and
    AdamW state restored exactly); a checkpoint written in fp32 resumes in bf16."""
    base = [*SMALL, "--data", prepared, "--lr_decay_steps", 8, "--ckpt_interval", 4]  # SMALL says fp32
    common = [*base, "--dtype", "bf16"]  # the last --dtype counts
    run("train.py", *common, "--out", tmp_path / "a", "--max_steps", 8)
    run("train.py", *common, "--out", tmp_path / "b", "--max_steps", 4)
    run("train.py", *common, "--out", tmp_path / "b", "--max_steps", 8, "--resume")
    rows = lambda out: [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out) if "loss" in r]  # noqa
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert read_metrics(tmp_path / "a")[-1] == read_metrics(tmp_path / "b")[-1]  # the final val_loss
    run("train.py", *base, "--out", tmp_path / "c", "--max_steps", 4)
    proc = run("train.py", *common, "--out", tmp_path / "c", "--max_steps", 6, "--resume")
    assert "resumed from" in proc.stdout and "changed: dtype" in proc.stdout
    assert len([r for r in read_metrics(tmp_path / "c") if "loss" in r]) == 6



def test_master_weights_come_before_the_reducers_hooks():
    """The hook that moves a gradient into main_grad must run before a reducer counts that gradient as final
    (data_parallel.Buckets): use_master_weights refuses parameters that already carry a gradient hook."""
    from data_parallel import Buckets
    from mixed_precision import use_master_weights
    model = Yuan(tiny("fp32"), Dist())
    Buckets([list(model.parameters())], 1.0, launch=lambda bucket: None)
    with pytest.raises(RuntimeError, match="before the reducers"):
        use_master_weights(model, torch.bfloat16)


def test_the_overlap_step_refuses_autocast():
    """ParallelMatmul computes its backward in the dtypes it saved, the model's own: under torch.autocast it says
    so instead of failing later in backward with a dtype mismatch."""
    from parallel import ParallelMatmul
    x, w = torch.randn(2, 3, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="--overlap false"):
        ParallelMatmul.apply(x, w, None, Dist(), False)
    assert ParallelMatmul.apply(x, w, None, Dist(), False).shape == (2, 3, 4)  # without autocast it runs
