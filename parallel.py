"""Distributed training by hand: the MPI bootstrap, Megatron-style tensor-parallel layers.

Every layer here is tested against the unsharded computation under `mpiexec` (tests/test_parallel.py). At
tensor-parallel size 1 the collectives are skipped and the layers are plain nn.Linear / nn.Embedding arithmetic.

Ranks are laid out as blocks of `tp` consecutive ranks (one tensor-parallel group, kept inside a node) and the
data-parallel groups are the strided rest. With 8 ranks and tp=4:

    rank:      0 1 2 3 | 4 5 6 7
    tp group:  [0 1 2 3] [4 5 6 7]          tp_rank = rank % tp
    dp group:  [0 4] [1 5] [2 6] [3 7]      dp_rank = rank // tp
"""
import math
import os
import socket
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from errors import UserError


@dataclass
class Dist:
    """Everything a layer or the loop needs to know about the process layout. Passed explicitly, never global."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # rank within this node
    local_world: int = 1
    tp: int = 1  # tensor-parallel size
    tp_rank: int = 0
    tp_group: object = None  # torch.distributed group of this rank's tp ranks (None when tp == 1)
    dp: int = 1  # data-parallel size
    dp_rank: int = 0
    dp_group: object = None
    device: torch.device = torch.device("cpu")
    rng: "TPRandom" = field(default=None, compare=False)  # dropout generator of this tensor-parallel rank

    def __post_init__(self):
        if self.rng is None:
            self.rng = TPRandom(self.tp, self.tp_rank, self.device)

    def print0(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs, flush=True)


def _mpi_world():
    """mpi4py's COMM_WORLD, or None when there is no MPI (a plain `python train.py` is a world of one, even where
    libmpi is missing or broken)."""
    try:
        from mpi4py import MPI
        return MPI, MPI.COMM_WORLD
    except Exception:  # ImportError, or RuntimeError from a missing libmpi
        return None, None


def init_distributed(tp=1, device=""):
    """Bootstrap torch.distributed from MPI. Rank and world size come from COMM_WORLD, the local rank from a
    shared-memory split; rank 0 picks the rendezvous address (MASTER_ADDR/MASTER_PORT override) and broadcasts it."""
    MPI, comm = _mpi_world()
    world = comm.Get_size() if comm is not None else 1
    if world % tp:
        raise UserError(f"world size {world} is not divisible by --tp {tp}.\n"
                        f"HINT: launch a multiple of {tp} ranks, or pick --tp among the divisors of {world}.")
    if world == 1:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return Dist(device=dev)
    rank = comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = local.Get_rank(), local.Get_size()
    addr = port = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = os.environ.get("MASTER_PORT")
        if not port:
            with socket.socket() as s:  # a free port on this host; freed again for torch to bind
                s.bind(("", 0))
                port = s.getsockname()[1]
        port = int(port)
    addr, port = comm.bcast((addr, port), root=0)
    if torch.cuda.is_available() and device != "cpu":
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        backend = "gloo"
    tdist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world)
    # Every rank must create every group, in the same order, even the groups it is not in.
    tp_group = dp_group = None
    for start in range(0, world, tp):
        group = tdist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            tp_group = group
    for offset in range(tp):
        group = tdist.new_group(list(range(offset, world, tp)))
        if rank % tp == offset:
            dp_group = group
    return Dist(rank=rank, world=world, local_rank=local_rank, local_world=local_world, tp=tp, tp_rank=rank % tp,
                tp_group=tp_group if tp > 1 else None, dp=world // tp, dp_rank=rank // tp,
                dp_group=dp_group if world // tp > 1 else None, device=dev)


def run_or_abort(main):
    """Run main(). A UserError prints its message, anything else its traceback; then, if this is one rank of
    several, abort the whole MPI world so that no other rank waits forever in a collective: the job ends promptly
    with a non-zero exit."""
    try:
        main()
        if tdist.is_initialized():  # leave together: a rank that exits early can break its peers' connections
            tdist.barrier()
            tdist.destroy_process_group()
        return
    except UserError as e:
        message = f"error: {e}"
    except Exception:
        message = traceback.format_exc()
    print(message, file=sys.stderr, flush=True)
    MPI, comm = _mpi_world()
    if comm is not None and comm.Get_size() > 1:
        comm.Abort(1)
    sys.exit(1)


# ------------------------------------------------------------------------------------------------------------------
# The two conjugate operators of tensor parallelism (Megatron-LM paper, section 3, figure 3).


class CopyToTP(torch.autograd.Function):
    """f: forward identity, backward all-reduce. Placed where a replicated activation enters sharded matmuls: each
    rank's shard contributes a partial gradient for the input, and the full gradient is their sum."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        tdist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromTP(torch.autograd.Function):
    """g: forward all-reduce, backward identity. Placed where sharded partial sums become one replicated
    activation; the gradient of a sum with respect to each term is the gradient of the sum itself."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        tdist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def f(x, dist):
    return CopyToTP.apply(x, dist.tp_group) if dist.tp > 1 else x


def g(x, dist):
    return ReduceFromTP.apply(x, dist.tp_group) if dist.tp > 1 else x


def shard(full, dist, dim):
    """This rank's contiguous slice of a full tensor along dim (every rank built the same full tensor)."""
    return full.chunk(dist.tp, dim=dim)[dist.tp_rank].clone()


