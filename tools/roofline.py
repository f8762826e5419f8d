"""The training step's cost on a named GPU, derived from the code itself: no GPU needed (issue 10).

    python tools/roofline.py --preset yuan-4.7b --gpu H200 [--tp 8] [--dp 1] [--gpus 8] [--accum N] [--json [FILE]]
                             [any Config field, e.g. --micro_batch 2 --recompute full --zero1 true --compile true]
    python tools/roofline.py --preset small --n_layer 4 --seq_len 256 --micro_batch 4 --dtype fp32 --accum 2 \
                             --gpu cpu --measure true      (validation: this CPU's own speeds, then the real step)

How: one real step.build + step.train_step runs under FakeTensorMode (CPU fake tensors: shapes and
dtypes only, nothing allocated, so yuan-4.7b takes seconds). A TorchDispatchMode records every aten op: FLOPs
(torch.utils.flop_counter's formulas; attention by hand, below), bytes read and written, and every collective of a
fake process group that lets this one process stand for rank 0 of tp x dp. Each op is then priced on the GPU of
the table GPUS with a roofline: matmul and attention max(FLOPs / (peak x fraction), bytes / (HBM x fraction)),
every other op bytes / (HBM x fraction), collectives with ring formulas over NVLink (tp, and dp inside a node) or
InfiniBand (dp across nodes; GPUS_PER_NODE = 8). A matmul's rate also loses what tile and wave quantization waste
on the GPU's SMs and what a small GEMM pays to start and finish (gemm_efficiency, GEMM_FIXED_S), and no kernel
takes less than the host's time to launch it (LAUNCH_S); the terms and their sources are beside GPUS.
bench/anchors.py holds the projection against published measurements.

Conventions, stated once:
  * eager: no kernel fusion, every aten op is one kernel reading its inputs and writing its outputs from HBM. A view
    moves no bytes; an in-place op reads and writes its target; copy_ reads only its source; embedding and index
    read only the rows they return. With --compile true: consecutive non-matmul ops of forward and backward are one
    kernel, which reads what enters it from outside the run and writes its last op's output and the outputs no op
    of the run consumed (intermediates saved for backward that a later op of the run also reads are missed).
    Applied to the whole micro-batch: where step.build compiles each block only (bf16, tp > 1, recomputation) the
    embedding, final LayerNorm and loss are priced fused too, and a matmul ends a fused run as a graph break does.
  * attention FLOPs: forward 4 B h T^2 hd (QK^T and PV), backward twice that; causal masking is not discounted, so
    forward + backward = 12 L h T per token, as model.flops_per_token counts. Recomputation is counted as run.
  * exposed communication: tp collectives in forward are exposed; an asynchronous one in backward (the column-
    parallel input gradient) is hidden up to the time of the next matmul (its weight-gradient GEMM); the
    data-parallel bucket reduction during the last backward is exposed for max(its last bucket, all buckets -
    that backward's compute); everything after backward (ZeRO-1 all-gather, norms) is exposed.
  * micro-batches per step: --accum, else batch_tokens / (micro_batch x seq_len x dp). At most 3 are priced
    (first, middle, last: the middle one stands for every other) plus the once-per-step work. In fp32 all three are
    recorded; under master weights only the last, and the others are it without the data-parallel collectives
    (alike(): the same ops, tests/test_roofline.py), which makes a yuan-4.7b projection 2-3 s instead of 7-8.
  * categories: matmul (a weight-gradient GEMM that adds into main_grad too: the add is its epilogue), attention,
    elementwise (with norms, copies, embedding, loss), cast (a copy that changes dtype), grad_accum (an add into a
    parameter's .grad or .main_grad during backward), optimizer (everything in clipping and opt.step), communication
    (the exposed part). An unrecorded AdamW step on zero gradients runs first (warm_up), so that AdamW's moments
    exist as in every later step.
  * the op stream is the CPU's: SDPA takes its flash kernel only without dropout (with dropout > 0 it takes the
    math path, T x T scores, which a GPU would not); the fake process group answers "nccl" to get_backend, so the
    trainer takes its NCCL code path (reduce-scatter, all-gather into one tensor).
  * .item() (clip_grad_norm's norm, LossScaler's isfinite) has no value under fake tensors: the recorder answers 1.0,
    a finite norm, so the optimizer step is taken and recorded. Nothing in the trainer is patched for that.
"""
import gc
import inspect
import json
import math
import os
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

import step  # noqa: E402
from distributed import Dist  # noqa: E402
from mixed_precision import LossScaler  # noqa: E402
from model import Yuan, flops_per_token  # noqa: E402
from run.config import FIELD_TYPES, make_config, parse_bool, parse_field  # noqa: E402
from runtime.accelerators import GPUS_PER_NODE, accelerator  # noqa: E402
from runtime.errors import UserError  # noqa: E402

