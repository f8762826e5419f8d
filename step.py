"""One optimizer step, and what it steps: the model and its optimizer built from a run's settings, in the dtype
the device computes in. train.py's loop calls train_step once per step; tools/roofline.py prices the same call
under fake tensors and bench/throughput.py times it.

    model, opt, reducer, clip_params = build(cfg, dist)
    loss, grad_norm, finite = train_step(model, opt, reducer, scaler, clip_params, grad_accum, cfg, dist, batch)

Read as nanoGPT's loop body: micro-batches (forward, backward), then unscale, clip, step.
"""
import math

import torch

from data_parallel import GradReducer, ZeroAdamW, adamw, clip_grad_norm
from mixed_precision import MasterAdamW, use_master_weights
from model import Yuan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(cfg, device):
    """Set cfg.dtype where it is "auto": bf16 on a GPU that computes in it natively (compute capability 8.0, Ampere,
    and later), fp16 on older ones (V100 is 7.0), as tools/plan.py gpu_dtype assumes; fp32 on the CPU. Asked of
    this rank's own device.
    Not torch.cuda.is_bf16_supported(): by default it counts emulation, so it says yes on a V100, where bf16 runs
    without tensor cores; and it asks the current device, whichever that is."""
    if cfg.dtype == "auto":
        if device.type == "cuda":
            cfg.dtype = "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
        else:
            cfg.dtype = "fp32"  # bf16 matmuls are slower than fp32 on most CPUs


def build(cfg, dist):
    """(model, optimizer, gradient reducer, parameters to clip). cfg.dtype must be resolved (resolve_dtype): in
    bf16/fp16 the model holds working weights in that dtype and the optimizer fp32 masters (mixed_precision.py).
    AdamW decays matrices and embeddings, not biases or LayerNorm gains. With --zero1 one object is both optimizer
    and reducer: its moments are sharded over dp and gradients are reduce-scattered during the last backward
    (data_parallel.py)."""
    if (dist.sequence_parallel, dist.overlap) != (cfg.sp, cfg.overlap):  # the layout is dist's: it must be cfg's
        raise ValueError(f"dist's sequence_parallel={dist.sequence_parallel}, overlap={dist.overlap} are not the "
                         f"run's ({cfg.sp}, {cfg.overlap}): start with init_distributed(..., cfg.sequence_parallel, "
                         f"cfg.overlap) or dataclasses.replace the Dist")
    torch.manual_seed(cfg.seed)  # the same on every rank: replicated dropout masks agree across a tp group
    dist.rng.seed(cfg.seed)
    model = Yuan(cfg.model, dist, recompute=cfg.recompute, seed=cfg.seed).to(dist.device)
    master = cfg.dtype in ("bf16", "fp16")
    if master:  # before the reducers: its gradient hook must run before theirs
        use_master_weights(model, DTYPES[cfg.dtype])
    # --compile: in place (parameter names, and so checkpoints, do not change), fixed shapes. The whole model where
    # dynamo takes its forward as one graph; elsewhere each block, because the collectives (tp > 1), the generator
    # state of recomputation and the main_grad updates (bf16/fp16) break the graph inside the loop over blocks
    # (docs/training.md).
    if cfg.compile and dist.tp == 1 and cfg.recompute == "none" and not master:
        model.compile(dynamic=False)
    elif cfg.compile:
        for block in model.blocks:
            block.compile(dynamic=False)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.zero1:
        opt = ZeroAdamW(groups, dist, cfg.bucket_mb, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        return model, opt, opt, opt.shards  # the optimizer is its own reducer; clipping sees its shards
    hyper = dict(lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    opt = MasterAdamW(groups, adamw, **hyper) if master else adamw(groups, **hyper)
    return model, opt, GradReducer(params, dist, cfg.bucket_mb), params


def train_step(model, opt, reducer, scaler, clip_params, grad_accum, cfg, dist, batch):
    """One optimizer step: forward and backward of the micro-batches batch(0), ..., batch(grad_accum - 1), gradient
    reduction (overlapped with the last backward), unscale and clip, AdamW. Returns (this rank's mean loss as a
    0-d tensor, the global gradient norm, whether the step was taken). No autocast: in bf16/fp16 the model's own
    parameters are in that dtype (master weights, mixed_precision.py)."""
    loss_sum = torch.zeros((), device=dist.device)
    for micro in range(grad_accum):
        x, y = batch(micro)
        loss = model(x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True))[1]  # no logits
        loss_sum += loss.detach()
        if micro == grad_accum - 1:
            reducer.start()  # gradients are final in this backward: reduce bucket by bucket as they complete
        (loss * (scaler.scale / grad_accum)).backward()
    reducer.finish()
    scaler.unscale(clip_params)  # fp16: the gradients back to their true size (nothing at scale 1)
    grad_norm = clip_grad_norm(clip_params, cfg.grad_clip, dist)  # over tp, and dp for ZeRO-1's shards
    finite = math.isfinite(grad_norm)  # the same on every rank: all skip an fp16 overflow together
    if finite:
        opt.step()
    scaler.update(finite)
    opt.zero_grad(set_to_none=True)
    return loss_sum / grad_accum, grad_norm, finite