def full_normal(shape, std, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def _sharded(shape, dim, dist):
    """An uninitialised parameter of this rank's slice of `shape`, marked so that gradient clipping sums it over
    the tensor-parallel group (see clip_grad_norm)."""
    local = list(shape)
    local[dim] //= dist.tp
    p = nn.Parameter(torch.empty(local))
    p.tp_sharded = True
    return p


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by columns: A = [A_1 ... A_tp]; rank r computes Y_r = f(X) A_r + b_r.
    Input [B, T, C] replicated -> output [B, T, out/tp], sharded (fed to a RowParallelLinear, never gathered)."""

    def __init__(self, in_features, out_features, dist):
        super().__init__()
        if out_features % dist.tp:
            raise UserError(f"output size {out_features} is not divisible by tensor-parallel size {dist.tp}.")
        self.dist = dist
        self.weight = _sharded((out_features, in_features), 0, dist)  # torch's [out, in] layout: split rows
        self.bias = _sharded((out_features,), 0, dist)

    @torch.no_grad()
    def reset_parameters(self, std, seed):
        if not self.weight.is_meta:
            full = full_normal((self.weight.size(0) * self.dist.tp, self.weight.size(1)), std, seed)
            self.weight.copy_(shard(full, self.dist, 0))
            self.bias.zero_()

    def forward(self, x):
        return F.linear(f(x, self.dist), self.weight, self.bias)  # [B, T, C] -> [B, T, out/tp]


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split by rows (X by columns): rank r computes X_r A_r, then g sums the partial products.
    Input [B, T, in/tp] sharded -> output [B, T, out] replicated. The bias is added once, after the sum."""

    def __init__(self, in_features, out_features, dist):
        super().__init__()
        if in_features % dist.tp:
            raise UserError(f"input size {in_features} is not divisible by tensor-parallel size {dist.tp}.")
        self.dist = dist
        self.weight = _sharded((out_features, in_features), 1, dist)  # [out, in/tp]
        self.bias = nn.Parameter(torch.empty(out_features))  # replicated

    @torch.no_grad()
    def reset_parameters(self, std, seed):
        if not self.weight.is_meta:
            full = full_normal((self.weight.size(0), self.weight.size(1) * self.dist.tp), std, seed)
            self.weight.copy_(shard(full, self.dist, 1))
            self.bias.zero_()

    def forward(self, x):
        return g(F.linear(x, self.weight), self.dist) + self.bias  # [B, T, in/tp] -> [B, T, out]


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by vocabulary rows: rank r holds rows [r V/tp, (r+1) V/tp). Each rank looks up
    the ids it owns, writes zeros for the others, and g sums the partial results. Input [B, T] -> [B, T, C]."""

    def __init__(self, vocab_size, dim, dist):
        super().__init__()
        if vocab_size % dist.tp:
            raise UserError(f"vocabulary {vocab_size} is not divisible by tensor-parallel size {dist.tp}.\n"
                            f"HINT: pass --vocab_size with a multiple of {128 * dist.tp} at least the tokenizer's.")
        self.dist, self.per_rank = dist, vocab_size // dist.tp
        self.start = dist.tp_rank * self.per_rank
        self.weight = _sharded((vocab_size, dim), 0, dist)

    @torch.no_grad()
    def reset_parameters(self, std, seed):
        if not self.weight.is_meta:
            full = full_normal((self.weight.size(0) * self.dist.tp, self.weight.size(1)), std, seed)
            self.weight.copy_(shard(full, self.dist, 0))

    def forward(self, idx):
        if self.dist.tp == 1:
            return F.embedding(idx, self.weight)
        local = idx - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [B, T, C]
        return g(x.masked_fill(outside.unsqueeze(-1), 0.0), self.dist)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, start, group):
        """logits [N, V/tp] (this rank's vocabulary slice), targets [N] global ids -> loss [N]."""
        logits = logits.float()
        # why: softmax needs the max over the whole vocabulary for a stable exp; each rank only has its slice.
        max_logit = logits.max(dim=-1).values
        tdist.all_reduce(max_logit, op=tdist.ReduceOp.MAX, group=group)
        logits = logits - max_logit.unsqueeze(-1)
        # why: the target's logit lives on exactly one rank; the others contribute 0 to the sum.
        local = targets - start
        mine = (local >= 0) & (local < logits.size(-1))
        rows = torch.arange(logits.size(0), device=logits.device)
        target_logit = logits[rows, local.clamp(0, logits.size(-1) - 1)] * mine
        tdist.all_reduce(target_logit, group=group)
        # why: the softmax denominator sums exp over all V entries = the sum of every rank's partial sum.
        exp = logits.exp()
        sum_exp = exp.sum(dim=-1)
        tdist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine = ctx.saved_tensors  # d loss / d logits = softmax - one_hot(target), per rank's slice
        rows = torch.arange(softmax.size(0), device=softmax.device)
        g_logits = softmax.clone()
        g_logits[rows, local.clamp(0, softmax.size(-1) - 1)] -= mine.float()
        return g_logits * grad.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits, targets, dist, start):
    """Mean cross-entropy of logits [N, V/tp] against targets [N] without ever gathering [N, V] on one rank."""
    if dist.tp == 1:
        return F.cross_entropy(logits.float(), targets)
    return _VocabParallelCrossEntropy.apply(logits, targets, start, dist.tp_group).mean()


# ------------------------------------------------------------------------------------------------------------------
# Randomness, gradient norm, data-parallel gradient reduction


class TPRandom:
    """Megatron's RNG tracker, reduced to what this model needs. Dropout on replicated activations uses the global
    generator, seeded the same on every rank of a tensor-parallel group so their masks agree; dropout on a rank's
    own heads runs inside fork(), on a generator seeded differently per tp rank. At tp = 1 fork() does nothing."""

    def __init__(self, tp, tp_rank, device):
        self.tp, self.tp_rank, self.device, self.state = tp, tp_rank, device, None

    def _get(self):
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state):
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def seed(self, seed):
        if self.tp > 1:
            saved = self._get()
            gen = torch.Generator(self.device).manual_seed(seed + 2718 + self.tp_rank)
            self.state = gen.get_state()
            self._set(saved)

    @contextmanager
    def fork(self):
        if self.state is None:
            yield
            return
        saved = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(saved)