T, G = 1e12, 1e9
# Fixed before any projection was made; not tuned afterwards. The datasheet figures (peak TFLOP/s per dtype, HBM,
# NVLink and InfiniBand GB/s, SMs) are runtime/accelerators.py's, the table train.py's MFU uses too; fp32 peaks are
# the CUDA-core rate (torch does not use TF32 for matmuls unless asked). mm, attn: the fractions achieved (below).
ACHIEVED = {
    "H100": dict(fa2="H100", mm=0.75, attn=0.35),
    "H200": dict(fa2="H100", mm=0.75, attn=0.35),
    "A100-40GB": dict(fa2="A100", mm=0.80, attn=0.60),
    "A100-80GB": dict(fa2="A100", mm=0.80, attn=0.60),
    "V100-32GB": dict(mm=0.75, attn=0.30),
}
GPUS = {name: {**accelerator(name), **achieved} for name, achieved in ACHIEVED.items()}
# Achieved fractions. mm: cuBLAS on large bf16 GEMMs reaches ~70-80% of peak on H100 (NVIDIA's published GEMM
# results, ~700-750 TFLOP/s), ~80% on A100 (~250 TFLOP/s), ~75% on V100 (~95 TFLOP/s fp16). attn (used only where
# FA2 below has no figure: fp32, V100; kept for the record): FlashAttention-2
# reaches 50-73% of peak forward, lower backward, on A100 (Dao 2023, section 4): 0.60; on H100 only ~35% (Shah et
# al. 2024, FlashAttention-3, section 1), which torch's SDPA (FA2 kernels) inherits: 0.35; V100 has no FA2, SDPA
# falls back to the memory-efficient kernel: 0.30 is an assumption, no published figure at hand.
# mem: STREAM-like copy kernels reach ~85-90% of HBM bandwidth (e.g. BabelStream on A100/H100): 0.85.
# net: nccl-tests all-reduce bus bandwidth ~360-370 GB/s on H100 NVLink (of 450) and ~230-240 GB/s on A100 (of
# 300); ~80% of line rate over InfiniBand: 0.80 for both.
FRACTIONS = dict(mem=0.85, net=0.80)
# Terms added for issue 20, each fixed from its source before any anchor was compared again:
# * sms (above): streaming multiprocessors, from the datasheets (H100/H200 SXM 132, A100 108, V100 80). A GEMM is
#   cut into output tiles, one per SM at a time; the last wave of tiles can leave SMs idle and a tile that sticks
#   out of the matrix computes padding (NVIDIA, "Matrix Multiplication Background User's Guide", DU-09799-001,
#   ch. 3 "Tile Quantization" and "Wave Quantization"; typical cuBLAS tiles 256x128, 128x256, 128x128, sec. 2.3).
#   gemm_efficiency() prices the best of those three tiles, and splits K over idle SMs when the tiles do not fill
#   one wave (split-K, as cuBLAS and CUTLASS do for small outputs with a long K). The fraction "mm" stays the
#   large-GEMM figure; this term only takes away what quantization wastes.
# * GEMM_K0, GEMM_FIXED_S: what a small GEMM loses beyond quantization. Each tile's pass over its share of K pays a
#   fixed start and finish (filling the pipeline, writing the tile), as if K were GEMM_K0 longer, and each GEMM
#   kernel a fixed GEMM_FIXED_S (ramp-up, the last tiles' tail). Both are the least-squares fit (bench/gemm_fit.py)
#   to OpenXLA's measured bf16 matmul throughput on H100 80GB HBM3 (matmul_interpolator_data.h, 375 shapes with b
#   1-4 and m, n, k 256-4096; tests/data/xla_sm90_matmul.csv), with the rate of a large GEMM held at mm x peak:
#   K0 = 80, 5.0 us; the table's RMS error falls from a factor of 2.37 to 1.14. Measured on H100 only; applied to
#   every GPU with SMs (on A100 it brings EleutherAI's measured MLP forward at hidden 768, 154 TFLOP/s, from
#   195 to 181 priced: bench/RESULTS.md).
# * LAUNCH_S: the host's time to issue one kernel from eager PyTorch: 280,000 tiny ops per second, i.e. 3.6 us per
#   op (H. He, "Making Deep Learning Go Brrrr From First Principles", 2022). A kernel shorter than that leaves the
#   GPU waiting for the next one: every kernel (an aten op in eager mode, a fused run with --compile) takes at
#   least LAUNCH_S. Measured on this machine for --gpu cpu (measure_cpu).
# * FA2: the attention kernel's published speed by head dimension, causality and sequence length, in place of one
#   fraction "attn" on the GPUs measured there: FlashAttention-2 forward + backward TFLOP/s, A100 80GB SXM4 and
#   H100 80GB SXM5 (Dao-AILab/flash-attention, assets/flash2_a100_fwd_bwd_benchmark.png and
#   flash2_h100_fwd_bwd_benchmark.png, commit 4f285b3, the FlashAttention-2 paper's figures; 16k tokens per batch,
#   hidden 2048, fp16). Those figures count 4 T^2 hd FLOPs per head forward, halved when causal, and backward as
#   2.5 x forward; attention_seconds() converts. torch's SDPA runs these FA2 kernels on A100 and H100; H200 has
#   H100's SMs and clocks. Between the published points: linear in log2(T) and in the head dimension, clamped.
FA2_SEQ = (512, 1024, 2048, 4096, 8192, 16384)
FA2 = {"A100": {(64, False): (132, 153, 162, 171, 175, 176), (128, False): (151, 173, 187, 196, 201, 203),
                (64, True): (88, 119, 140, 156, 165, 171), (128, True): (99, 133, 155, 173, 182, 189)},
       "H100": {(64, False): (215, 254, 274, 288, 294, 296), (128, False): (248, 294, 320, 326, 335, 338),
                (64, True): (141, 192, 232, 257, 273, 284), (128, True): (163, 221, 265, 294, 308, 328)}}
# PESSIMISM: not a term of the model but its stated error bar, set after the comparison: the largest ratio of our
# projection to a published measurement among bench/anchors.py's anchors (bench/RESULTS.md, issue 20). tools/plan.py
# and bench/layouts.py print the projection divided by it as the pessimistic end of their range.
PESSIMISM = 1.66  # nanoGPT 124M on 8 x A100 (issue #110): projected 0.339 s, measured 0.562 s
TILES = ((256, 128), (128, 256), (128, 128))
SPLIT_K_MIN = 512  # split-K gives each slice at least this much of K (a slice must still stream its operands)
GEMM_K0, GEMM_FIXED_S = 80, 5e-6
LAUNCH_S = 1 / 280_000

