"""Mixed precision as Megatron-LM does it: bf16 (fp16 on V100) working weights, fp32 master weights, fp32 gradients.

This file holds all of it: the working and master weights (use_master_weights), the optimizer of the masters
(MasterAdamW; ZeroAdamW in data_parallel.py is its sharded form), fp16's loss scaling (LossScaler) and the
weight-gradient accumulation that parallel.ParallelMatmul calls (accumulate_wgrad). The model's parameters are
converted to the compute dtype once and the whole forward and backward run in it (no autocast).

What a parameter p carries, and who sets and reads it (the whole list, for mixed precision and parallelism):
    p.master                  fp32 weight the optimizer updates; after each step copied into p, the working copy,
                              rounded to bf16. Set by use_master_weights (ZeroAdamW: views of its flat buffers).
    p.main_grad               fp32: the gradients of all micro-batches of a step, summed. The tensor-parallel
                              matmuls add their weight gradient into it themselves (parallel.ParallelMatmul under
                              --overlap: Megatron's "gradient accumulation fusion", on CUDA one GEMM with an fp32
                              output and beta = 1); every other gradient is added by _into_main_grad, a hook that
                              runs as soon as autograd has produced it, and freed. Read through grad_of by the
                              reducers, clipping and the optimizers.
    p.grad_added_to_main_grad set by ParallelMatmul's backward, read and reset by _into_main_grad: p.grad is then a
                              placeholder, not a gradient
    p.fuse_wgrad              set by parallel.py's Column/RowParallelLinear on their weights: ParallelMatmul may add
                              into main_grad (not the tied embedding, whose gradient has two sources)
    p.tp_sharded, p.tp_dim    set by parallel._sharded: a slice of a tensor split over the tp group, along tp_dim
                              (clip_grad_norm sums its square over tp; run/checkpoint.py cuts and merges it)
    p.sequence_parallel       set by model.Yuan under sequence parallelism on replicated parameters: the gradient is
                              summed over tp (parallel.sync_sequence_parallel_grads)
    p.dp_sharded              set by data_parallel.ZeroAdamW on its shards: clip_grad_norm sums them over dp
Why: per matmul weight and micro-batch the weight-gradient GEMM reads and writes main_grad (8 bytes) where autocast
over fp32 weights moves ~26 (docs/training.md). Every update happens in fp32; checkpoints hold the fp32 masters under
the model's own names (fp32_state_dict), so they load into fp32 models (sample.py) too.
"""
import sys

import torch

_FUSED = {}  # (device type, tensor class) -> whether torch.addmm with an fp32 out_dtype ran there (absent: untried)
# What "this torch has no fused kernel here" looks like, and nothing else: every other error, a CUDA out-of-memory
# (torch.OutOfMemoryError, a RuntimeError) above all, is raised as it is and the next call tries the kernel again.
#   NotImplementedError  torch 2.13 on the CPU, for bf16, fp16 and fp32 inputs alike: "Could not run
#                        'aten::addmm.dtype_out' with arguments from the 'CPU' backend" (the overload has CUDA and
#                        XPU kernels only)
#   TypeError            a torch older than out_dtype: "addmm() received an invalid combination of arguments"
#   RuntimeError         one of these messages, from the dtype checks of the CUDA kernel (aten/src/ATen/native/
#                        cuda/Blas.cpp, _addmm_dtype_out_cuda): a combination of dtypes this build does not take
_FUSED_UNSUPPORTED = (
    "self and mat2 must have the same dtype",  # older builds: main_grad (fp32) must be in the inputs' dtype
    "out_dtype must be the same as input dtype or fp32",  # inputs other than bf16/fp16 with an fp32 output
    "self dtype must match either out_dtype or mat1 dtype",
)


