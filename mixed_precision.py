"""Mixed precision as Megatron-LM does it: bf16 (fp16 on V100) working weights, fp32 master weights, fp32 gradients.

The model's parameters are converted to the compute dtype once and the whole forward and backward run in it (no
autocast). Each parameter p carries two fp32 tensors:
    p.master     the weight the optimizer updates (data_parallel.MasterAdamW, or ZeroAdamW's flat buffers); after
                 each step it is copied into p, the working copy, rounded to bf16
    p.main_grad  where the gradients of all micro-batches of a step are summed, in fp32. The tensor-parallel
                 matmuls (parallel.ParallelMatmul, under --overlap) add their weight gradient into it themselves (Megatron's
                 "gradient accumulation fusion": on CUDA one GEMM with an fp32 output and beta = 1); every other
                 parameter's bf16 gradient is added by a hook as soon as autograd has produced it, and freed
What it saves, per matmul weight and micro-batch (bytes moved through memory; bench/roofline.py measures the step):
    autocast over fp32 weights: cast the weight (read 4, write 2), write its bf16 gradient (2), cast that to fp32
                                (read 2, write 4), add it into .grad (read 8, write 4)                     26 bytes
    this file:                  the weight-gradient GEMM reads and writes main_grad (4 + 4)                 8 bytes
and once per step the master weights are copied into the working ones (read 4, write 2).
Numerics: the residual stream, LayerNorm outputs and activations are bf16, as in Megatron-LM's default
(fp32_residual_connection off); LayerNorm, softmax and GELU compute in fp32 inside their kernels, the loss takes fp32
logits, and every update happens in fp32. Checkpoints hold the fp32 master weights under the model's own names
(fp32_state_dict), so they load into fp32 models (sample.py) and into older code alike.
"""
import torch

_FUSED = {}  # (device type, tensor class) -> whether this torch has addmm with an fp32 out_dtype there


def grad_of(p):
    """The gradient the reducers, clipping and the optimizer read: p.main_grad under master weights, else p.grad."""
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def accumulate_wgrad(main_grad, grad, x):
    """main_grad [out, in] (fp32) += grad[N, out]^T @ x[N, in] (bf16/fp16), the products summed in fp32. On CUDA
    one GEMM does it (torch.addmm with out_dtype=float32, beta = 1: nothing but main_grad is read or written besides
    the inputs); where torch has no such kernel (the CPU) the same arithmetic runs unfused."""
    key = (main_grad.device.type, type(main_grad))
    if _FUSED.get(key, True):
        try:
            torch.addmm(main_grad, grad.t(), x, out_dtype=torch.float32, out=main_grad)
            _FUSED[key] = True
            return
        except (NotImplementedError, RuntimeError, TypeError):
            _FUSED[key] = False
    main_grad.addmm_(grad.t().float(), x.float())


def _into_main_grad(p):
    """Post-accumulate hook: move p's low-precision gradient into p.main_grad (unless the matmul already added it
    there: then p.grad is only a placeholder) and free it."""
    if getattr(p, "grad_added_to_main_grad", False):
        p.grad_added_to_main_grad = False
    else:
        p.main_grad.add_(p.grad)
    p.grad = None


@torch.no_grad()
def use_master_weights(model, dtype):
    """Turn model's parameters into dtype working weights with fp32 p.master and p.main_grad (see the docstring).
    Call before the gradient reducers register their hooks: this hook must run first."""
    for p in model.parameters():
        p.master = p.detach().float().clone()
        p.main_grad = torch.zeros_like(p.master)
        p.data = p.data.to(dtype)
        p.register_post_accumulate_grad_hook(_into_main_grad)


def fp32_state_dict(model):
    """model.state_dict() with each parameter's fp32 master in place of its working copy."""
    sd = model.state_dict()
    for name, p in model.named_parameters():
        if hasattr(p, "master"):
            sd[name] = p.master
    return sd


@torch.no_grad()
def load_fp32_state_dict(model, sd):
    """Load fp32 weights (any checkpoint) into the working copies, rounded, and into the masters, exactly."""
    model.load_state_dict(sd)
    for name, p in model.named_parameters():
        if hasattr(p, "master"):
            p.master.copy_(sd[name])