aten = torch.ops.aten
PRIM_DEVICE = torch.ops.prim.device.default
# in-place forms (main_grad.addmm_) priced with their out-of-place formula
MATMUL = {aten.mm: aten.mm, aten.addmm: aten.addmm, aten.bmm: aten.bmm, aten.baddbmm: aten.baddbmm,
          aten.addmm_: aten.addmm, aten.baddbmm_: aten.baddbmm}
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: 4,  # forward: 4 B h T S hd
             aten._scaled_dot_product_flash_attention_for_cpu_backward: 8,  # backward: twice the forward
             aten._scaled_dot_product_flash_attention: 4, aten._scaled_dot_product_flash_attention_backward: 8,
             aten._scaled_dot_product_efficient_attention: 4, aten._scaled_dot_product_efficient_attention_backward: 8}
FREE = {aten._unsafe_view, aten.detach, aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
        aten.new_empty_strided, aten.lift_fresh, aten.alias}  # views and allocations: no bytes move
GATHER = {aten.embedding, aten.index}  # read only the rows they return (and their indices)
# copy_ overwrites its first argument without reading it; the others only write (their inputs are shapes or values)
WRITE_ONLY = {aten.copy_: 1, **{op: 99 for op in (aten.zero_, aten.fill_, aten.zeros, aten.zeros_like, aten.ones,
                                                   aten.ones_like, aten.full, aten.full_like, aten.arange)}}
CATEGORIES = ("matmul", "attention", "elementwise", "cast", "grad_accum", "optimizer", "communication")


def nbytes(t):
    return t.numel() * t.element_size()


def tensors(tree):
    """The tensors in nested lists, tuples and dicts (pytree cannot walk c10d's opaque ReduceOp objects)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    return [t for item in tree for t in tensors(item)] if isinstance(tree, (list, tuple)) else []


class Recorder(TorchDispatchMode):
    """Every aten op of the step: {name, shapes, category, flops, bytes, phase, backward, ...}. phase is the
    micro-batch index or "step" (once per step: the reducer's finish, clipping, AdamW, zero_grad)."""

    def __init__(self, params, group, keep_tensors=False, fake=None):
        super().__init__()
        self.group, self.keep, self.fake = group, keep_tensors, fake
        self.watch(params)
        self.ops, self.phase, self.backward, self.optimizer = [], None, False, False

    def watch(self, params):
        """The parameters whose gradients (.grad, main_grad) an add or a weight-gradient GEMM may accumulate into."""
        self.by_shape = defaultdict(list)  # a gradient has its parameter's shape: is_grad() looks among those only
        for p in params:
            self.by_shape[p.shape].append(p)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is PRIM_DEVICE:  # asked of every fake tensor by every op: answered here, the shortest way
            return getattr(args[0], "fake_device", None) or func(*args)
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:  # .item(): a fake tensor has no value; see the docstring
            return 1.0 if args[0].dtype.is_floating_point else 1
        if self.fake and any(isinstance(a, list) and len(a) > 8 for a in args):
            # FakeTensorMode's cache key hashes every tensor of a list: for the optimizer's multi-tensor kernels,
            # over hundreds of parameters, that costs more than running the op uncached
            self.fake.cache_enabled = False
            try:
                out = func(*args, **kwargs)
            finally:
                self.fake.cache_enabled = True
        else:
            out = func(*args, **kwargs)
        if self.phase is not None and func.namespace in ("aten", "c10d"):  # not prim, profiler
            self.record(func, args, kwargs, out)
        return out

    def record(self, func, args, kwargs, out):
        packet, op = func._overloadpacket, dict(name=str(func._overloadpacket).removeprefix("aten."),
                                                phase=self.phase, backward=self.backward, flops=0)
        if func.is_view or packet in FREE:
            return
        ins = tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        outs = tensors(out) if "out" not in kwargs else tensors(kwargs["out"])
        op["shapes"] = str([list(t.shape) for t in ins])
        if func.namespace == "c10d":
            return self.collective(func, args, kwargs, op)
        if packet in WRITE_ONLY:
            ins = ins[WRITE_ONLY[packet]:]
        if packet in GATHER:
            ins = [t for t in ins if not t.is_floating_point()] + outs
        op["bytes"] = sum(map(nbytes, ins)) + sum(map(nbytes, outs))
        op["dtype"] = ins[0].dtype if ins else outs[0].dtype
        if packet in MATMUL:
            # the formulas take the operands' shapes; out= and out_dtype= (fp32 accumulation into main_grad) aside
            operands = [a for a in args if isinstance(a, torch.Tensor)]
            op["cat"], op["flops"] = "matmul", flop_registry[MATMUL[packet]](*operands, out_val=outs[0])
            a, b = operands[-2:]  # [(batch,) M, K] @ [(batch,) K, N]
            op["mnk"] = (a.shape[0] if a.dim() == 3 else 1, a.size(-2), b.size(-1), a.size(-1))
            op["dtype"] = operands[-1].dtype  # the operands' precision sets the rate, not an fp32 accumulator's
            if self.backward and self.is_grad(outs[0]):  # a weight-gradient GEMM adding into main_grad
                op["accumulates"] = outs[0].numel()
        elif packet in ATTENTION:
            q, k = args[1:3] if ATTENTION[packet] == 8 else args[0:2]  # [B, h, T, hd]; backward begins with dout
            B, h, T_q, hd = q.shape
            op["cat"], op["flops"] = "attention", ATTENTION[packet] * B * h * T_q * k.size(2) * hd
            names = [a.name for a in func._schema.arguments]
            causal = args[names.index("is_causal")] if len(args) > names.index("is_causal") else \
                kwargs.get("is_causal", False)
            op["attn"] = (hd, k.size(2), bool(causal))  # head dimension, keys per query, causal
        elif self.optimizer:
            op["cat"] = "optimizer"
        elif packet in (aten._to_copy, aten.copy_) and ins and outs and ins[-1].dtype != outs[0].dtype:
            op["cat"] = "cast"
        elif packet in (aten.add, aten.add_) and self.backward and self.is_grad(args[0]):
            op["cat"], op["accumulates"] = "grad_accum", args[0].numel()  # `grad += new` or `main_grad += new`
        else:
            op["cat"] = "elementwise"
        if self.keep:
            op["ins"], op["outs"] = ins, outs
        self.ops.append(op)

    def is_grad(self, t):
        """Whether t is a parameter's gradient accumulator: its .grad, or its main_grad under master weights."""
        return isinstance(t, torch.Tensor) and any(t is g for p in self.by_shape.get(t.shape, ())
                                                   for g in (p.grad, getattr(p, "main_grad", None)))

    def collective(self, func, args, kwargs, op):
        """c10d ops pass through the dispatch mode: all-reduce, all-gather, reduce-scatter (list or flat forms)."""
        kind = func._overloadpacket._qualified_op_name.split("::")[1]
        # set by fake_layout's wrappers of the torch.distributed calls; a call they miss counts as the whole world
        group, n = self.group.pop("group", ("world", tdist.get_world_size()))
        payload = sum(map(nbytes, tensors(args[0])))  # outputs of gathers, inputs of reduce-scatters
        if "reduce_scatter" in kind:
            payload = sum(map(nbytes, tensors(args[1])))
        i = [a.name for a in func._schema.arguments].index("async_op")
        async_op = args[i] if len(args) > i else kwargs.get("async_op", True)
        factor = 2 * (n - 1) / n if kind.startswith("allreduce") else (n - 1) / n
        op.update(cat="communication", name=kind, bytes=payload, ring_bytes=factor * payload, ranks=n,
                  group=group, async_op=bool(async_op), dtype=None)
        self.ops.append(op)


# ------------------------------------------------------------------------------------------------------------------
# Running one step under fake tensors


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "all_gather_single", "reduce_scatter_single", "broadcast", "all_to_all_single")