def grad_of(p):
    """The gradient the reducers, clipping and the optimizer read: p.main_grad under master weights, else p.grad."""
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def accumulate_wgrad(main_grad, grad, x):
    """main_grad [out, in] (fp32) += grad[N, out]^T @ x[N, in] (bf16/fp16), the products summed in fp32. On CUDA
    one GEMM does it (torch.addmm with out_dtype=float32, beta = 1: nothing but main_grad is read or written besides
    the inputs). Where torch has no such kernel (the CPU; see _FUSED_UNSUPPORTED) the GEMM runs in the working dtype,
    summing in fp32 inside but rounding its output to bf16/fp16, which is then added into main_grad: Megatron-LM's
    arithmetic without gradient accumulation fusion. Said once per device type on stderr."""
    key = (main_grad.device.type, type(main_grad))
    if _FUSED.get(key, True):
        try:
            torch.addmm(main_grad, grad.t(), x, out_dtype=torch.float32, out=main_grad)
            _FUSED[key] = True
            return
        except (NotImplementedError, TypeError, RuntimeError) as e:
            if isinstance(e, torch.OutOfMemoryError) or not (
                    isinstance(e, (NotImplementedError, TypeError)) or any(m in str(e) for m in _FUSED_UNSUPPORTED)):
                raise
            said = any(k[0] == key[0] and not fused for k, fused in _FUSED.items())  # this device type, earlier
            _FUSED[key] = False
            if not said:
                why, dtype = str(e).splitlines()[0].split(". ")[0], str(x.dtype).removeprefix("torch.")
                print(f"warning: mixed_precision.accumulate_wgrad: torch {torch.__version__} has no fused "
                      f"weight-gradient GEMM on {key[0]} ({type(e).__name__}: {why}). Each weight gradient is now a "
                      f"{dtype} GEMM whose {dtype} output is then added into the fp32 main_grad: one more kernel and "
                      f"a temporary the size of the weight per matmul and micro-batch (12 bytes moved per weight "
                      f"element instead of 8), and each micro-batch's weight gradient rounded to {dtype} before it "
                      f"is summed. HINT: on a GPU, tests/test_cuda.py::test_fused_weight_gradient_accumulation "
                      f"says whether this torch has it.", file=sys.stderr, flush=True)
    main_grad.add_(grad.t() @ x)  # [out, in]: the GEMM in the working dtype, as autograd's own weight gradient


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
        if getattr(p, "_post_accumulate_grad_hooks", None):  # a reducer's hook would count p's gradient too early
            raise RuntimeError("use_master_weights after a gradient hook was registered: call it before the reducers")
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


# ------------------------------------------------------------------------------------------------------------------
# The optimizer of the master weights, and fp16's loss scaling


class MasterAdamW:
    """AdamW under master weights (mixed_precision.py): it updates each parameter's fp32 p.master from its fp32
    p.main_grad, then copies the masters into the bf16/fp16 working weights. Its state_dict is torch.optim.AdamW's,
    for the same parameters in the same order, so checkpoints do not depend on the precision."""

    def __init__(self, groups, make, **hyper):  # make: the optimizer of the masters (data_parallel.adamw)
        self.params = [p for g in groups for p in g["params"]]
        self.inner = make([{**g, "params": [p.master for p in g["params"]]} for g in groups], **hyper)

    @property
    def param_groups(self):  # the inner optimizer's, looked up each time: its load_state_dict replaces the list
        return self.inner.param_groups

    @property
    def defaults(self):  # the inner optimizer's hyperparameters (lr, betas, eps, weight_decay, fused, ...), as torch's
        return self.inner.defaults

    @property
    def state(self):
        """What torch's optimizer.state holds (exp_avg, exp_avg_sq, step), keyed by the working parameters a caller
        holds rather than by their masters. A new dict at each call; the per-parameter dicts in it are the inner
        optimizer's own, so changes to their tensors are seen by the next step."""
        return {p: self.inner.state[p.master] for p in self.params if p.master in self.inner.state}

    @torch.no_grad()
    def step(self):
        for p in self.params:
            p.master.grad = p.main_grad  # the same fp32 tensor: no copy
        self.inner.step()
        torch._foreach_copy_(self.params, [p.master for p in self.params])  # rounded to bf16 (no_grad: in place)

    def zero_grad(self, set_to_none=True):
        torch._foreach_zero_([p.main_grad for p in self.params])
        for p in self.params:
            p.master.grad = None

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd)


class LossScaler:
    """Dynamic loss scaling for fp16 (Micikevicius et al. 2018). The loss is multiplied by `scale` before backward
    so small gradients survive fp16; gradients are divided back before clipping. A step whose gradients hold inf
    or NaN is skipped and the scale halved; after `growth_interval` clean steps the scale doubles.
    With bf16 or fp32 the scale is 1 and only non-finite gradients are skipped."""

    def __init__(self, enabled, scale=2.0**16, growth_interval=1000):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.scale, self.good_steps = (scale if enabled else 1.0), 0

    def unscale(self, params):
        """Divide the gradients of params by the scale, in place (nothing to do at scale 1: bf16, fp32)."""
        if self.scale != 1.0:
            torch._foreach_mul_([grad_of(p) for p in params if grad_of(p) is not None], 1.0 / self.scale)

    def update(self, finite):
        if not self.enabled:
            return
        if not finite:
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale, self.good_steps = state["scale"], state["good_steps"]