def checkpoint(fn, dist, *args):
    """Activation recomputation: run fn(*args) keeping only its inputs; backward runs it again to rebuild what it
    needs. The recomputation must draw the same dropout masks: torch restores the default generator
    (preserve_rng_state), and this restores the tensor-parallel generator to its state at the first run."""
    state, calls = dist.rng.state, [0]

    def run(*a):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*a)
        later, dist.rng.state = dist.rng.state, state
        try:
            return fn(*a)
        finally:
            dist.rng.state = later
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


def clip_grad_norm(params, max_norm, dist):
    """Global gradient norm, then clip. Sharded parameters (tp_sharded) hold different slices on each tp rank, so
    their squared norms are summed over the tensor-parallel group; replicated ones are identical on every rank and
    counted once. ZeRO-1 shards (dp_sharded) are disjoint slices on each data-parallel rank: summed over that group
    first. Every rank gets the same norm, so all agree on skipping an fp16 overflow step."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [p.grad for p in params if p.grad is not None and getattr(p, "tp_sharded", False)]
    replicated = [p.grad for p in params if p.grad is not None and not getattr(p, "tp_sharded", False)]
    sq = torch.zeros(2, device=grads[0].device)
    for i, group in enumerate((sharded, replicated)):
        if group:
            sq[i] = torch.stack(torch._foreach_norm(group)).float().pow(2).sum()
    if dist.dp > 1 and any(getattr(p, "dp_sharded", False) for p in params):  # ZeRO-1 shards: disjoint slices
        tdist.all_reduce(sq, group=dist.dp_group)
    if dist.tp > 1:
        tdist.all_reduce(sq[:1], group=dist.tp_group)
    norm = sq.sum().sqrt()
    if max_norm > 0 and math.isfinite(norm.item()):
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm.item()


class GradReducer:
    """Average gradients over the data-parallel group, by hand. Parameters are grouped into flat buckets of about
    bucket_mb MB in reverse order (the order backward produces their gradients). During the backward of the last
    micro-batch, a hook counts each bucket's finished gradients and launches its all-reduce asynchronously as soon
    as the bucket is complete, overlapping communication with the rest of the backward; finish() waits for all of
    them before the optimizer step. Earlier micro-batches only accumulate locally: no communication."""

    def __init__(self, params, dist, bucket_mb=25.0):
        self.dist, self.active, self.pending = dist, False, []
        self.buckets, self.bucket_of, size = [[]], {}, 0
        for p in reversed([p for p in params if p.requires_grad]):
            if size and size + p.numel() * 4 > bucket_mb * 2**20:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            self.bucket_of[p] = len(self.buckets) - 1
            size += p.numel() * 4
        self.ready = [0] * len(self.buckets)
        if dist.dp > 1:
            for p in self.bucket_of:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, p):
        if not self.active:
            return
        b = self.bucket_of[p]
        self.ready[b] += 1
        if self.ready[b] == len(self.buckets[b]):
            self._launch(b)

    def _launch(self, b):
        flat = torch.cat([p.grad.reshape(-1) for p in self.buckets[b]])
        self.pending.append((b, flat, tdist.all_reduce(flat, group=self.dist.dp_group, async_op=True)))

    def start(self):
        """Call before the backward of the last micro-batch."""
        self.active, self.ready = self.dist.dp > 1, [0] * len(self.buckets)

    def finish(self):
        """Wait for every bucket, then write the averaged gradients back into p.grad."""
        if self.dist.dp == 1:
            return
        launched = {b for b, _, _ in self.pending}
        for b in range(len(self.buckets)):  # a bucket whose gradients never all arrived (unused parameters)
            if b not in launched:
                for p in self.buckets[b]:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self._launch(b)
        for b, flat, work in self.pending:
            work.wait()
            flat /= self.dist.dp
            for p, chunk in zip(self.buckets[b], flat.split([p.numel() for p in self.buckets[b]])):
                p.grad.copy_(chunk.view_as(p))
        self.active, self.pending = False, []


class ZeroAdamW:
    """ZeRO stage 1 (Rajbhandari et al. 2020) by hand: AdamW whose moments are sharded over the data-parallel group.

    The parameters are packed into flat fp32 buffers (one per weight-decay setting and tensor-parallel kind, padded
    to a multiple of dp) and become views of them. Each step:
        reduce_grads(): flat gradient -> reduce-scatter over dp -> this rank's 1/dp slice, averaged
        (clip_grad_norm on the slices: their squares summed over dp)
        step():         AdamW on this rank's slice only (1/dp of the moments live here)
                        -> all-gather the updated slices: every rank has every parameter again
    It replaces GradReducer's all-reduce: a reduce-scatter plus an all-gather move the same bytes. The state_dict is
    the plain torch.optim.AdamW one (moments gathered to full size), so checkpoints do not depend on --zero1."""

    def __init__(self, groups, dist, **adamw):
        self.dist, self.groups, self.flats, shard_groups = dist, groups, [], []
        D, d = dist.dp, dist.dp_rank
        for gi, group in enumerate(groups):
            for tp_kind in (True, False):
                params = [p for p in group["params"] if getattr(p, "tp_sharded", False) == tp_kind]
                if not params:
                    continue
                n = sum(p.numel() for p in params)
                flat = torch.zeros(-(-n // D) * D, device=params[0].device)  # padded: dp equal slices
                offsets, o = [], 0
                for p in params:
                    flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = flat[o:o + p.numel()].view_as(p)  # the parameter now lives in the flat buffer
                    offsets.append(o)
                    o += p.numel()
                size = flat.numel() // D
                shard = nn.Parameter(flat[d * size:(d + 1) * size])  # a view: updating it updates the buffer
                shard.tp_sharded, shard.dp_sharded = tp_kind, True
                self.flats.append(dict(group=gi, params=params, offsets=offsets, flat=flat, shard=shard))
                shard_groups.append({"params": [shard], "weight_decay": group["weight_decay"]})
        try:
            self.inner = torch.optim.AdamW(shard_groups, fused=True, **adamw)
        except (RuntimeError, TypeError):  # no fused kernel for this device or torch build
            self.inner = torch.optim.AdamW(shard_groups, **adamw)
        self.param_groups, self.shards = self.inner.param_groups, [f["shard"] for f in self.flats]
        self.nccl = D > 1 and tdist.get_backend(dist.dp_group) == "nccl"

    def reduce_grads(self):
        """The averaged gradient of this rank's slice, from the full local gradients p.grad."""
        D = self.dist.dp
        for f in self.flats:
            flat = torch.zeros_like(f["flat"])
            for p, o in zip(f["params"], f["offsets"]):
                if p.grad is not None:
                    flat[o:o + p.numel()].copy_(p.grad.reshape(-1))
            size = flat.numel() // D
            if D > 1 and self.nccl:
                grad = torch.empty(size, device=flat.device)
                tdist.reduce_scatter_tensor(grad, flat, group=self.dist.dp_group)
            elif D > 1:  # gloo has no reduce-scatter: all-reduce, keep our slice (same result, twice the traffic)
                tdist.all_reduce(flat, group=self.dist.dp_group)
                grad = flat[self.dist.dp_rank * size:(self.dist.dp_rank + 1) * size]
            else:
                grad = flat
            f["shard"].grad = grad / D

    def start(self):  # GradReducer's interface: nothing to launch during backward
        pass

    def finish(self):  # GradReducer's interface: after the last backward, reduce-scatter instead of all-reduce
        self.reduce_grads()

    def step(self):
        self.inner.step()
        if self.dist.dp > 1:
            for f in self.flats:
                mine = f["shard"].detach().clone()
                if self.nccl:
                    tdist.all_gather_into_tensor(f["flat"], mine, group=self.dist.dp_group)
                else:
                    tdist.all_gather(list(f["flat"].chunk(self.dist.dp)), mine, group=self.dist.dp_group)

    def zero_grad(self, set_to_none=True):
        self.inner.zero_grad(set_to_none=set_to_none)
        for f in self.flats:
            for p in f["params"]:
                p.grad = None

    def _full(self, f, key):
        """A moment of flat buffer f at full size (a collective: every dp rank must call it)."""
        mine = self.inner.state[f["shard"]][key] if f["shard"] in self.inner.state else torch.zeros_like(f["shard"])
        full = torch.empty_like(f["flat"])
        if self.dist.dp > 1:
            tdist.all_gather(list(full.chunk(self.dist.dp)), mine.detach().clone(), group=self.dist.dp_group)
        else:
            full.copy_(mine)
        return full

    def state_dict(self):
        """torch.optim.AdamW's format for the original parameters, in the original groups' order."""
        index = {id(p): i for i, p in enumerate(p for g in self.groups for p in g["params"])}
        state = {}
        for f in self.flats:
            if f["shard"] not in self.inner.state:
                continue
            step = self.inner.state[f["shard"]]["step"]
            moments = {k: self._full(f, k) for k in ("exp_avg", "exp_avg_sq")}
            for p, o in zip(f["params"], f["offsets"]):
                state[index[id(p)]] = {"step": step.clone(), **{k: m[o:o + p.numel()].view_as(p).clone()
                                                                for k, m in moments.items()}}
        groups = []
        for g in self.groups:
            groups.append({**{k: v for k, v in self.param_groups[0].items() if k != "params"},
                           "weight_decay": g["weight_decay"], "params": [index[id(p)] for p in g["params"]]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd):
        """Take this rank's slice of every moment from a plain AdamW state_dict."""
        index = {id(p): i for i, p in enumerate(p for g in self.groups for p in g["params"])}
        D, d = self.dist.dp, self.dist.dp_rank
        for f in self.flats:
            ids = [index[id(p)] for p in f["params"]]
            if not all(i in sd["state"] for i in ids):
                continue
            size = f["flat"].numel() // D
            st = {}
            for k in ("exp_avg", "exp_avg_sq"):
                full = torch.zeros_like(f["flat"])
                for p, o, i in zip(f["params"], f["offsets"], ids):
                    full[o:o + p.numel()].copy_(sd["state"][i][k].reshape(-1))
                st[k] = full[d * size:(d + 1) * size].clone()
            st["step"] = sd["state"][ids[0]]["step"].clone()
            self.inner.state[f["shard"]] = st
        for group, saved in zip(self.param_groups, [sd["param_groups"][f["group"]] for f in self.flats]):
            group.update({k: v for k, v in saved.items() if k not in ("params", "weight_decay")})