@contextmanager
def fake_layout(tp, dp, sequence_parallel=False, overlap=True):
    """(Dist of rank 0 of tp x dp, {}) whose groups are a fake process group: collectives move nothing but are seen.
    The c10d ops reach the dispatch mode with an opaque group, so the torch.distributed calls are wrapped to say
    which group (tp, dp) each one uses: the second item, updated as they run."""
    current = {}
    if tp * dp == 1:
        yield Dist(overlap=overlap), current
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if tdist.is_initialized():
        raise UserError("tools/roofline.py sets up its own fake process group: call project() in a process that has "
                        "not initialised torch.distributed (train.py --plan does so before any).")
    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * dp)
    tp_group, dp_group = tdist.new_group(list(range(tp))), tdist.new_group(list(range(0, tp * dp, tp)))
    names = {id(tp_group): ("tp", tp), id(dp_group): ("dp", dp)}

    def which_group(fn):
        signature = inspect.signature(fn)

        def call(*args, **kwargs):
            group = signature.bind(*args, **kwargs).arguments.get("group")
            current["group"] = names.get(id(group), ("world", tp * dp))
            return fn(*args, **kwargs)
        return call
    with ExitStack() as stack:
        for name in (c for c in COLLECTIVES if hasattr(tdist, c)):
            stack.enter_context(patched(tdist, name, which_group))
        # The trainer picks its NCCL code path (reduce-scatter, all-gather into one tensor) by the backend's name;
        # the fake group stands for NCCL, so it answers "nccl".
        stack.enter_context(patched(tdist, "get_backend", lambda old: lambda group=None: "nccl"))
        try:
            yield (Dist(world=tp * dp, tp=tp, sequence_parallel=sequence_parallel, overlap=overlap,
                        tp_group=tp_group if tp > 1 else None, dp=dp,
                        dp_group=dp_group if dp > 1 else None), current)
        finally:
            tdist.destroy_process_group()


@contextmanager
def paused_gc():
    """Python's cyclic garbage collector off while a step is recorded: the recording makes some hundred thousand
    short-lived objects (fake tensors, autograd nodes) that it would otherwise walk again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def patched(obj, name, wrap):
    old = getattr(obj, name)
    setattr(obj, name, wrap(old))
    try:
        yield
    finally:
        setattr(obj, name, old)


def warm_up(opt):
    """One AdamW step on zero gradients, so that its moments exist, as in every step after the first, without a
    forward and backward (nothing the step depends on is made in those: tests/test_roofline.py). Under master weights
    and ZeRO-1, the AdamW inside (.inner) alone: what it updates is copied on to the weights later, by every step."""
    adamw = getattr(opt, "inner", opt)
    for group in adamw.param_groups:  # the parameters it updates: ZeRO-1's shards, the fp32 masters, or the weights
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    adamw.step()
    adamw.zero_grad(set_to_none=True)


def record_step(cfg, tp, dp, micro_batches, keep_tensors=False, full_warm_up=False):
    """Build the model and run one step.train_step of `micro_batches` under fake tensors; returns the Recorder.
    Before it, unrecorded: warm_up, or with full_warm_up a whole step of one micro-batch (what warm_up stands for)."""
    cfg = replace(cfg)  # a copy: the caller's stays as it was
    cfg.compile = False  # dynamo does not trace fake tensors; --compile is priced by the fusion rule instead
    with fake_layout(tp, dp, cfg.sequence_parallel, cfg.overlap) as (dist, group), FakeTensorMode() as fake, \
            paused_gc():
        rec = Recorder([], group, keep_tensors, fake if fake.cache_enabled else None)  # phase None: records nothing
        # Module.to(cpu) would swap each fake parameter for itself, which torch refuses (it holds weak references
        # to them); every fake tensor already is on the CPU, so .to is skipped while building. A fake tensor holds no
        # values either: the weights' initialisation (model.Yuan.init_weights, no op of the step) is skipped too.
        with patched(torch.nn.Module, "to", lambda old: lambda self, *a, **k: self), rec, \
                patched(Yuan, "init_weights", lambda old: lambda self, seed: None):
            model, opt, reducer, clip_params = step.build(cfg, dist)
        rec.watch(list(model.parameters()))
        step.resolve_dtype(cfg, dist.device)
        scaler = LossScaler(enabled=cfg.dtype == "fp16")
        ids = torch.zeros(cfg.micro_batch, cfg.seq_len + 1, dtype=torch.long)
        with rec:  # one step unrecorded (phase None) first, so that AdamW's moments exist, as in every later step
            if full_warm_up:
                step.train_step(model, opt, reducer, scaler, clip_params, 1, cfg, dist,
                                 lambda micro: (ids[:, :-1], ids[:, 1:]))
            else:
                warm_up(opt)

        def batch(micro):  # train_step asks for micro-batch i just before its forward: a new phase begins
            rec.phase = micro
            return ids[:, :-1], ids[:, 1:]

        def during(**flags):  # wrap a call so that the recorder's flags hold while it runs
            def wrap(old):
                def call(*a, **k):
                    saved = {key: getattr(rec, key) for key in flags}
                    rec.__dict__.update(flags)
                    try:
                        return old(*a, **k)
                    finally:
                        rec.__dict__.update(saved)
                return call
            return wrap

        def then_step(old):  # reducer.finish() ends the micro-batches: all that follows happens once per step
            return lambda *a, **k: (rec.__dict__.update(phase="step"), old(*a, **k))[1]

        with ExitStack() as stack:
            stack.enter_context(patched(torch.Tensor, "backward", during(backward=True)))
            stack.enter_context(patched(reducer, "finish", then_step))
            stack.enter_context(patched(scaler, "unscale", during(optimizer=True)))
            stack.enter_context(patched(step, "clip_grad_norm", during(optimizer=True)))
            stack.enter_context(patched(opt, "step", during(optimizer=True)))
            stack.enter_context(rec)
            step.train_step(model, opt, reducer, scaler, clip_params, micro_batches, cfg, dist, batch)
    return rec


# ------------------------------------------------------------------------------------------------------------------
# Pricing


def fuse(ops):
    """--compile: each run of consecutive non-matmul ops (inside one phase and direction) is one kernel. It reads
    the tensors that enter the run from outside and writes the last op's outputs plus any output no op of the run
    reads again."""
    fused, run = [], []

    def close():
        if not run:
            return
        made, entering, last_read = set(), {}, {}
        for i, op in enumerate(run):
            entering.update({id(t): t for t in op["ins"] if id(t) not in made})
            last_read.update({id(t): i for t in op["ins"]})
            made.update(id(t) for t in op["outs"])
        leaving = {id(t): t for i, op in enumerate(run) for t in op["outs"]
                   if last_read.get(id(t), -1) <= i or i == len(run) - 1}
        fused.append({**run[0], "name": "fused(" + "+".join(dict.fromkeys(op["name"] for op in run)) + ")",
                      "bytes": sum(map(nbytes, entering.values())) + sum(map(nbytes, leaving.values()))})
        run.clear()
    for op in ops:
        if op["cat"] in ("elementwise", "cast") and isinstance(op["phase"], int):
            if run and (run[-1]["phase"], run[-1]["backward"]) != (op["phase"], op["backward"]):
                close()
            run.append(op)
        else:
            close()
            fused.append(op)
    close()
    return fused


def gemm_efficiency(batch, m, n, k, sms, k0=GEMM_K0):
    """The share of a GEMM's tile work that is useful, for the best of TILES: output tiles of tm x tn (padding
    computed where a tile sticks out), K split over idle SMs when the tiles do not fill one wave, and the tiles
    run in waves of `sms` (the last wave may leave SMs idle); each tile's slice of K pays k0 more (GEMM_K0).
    With k0 = 0: 1 for a GEMM whose tiles fill every wave exactly."""
    best = 0.0
    for tm, tn in TILES:
        tiles = batch * -(-m // tm) * -(-n // tn)
        split = max(1, min(sms // tiles, k // SPLIT_K_MIN)) if tiles < sms else 1
        waves = -(-tiles * split // sms)
        useful = batch * m * n / (tiles * tm * tn) * tiles * split / (waves * sms)
        best = max(best, useful * (k / split) / (k / split + k0))
    return best


def attention_seconds(flops, hd, seq, causal, table):
    """Seconds of an attention op of `flops` (as recorded: 4 B h T S hd forward, twice that backward, causal or
    not) at FlashAttention-2's published speed for this head dimension and sequence length (FA2)."""
    def at(head):  # TFLOP/s at this head dimension, linear in log2(seq) between the published lengths
        row, x = table[(head, causal)], min(max(math.log2(seq), 9), 14) - 9
        i = min(int(x), len(FA2_SEQ) - 2)
        return row[i] + (row[i + 1] - row[i]) * (x - i)
    h = min(max(hd, 64), 128)
    rate = at(64) + (at(128) - at(64)) * (h - 64) / 64
    # the figures' FLOPs: forward + backward = 3.5 x forward, halved when causal; ours: 3 x forward, never halved
    return flops * 3.5 / 3 * (0.5 if causal else 1.0) / (rate * T)


def price(ops, gpu, tp, dp):
    """Seconds of each op on `gpu` (op["s"]), then the exposed part of each collective (op["exposed"])."""
    mem = gpu["hbm"] * G * gpu.get("mem", FRACTIONS["mem"])
    launch = gpu.get("launch_s", LAUNCH_S)
    for op in ops:
        if op["cat"] == "communication":
            across_nodes = op["group"] != "tp" and tp * dp > GPUS_PER_NODE
            op["s"] = op["ring_bytes"] / ((gpu["ib"] if across_nodes else gpu["nvlink"]) * G * FRACTIONS["net"])
            continue
        op["s"] = op["bytes"] / mem
        if op["flops"]:
            key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(op["dtype"], "fp32")
            rate = gpu[key] * T * gpu["mm" if op["cat"] == "matmul" else "attn"]
            fixed = 0.0
            if op["cat"] == "matmul" and "sms" in gpu:
                rate, fixed = rate * gemm_efficiency(*op["mnk"], gpu["sms"]), GEMM_FIXED_S
            if op["cat"] == "attention" and gpu.get("fa2") and key != "fp32":  # a FA2 key, or a table of its form
                table = gpu["fa2"] if isinstance(gpu["fa2"], dict) else FA2[gpu["fa2"]]
                op["s"] = max(op["s"], attention_seconds(op["flops"], *op["attn"], table))
            else:
                op["s"] = max(op["s"], op["flops"] / rate) + fixed
        op["s"] = max(op["s"], launch)  # no kernel is shorter than the host's time to issue it
    for i, op in enumerate(ops):
        if op["cat"] != "communication":
            continue
        op["exposed"] = op["s"]
        if op["backward"] and op["async_op"] and op["group"] == "tp":  # hidden behind the weight-gradient GEMM
            nxt = next((o for o in ops[i + 1:] if o["cat"] == "matmul"), None)
            op["exposed"] = max(0.0, op["s"] - (nxt["s"] if nxt else 0.0))
    for phase in {op["phase"] for op in ops}:  # the data-parallel buckets overlap the last backward
        bwd = [op for op in ops if op["phase"] == phase and op["backward"]]
        dp_ops = [op for op in bwd if op["cat"] == "communication" and op["group"] == "dp"]
        if dp_ops:
            compute = sum(op["s"] for op in bwd if op["cat"] != "communication")
            exposed = max(dp_ops[-1]["s"], sum(op["s"] for op in dp_ops) - compute)
            for op in dp_ops:
                op["exposed"] = exposed * op["s"] / sum(o["s"] for o in dp_ops)
    return ops


def gpu_key(name):
    """The GPUS entry for a GPU's name ("H100", "NVIDIA A100-SXM4-80GB", plain "A100" = the 80 GB one), or None."""
    name = name.upper()
    exact, family = [k for k in GPUS if k.upper() in name], [k for k in GPUS if k.split("-")[0] in name]
    return (exact or family[-1:] or [None])[0]


def alike(ops, micro_batches):
    """The ops of a step of `micro_batches` from a recording of one (the last, phase 0) and the once-per-step work:
    every earlier micro-batch runs the last one's ops but the data-parallel collectives. So it is under master
    weights, where every micro-batch adds into the same main_grad (in fp32 the first one assigns .grad instead):
    tests/test_roofline.py holds it against a recording of each."""
    last = [op for op in ops if op["phase"] == 0]
    earlier = [op for op in last if not (op["cat"] == "communication" and op["group"] == "dp")]
    return ([{**op, "phase": i} for i in range(micro_batches - 1) for op in earlier] +
            [{**op, "phase": micro_batches - 1} for op in last] + [op for op in ops if op["phase"] != 0])


def project(preset, overrides=None, gpu="H100", tp=1, dp=1, accum=None, ops_out=None, record_each=False,
            full_warm_up=False):
    """The projected step of `preset` with Config `overrides` on tp x dp GPUs of kind `gpu` (a GPUS key, or a dict
    of the same fields, e.g. measure_cpu()'s). Returns a dict (see the keys below); tools/plan.py imports this.
    Under master weights (bf16, fp16) one micro-batch is recorded and the others derived from it (alike), unless
    record_each: a third of the time. full_warm_up: see record_step (tests/test_roofline.py compares them)."""
    overrides = dict(overrides or {})
    spec = gpu if isinstance(gpu, dict) else GPUS.get(gpu)
    if spec is None:
        raise UserError(f"unknown GPU {gpu!r}. Known: {', '.join(GPUS)}, cpu (this machine, measured).")
    overrides["tp"] = tp
    if overrides.get("dtype", "auto") == "auto":
        overrides["dtype"] = next(k for k in ("bf16", "fp16", "fp32") if k in spec)
    cfg = make_config(preset, **overrides)
    if cfg.dtype not in spec:
        have = [k for k in ("bf16", "fp16", "fp32") if k in spec]
        raise UserError(f"{gpu} has no {cfg.dtype} peak in the table.\nHINT: --dtype {' or '.join(have)}.")
    tokens_micro = cfg.micro_batch * cfg.seq_len * dp
    if accum is None:
        if cfg.batch_tokens % tokens_micro:
            raise UserError(f"batch_tokens = {cfg.batch_tokens:,} is not a multiple of micro_batch * seq_len * dp = "
                            f"{tokens_micro:,}.\nHINT: pass --batch_tokens a multiple of it, or --accum N.")
        accum = cfg.batch_tokens // tokens_micro
    if accum < 1:
        raise UserError(f"--accum {accum} must be at least 1.")
    recorded = min(accum, 3)
    t0 = time.perf_counter()
    derived = recorded > 1 and cfg.dtype in ("bf16", "fp16") and not record_each
    rec = record_step(cfg, tp, dp, 1 if derived else recorded, keep_tensors=cfg.compile, full_warm_up=full_warm_up)
    ops = alike(rec.ops, recorded) if derived else rec.ops
    ops = price(fuse(ops) if cfg.compile else ops, spec, tp, dp)
    # how many times each recorded phase happens in a step: first, middle (stands for accum - 2), last, once
    weight = {0: 1, "step": 1, recorded - 1: 1}
    if recorded == 3:
        weight[1] = accum - 2
    cats, flops, bytes_other, top = defaultdict(float), 0, 0, defaultdict(float)
    for op in ops:
        w = weight[op["phase"]]
        s = op.get("exposed", op["s"])
        cats[op["cat"]] += w * s
        flops += w * op["flops"]
        if op["cat"] not in ("matmul", "attention", "communication"):
            bytes_other += w * op["bytes"]
        top[(op["name"], op["shapes"])] += w * s
    step_s = sum(cats.values())
    typical = 1 if recorded == 3 else recorded - 1  # a middle micro-batch, else the last
    micro_s = sum(op.get("exposed", op["s"]) for op in ops if op["phase"] == typical)
    tokens = cfg.micro_batch * cfg.seq_len * accum  # per data-parallel replica (tp ranks share them)
    peak = spec[cfg.dtype] * T
    mfu = flops_per_token(cfg) * tokens * dp / step_s / (peak * tp * dp)
    if ops_out is not None:
        ops_out.extend(ops)
    return dict(preset=preset, gpu=gpu if isinstance(gpu, str) else spec.get("name", "custom"), tp=tp, dp=dp,
                gpus=tp * dp, dtype=cfg.dtype, micro_batch=cfg.micro_batch, seq_len=cfg.seq_len,
                recompute=cfg.recompute, zero1=cfg.zero1, sequence_parallel=cfg.sp, compile=cfg.compile,
                micro_batches=accum, recorded_micro_batches=1 if derived else recorded, micro_batch_s=micro_s,
                step_s=step_s,
                tokens_per_s=tokens * dp / step_s, mfu=mfu, step_flops_per_rank=flops,
                model_flops_per_rank=flops_per_token(cfg) * tokens / tp,
                seconds_by_category={c: cats[c] for c in CATEGORIES},
                bytes_per_token_outside_matmul_attention=bytes_other / tokens,
                top_ops=[dict(op=k[0], shapes=k[1], s=v) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:10]],
                assumes=("fused: consecutive non-matmul ops are one kernel (tools/roofline.py docstring)"
                         if cfg.compile else "eager: no kernel fusion, every aten op is one kernel reading its inputs"
                         " and writing its outputs from HBM") + ("; dropout > 0: attention priced as the CPU runs it "
                                                                "(SDPA's math path with T x T scores), not flash"
                                                                if cfg.dropout > 0 else ""),
                record_s=time.perf_counter() - t0, spec={k: v for k, v in spec.items() if k != "name"})


# ------------------------------------------------------------------------------------------------------------------
# This CPU as the "GPU" (validation), the command line


def measure_cpu(clock=time.perf_counter):
    """This machine's own fp32 GEMM FLOP/s and memory bandwidth, measured now, in the GPUS table's units. The
    fractions are 1: these are achieved rates. Attention is priced at the GEMM rate (not measured separately).
    clock=time.process_time counts this process's CPU seconds / threads instead of wall seconds: on a machine that
    others share, wall time also measures their load, CPU time much less."""
    scale = 1 / torch.get_num_threads() if clock is time.process_time else 1

    def best(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t0 = clock()
            fn()
            times.append((clock() - t0) * scale)
        return min(times)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = 2 * n**3 / best(lambda: a @ b)
    x, y, z = torch.randn(2**25), torch.randn(2**25), torch.empty(2**25)  # 128 MB each: far past the caches
    copy = 2 * nbytes(x) / best(lambda: z.copy_(x))
    add = 3 * nbytes(x) / best(lambda: torch.add(x, y, out=z))
    one, ops = torch.ones(8), 2000  # LAUNCH_S on this machine: eager aten ops on tensors too small to matter
    launch = best(lambda: [torch.add(one, one) for _ in range(ops)]) / ops
    return dict(name=f"cpu ({torch.get_num_threads()} threads)", fp32=gemm / T, hbm=(copy + add) / 2 / G,
                nvlink=1.0, ib=1.0, mm=1.0, attn=1.0, mem=1.0, launch_s=launch, copy_gbs=copy / G, add_gbs=add / G)


def measure_step(preset, overrides, accum, steps=3):
    """(wall seconds, CPU seconds / threads) of the real train_step on this CPU: the best of `steps` after one."""
    cfg = make_config(preset, **overrides, device="cpu")
    dist = Dist(overlap=cfg.overlap)
    step.resolve_dtype(cfg, dist.device)
    model, opt, reducer, clip_params = step.build(cfg, dist)
    scaler = LossScaler(enabled=cfg.dtype == "fp16")
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.vocab_size, (cfg.micro_batch, cfg.seq_len + 1), generator=gen)
    walls, cpus = [], []
    for i in range(steps + 1):
        w, c = time.perf_counter(), time.process_time()
        step.train_step(model, opt, reducer, scaler, clip_params, accum, cfg, dist,
                         lambda micro: (ids[:, :-1], ids[:, 1:]))
        if i:
            walls.append(time.perf_counter() - w)
            cpus.append((time.process_time() - c) / torch.get_num_threads())
    return min(walls), min(cpus)


def report(r):
    spec, cats = r["spec"], r["seconds_by_category"]
    lines = [f"{r['preset']} on {r['gpus']} x {r['gpu']} (tp {r['tp']} x dp {r['dp']}), {r['dtype']}, micro-batch "
             f"{r['micro_batch']} x {r['seq_len']}, {r['micro_batches']} micro-batches per step, recompute "
             f"{r['recompute']}" + "".join(f", {k}" for k in ("zero1", "sequence_parallel", "compile") if r[k]),
             f"assumes: {r['assumes']}; {GPUS_PER_NODE} GPUs per node",
             f"rates: {spec[r['dtype']]:g} TFLOP/s x {spec['mm']} (matmul), x {spec['attn']} (attention); memory "
             f"{spec['hbm']:g} GB/s x {spec.get('mem', FRACTIONS['mem'])}; NVLink {spec['nvlink']:g} GB/s, IB "
             f"{spec['ib']:g} GB/s, x {FRACTIONS['net']}; " + (f"{spec['sms']} SMs (tile and wave quantization), "
                                                                 if "sms" in spec else "") +
             f"at least {spec.get('launch_s', LAUNCH_S) * 1e6:.1f} us per kernel",
             f"per micro-batch {r['micro_batch_s'] * 1e3:,.1f} ms; per step {r['step_s']:,.3f} s; "
             f"{r['tokens_per_s']:,.0f} tokens/s; projected MFU {r['mfu']:.1%}",
             "time per step by category       seconds   share"]
    lines += [f"  {c:<26} {cats[c]:>10.3f} {cats[c] / r['step_s']:>7.1%}" for c in CATEGORIES]
    lines.append(f"bytes per token outside matmuls and attention: {r['bytes_per_token_outside_matmul_attention']:,.0f}"
                 f" (one rank's bytes over its replica's tokens)")
    lines.append("ten costliest ops per step (aten op, input shapes)")
    lines += [f"  {o['s']:>9.3f} s  {o['op']} {o['shapes']}" for o in r["top_ops"]]
    return "\n".join(lines)


OPTS = {"preset": "small", "gpu": "H100", "tp": 1, "dp": 0, "gpus": 0, "accum": 0, "measure": False}


def parse(argv):
    """(options, Config overrides, json target: None, "-" for stdout, or a file)."""
    opts, overrides, as_json, types = dict(OPTS), {}, None, FIELD_TYPES
    i = 0
    while i < len(argv):
        key = argv[i].lstrip("-").replace("-", "_")
        if not argv[i].startswith("--"):
            raise UserError(f"unexpected argument {argv[i]!r}; options look like --NAME VALUE.")
        if key == "json":
            as_json = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "-"
            i += 1 if as_json == "-" else 2
            continue
        if i + 1 >= len(argv):
            raise UserError(f"--{key} needs a value.")
        value, i = argv[i + 1], i + 2
        try:
            if key in OPTS:
                opts[key] = parse_bool(value) if key == "measure" else type(OPTS[key])(value)
            elif key in types and key != "tp":
                overrides[key] = parse_field(key, value)
            else:
                raise UserError(f"unknown option --{key}. Options: {', '.join('--' + k for k in (*OPTS, 'json'))}; "
                                f"any Config field: {', '.join(sorted(types))}.")
        except ValueError:
            raise UserError(f"--{key}: cannot read {value!r}.") from None
    tp, dp, gpus = opts["tp"], opts["dp"], opts["gpus"]
    if gpus and (gpus % tp or (dp and dp * tp != gpus)):
        raise UserError(f"--gpus {gpus} must equal --tp {tp} x --dp (given: {dp or 'not given'}).")
    opts["dp"] = dp or (gpus // tp if gpus else 1)
    if opts["gpu"] != "cpu" and opts["gpu"] not in GPUS:
        raise UserError(f"unknown --gpu {opts['gpu']!r}. Known: {', '.join(GPUS)}, cpu (this machine, measured).")
    if opts["measure"] and (opts["gpu"] != "cpu" or tp * opts["dp"] > 1):
        raise UserError("--measure true times the real step on this machine: it needs --gpu cpu at tp 1, dp 1.")
    return opts, overrides, as_json


# The real step on a CPU allocates its logits and their gradient afresh each micro-batch; glibc hands blocks over 32
# MB back to the OS when freed, so each allocation page-faults again (on a 2-core Xeon: 3.6 s against 2.6 s per step,
# bench/RESULTS.md). A GPU's caching allocator keeps freed blocks, and the roofline prices none of this: --measure
# runs the step with glibc told to keep them too (no mmap, no trimming), set before the process starts.
KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def main(argv):
    opts, overrides, as_json = parse(argv)
    if opts["measure"] and sys.platform.startswith("linux") and any(k not in os.environ for k in KEEP_FREED):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], {**os.environ, **KEEP_FREED})
    gpu = opts["gpu"]
    if gpu == "cpu":
        gpu = measure_cpu()
        print(f"measured on this CPU: fp32 GEMM {gpu['fp32']:.3f} TFLOP/s, memory {gpu['hbm']:.1f} GB/s (copy "
              f"{gpu['copy_gbs']:.1f}, add {gpu['add_gbs']:.1f}), {gpu['launch_s'] * 1e6:.1f} us per eager op",
              file=sys.stderr)
    r = project(opts["preset"], overrides, gpu, opts["tp"], opts["dp"], accum=opts["accum"] or None)
    if opts["measure"]:  # the real step, and a second projection priced with CPU-time rates
        wall, cpu = measure_step(opts["preset"], {**overrides, "dtype": r["dtype"]}, r["micro_batches"])
        by_cpu = project(opts["preset"], overrides, measure_cpu(time.process_time), 1, 1, accum=r["micro_batches"])
        r.update(measured_step_s=wall, projected_over_measured=r["step_s"] / wall, measured_cpu_step_s=cpu,
                 projected_cpu_step_s=by_cpu["step_s"], cpu_projected_over_measured=by_cpu["step_s"] / cpu)
    if as_json:
        text = json.dumps(r, indent=1, default=str)
        if as_json == "-":
            print(text)
        else:
            with open(as_json, "w") as f:
                f.write(text + "\n")
    if as_json != "-":
        print(report(r))
        if opts["measure"]:
            print(f"real step on this CPU ({' '.join(f'{k}={os.environ.get(k)}' for k in KEEP_FREED)}), best of 3 "
                  f"after 1: {r['measured_step_s']:.3f} s wall; projected / measured "
                  f"= {r['projected_over_measured']:.3f}\nin CPU seconds / threads (rates measured the same way): "
                  f"projected {r['projected_cpu_step_s']:.3f} s, measured {r['measured_cpu_step_s']:.3f} s; "
                  f"projected / measured = {r['cpu_projected_over_measured']:.3f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
