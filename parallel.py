"""Megatron-style tensor- and sequence-parallel layers, written by hand. (The process layout and its start-up are
distributed.py; keeping the data-parallel replicas in step, gradient reduction and ZeRO-1, data_parallel.py; the
dropout generator of each tensor-parallel rank and recomputation, recompute.py; collectives with a deadline,
runtime/collectives.py.)

Every layer here is tested against the unsharded computation under `mpiexec` (tests/test_parallel.py). At
tensor-parallel size 1 the collectives are skipped and the layers are plain nn.Linear / nn.Embedding arithmetic.
"""
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from mixed_precision import accumulate_wgrad, grad_of
from runtime.collectives import Pending, gather_into, scatter_sum_into


# ------------------------------------------------------------------------------------------------------------------
# The two conjugate operators of tensor parallelism (Megatron-LM paper, section 3, figure 3), and their
# sequence-parallel forms (Korthikanti et al. 2022, section 4.2.2). An all-reduce is a reduce-scatter followed by an
# all-gather: sequence parallelism moves the same bytes, but between the two halves each rank holds only its T/tp
# tokens, so the LayerNorms and dropouts in between store 1/tp of their activations.
#
#                    forward               backward              used where
#   f                identity              all-reduce            replicated [B, T, C] enters a column-parallel matmul
#   g                all-reduce            identity              a row-parallel matmul's partial sums leave
#   f, sequence par. all-gather along T    reduce-scatter        [B, T/tp, C] enters a column-parallel matmul
#   g, sequence par. reduce-scatter on T   all-gather along T    partial sums [B, T, C] leave as [B, T/tp, C]
#
# column_parallel_matmul reads f, then the local matmul; RowParallelLinear.forward the local matmul, then g.
# With --overlap (the default) both take one named step instead, ParallelMatmul below: the same arithmetic, with f's
# backward collective overlapped with the weight gradient and that gradient added straight into main_grad.


def all_reduce(x, dist, async_op=False):
    """Sum of x over the tp group, in place."""
    work = tdist.all_reduce(x, group=dist.tp_group, async_op=async_op)
    return Pending(work, lambda: x, dist) if async_op else x


def all_gather_seq(x, dist, async_op=False):
    """[B, T/tp, ...] on each tp rank -> [B, T, ...]: the ranks' slices of the sequence, in rank order.

    One buffer, no list: the collective writes rank r's [B, T/tp, ...] as block r of a [tp * B, T/tp, ...] tensor.
    With B == 1 (yuan-4.7b's micro-batch) that buffer already is [1, T, ...] in memory, so nothing is copied. With
    B > 1 the blocks interleave batch rows, and one movedim + reshape copy puts T back together; Megatron-LM avoids
    it by keeping activations sequence-first ([T, B, C]), which this batch-first model does not."""
    B, t = x.shape[:2]
    rest = x.shape[2:]
    out = x.new_empty((dist.tp * B, t, *rest))  # [tp * B, T/tp, ...]: rank r's block at rows r B .. (r + 1) B
    work = gather_into(out, x.contiguous(), dist.tp_group, async_op)
    if B == 1:
        result = lambda: out.view(1, dist.tp * t, *rest)  # noqa: E731  [tp, T/tp, ...] is [1, T, ...]
    else:
        result = lambda: out.view(dist.tp, B, t, *rest).movedim(0, 1).reshape(B, dist.tp * t, *rest)  # noqa: E731
    pending = Pending(work, result, dist)  # [B, T, ...]
    return pending if async_op else pending.wait()


def reduce_scatter_seq(x, dist, async_op=False):
    """Partial sums [B, T, ...] on each tp rank -> this rank's slice [B, T/tp, ...] of their sum.

    The collective reads block r of a [tp * B, T/tp, ...] buffer as the part that rank r receives. With B == 1 the
    contiguous [1, T, ...] is that buffer ([tp, T/tp, ...]: the T-slices in rank order), so nothing is copied; with
    B > 1 one movedim + reshape copy gathers each T-slice's batch rows together (see all_gather_seq for why).
    gloo runs it too (as an all-reduce that keeps this rank's slice, twice NCCL's traffic), so the CPU tests take
    the same path as the GPUs."""
    B, T = x.shape[:2]
    rest, t = x.shape[2:], T // dist.tp  # T % tp == 0: Config checks it (and the model, for each input)
    if B == 1:
        blocks = x.contiguous().view(dist.tp, t, *rest)  # [tp, T/tp, ...]
    else:
        blocks = x.reshape(B, dist.tp, t, *rest).movedim(1, 0).reshape(dist.tp * B, t, *rest)  # [tp * B, T/tp, ...]
    out = x.new_empty((B, t, *rest))  # [B, T/tp, ...]
    work = scatter_sum_into(out, blocks, dist.tp_group, async_op)
    pending = Pending(work, lambda: out, dist)
    return pending if async_op else pending.wait()


class CopyToTP(torch.autograd.Function):
    """f: forward identity, backward all-reduce. Placed where a replicated activation enters sharded matmuls: each
    rank's shard contributes a partial gradient for the input, and the full gradient is their sum."""

    @staticmethod
    def forward(ctx, x, dist):
        ctx.dist = dist
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.dist), None


class ReduceFromTP(torch.autograd.Function):
    """g: forward all-reduce, backward identity. Placed where sharded partial sums become one replicated
    activation; the gradient of a sum with respect to each term is the gradient of the sum itself."""

    @staticmethod
    def forward(ctx, x, dist):
        if not x.is_contiguous():
            return all_reduce(x.contiguous(), dist)
        # In place, as Megatron-LM does: the partial sums are a matmul's fresh output, which nothing saved for
        # backward (mark_dirty tells autograd); a copy first would move [B, T, C] once more for nothing.
        ctx.mark_dirty(x)
        return all_reduce(x, dist)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromSequence(torch.autograd.Function):
    """f under sequence parallelism: forward all-gather along T, backward reduce-scatter. Each rank holds T/tp
    tokens and the column-parallel matmul needs all T; each rank's gradient for all T is partial, so backward sums
    them and each rank keeps its own tokens' share."""

    @staticmethod
    def forward(ctx, x, dist):  # [B, T/tp, C] -> [B, T, C]
        ctx.dist = dist
        return all_gather_seq(x, dist)

    @staticmethod
    def backward(ctx, grad):  # [B, T, C], partial -> this rank's [B, T/tp, C] of the sum
        return reduce_scatter_seq(grad.contiguous(), ctx.dist), None


class ReduceScatterToSequence(torch.autograd.Function):
    """g under sequence parallelism: forward reduce-scatter along T, backward all-gather. The partial sums are
    summed, as g does, but each rank keeps only its T/tp tokens; every token's gradient is needed by every rank's
    partial product, so backward gathers them."""

    @staticmethod
    def forward(ctx, x, dist):  # [B, T, C], partial sums -> this rank's [B, T/tp, C] of their sum
        ctx.dist = dist
        return reduce_scatter_seq(x, dist)

    @staticmethod
    def backward(ctx, grad):  # [B, T/tp, C] -> [B, T, C]
        return all_gather_seq(grad, ctx.dist), None


def f(x, dist):
    """Where a replicated activation ([B, T, C]; under sequence parallelism this rank's [B, T/tp, C]) enters a
    column-parallel matmul: -> [B, T, C] on every rank."""
    if dist.tp == 1:
        return x
    return GatherFromSequence.apply(x, dist) if dist.sequence_parallel else CopyToTP.apply(x, dist)


def g(x, dist):
    """Where a row-parallel matmul's partial sums ([B, T, C] on each rank) leave it: -> their sum [B, T, C] on every
    rank, or under sequence parallelism this rank's [B, T/tp, C] of it."""
    if dist.tp == 1:
        return x
    return ReduceScatterToSequence.apply(x, dist) if dist.sequence_parallel else ReduceFromTP.apply(x, dist)


class ParallelMatmul(torch.autograd.Function):
    """The --overlap step: F.linear(x, weight, bias) as one autograd function, with what tensor parallelism and
    mixed precision need around it (the same arithmetic as the plain path, f then F.linear; --overlap false takes
    that path, and tests/mpi_tp_layers.py compares the two):
      column=True   f before the matmul, fused with it, so that backward can overlap communication with
                    computation (Megatron-LM's asynchronous tensor-parallel all-reduce): the input gradient is
                    computed first and its all-reduce (reduce-scatter, with sequence parallelism) travels while the
                    weight gradient is computed. Under sequence parallelism only the local slice of x is saved, and
                    gathered again in backward while the input gradient is computed.
      main_grad     under master weights (mixed_precision.py) the weight gradient is added by the matmul itself
                    into the fp32 weight.main_grad (Megatron's gradient accumulation fusion); autograd gets a
                    placeholder. Only for weights marked fuse_wgrad: the tied embedding/head weight also gets the
                    embedding's gradient, and a placeholder summed with it would be garbage."""

    @staticmethod
    def forward(ctx, x, weight, bias, dist, column):
        if torch.is_autocast_enabled(x.device.type):  # its backward computes in the dtypes it saved: the model's own
            raise RuntimeError("parallel.ParallelMatmul under torch.autocast: the model runs in its own dtype "
                               "(mixed_precision.py); drop autocast, or pass --overlap false for the plain path")
        fuse = getattr(weight, "fuse_wgrad", False) and hasattr(weight, "main_grad")
        ctx.param = weight if fuse else None
        ctx.dist, ctx.sp, ctx.has_bias = dist, column and dist.sequence_parallel, bias is not None
        ctx.comm = column and dist.tp > 1
        ctx.save_for_backward(x, weight)  # x: [B, T, C], or [B, T/tp, C] under sequence parallelism
        full = all_gather_seq(x, dist) if ctx.sp else x  # [B, T, C]
        return F.linear(full, weight, bias)  # [B, T, out/tp]

    @staticmethod
    def backward(ctx, grad):  # grad [B, T, out/tp]
        x, weight = ctx.saved_tensors
        gather = all_gather_seq(x, ctx.dist, async_op=True) if ctx.sp else None
        grad_x = grad @ weight  # [B, T, C]: this rank's partial input gradient
        full = gather.wait() if ctx.sp else x
        if ctx.comm:
            reduce = (reduce_scatter_seq if ctx.sp else all_reduce)(grad_x.contiguous(), ctx.dist, async_op=True)
        # While the input gradient is summed over the tp group, the weight gradient is computed.
        grad_2d, full_2d = grad.reshape(-1, grad.size(-1)), full.reshape(-1, full.size(-1))  # [N, out/tp], [N, C]
        if ctx.param is not None:
            accumulate_wgrad(ctx.param.main_grad, grad_2d, full_2d)  # main_grad [out/tp, C] += grad^T full
            ctx.param.grad_added_to_main_grad = True  # read by the hook that would otherwise add grad_w
            grad_w = torch.empty_like(ctx.param)  # a placeholder: never read, freed by that hook
        else:
            grad_w = grad_2d.t() @ full_2d  # [out/tp, C]
        grad_b = grad_2d.sum(0) if ctx.has_bias else None
        grad_x = reduce.wait() if ctx.comm else grad_x
        return grad_x, grad_w, grad_b, None, None


def overlap_helps(weight, dist, column):
    """Whether the --overlap step has anything to do here: a collective to overlap (a column-parallel matmul at
    tp > 1) or a main_grad to accumulate into (master weights); otherwise it would be F.linear with extra steps."""
    return (column and dist.tp > 1) or hasattr(weight, "main_grad")


def column_parallel_matmul(x, weight, bias, dist):
    """f, then the local matmul: [B, T, C] replicated (or [B, T/tp, C] under sequence parallelism) -> [B, T, out/tp].
    ColumnParallelLinear and the tied LM head (model.py) both run it."""
    if dist.overlap and overlap_helps(weight, dist, column=True):
        return ParallelMatmul.apply(x, weight, bias, dist, True)  # the same, overlapped
    return F.linear(f(x, dist), weight, bias)


def sync_sequence_parallel_grads(params, dist):
    """Under sequence parallelism the replicated parameters (LayerNorms, row-parallel biases, positions) see only
    this rank's T/tp tokens: their gradient is the sum over the tp group. Called after the last backward."""
    grads = [grad_of(p) for p in params if getattr(p, "sequence_parallel", False) and grad_of(p) is not None]
    if dist.tp == 1 or not grads:
        return
    flat = all_reduce(torch.cat([grad.reshape(-1) for grad in grads]), dist)
    chunks = [c.view_as(grad) for grad, c in zip(grads, flat.split([grad.numel() for grad in grads]))]
    torch._foreach_copy_(grads, chunks)  # one multi-tensor kernel, not a copy per parameter


def shard(full, dist, dim):
    """This rank's contiguous slice of a full tensor along dim (every rank built the same full tensor)."""
    return full.chunk(dist.tp, dim=dim)[dist.tp_rank].clone()


def full_normal(shape, std, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_shard(weight, std, seed, dist, dim):
    """Draw the whole matrix from seed and keep this rank's slice: the model starts the same at any tp."""
    if not weight.is_meta:
        shape = list(weight.shape)
        shape[dim] *= dist.tp
        weight.copy_(shard(full_normal(shape, std, seed), dist, dim))


def _sharded(shape, dim, dist, what, hint=""):
    """An uninitialised parameter of this rank's slice of `shape`, marked so that gradient clipping sums it over
    the tensor-parallel group (see clip_grad_norm). what: the size split, for the error when it does not split."""
    local = list(shape)
    local[dim] = dist.split(shape[dim], what, hint)
    p = nn.Parameter(torch.empty(local))
    p.tp_sharded, p.tp_dim = True, dim  # tp_dim: where run/checkpoint.py merges and cuts the slices
    return p


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by columns: A = [A_1 ... A_tp]; rank r computes Y_r = f(X) A_r + b_r.
    Input [B, T, C] replicated (sequence parallel: [B, T/tp, C]) -> output [B, T, out/tp], sharded (fed to a
    RowParallelLinear, never gathered). dist.overlap: f and the matmul as ParallelMatmul, the same arithmetic."""

    def __init__(self, in_features, out_features, dist):
        super().__init__()
        self.dist = dist
        self.weight = _sharded((out_features, in_features), 0, dist, "output size")  # torch's [out, in]: split rows
        self.weight.fuse_wgrad = True  # under master weights its gradient goes straight into main_grad
        self.bias = _sharded((out_features,), 0, dist, "output size")

    @torch.no_grad()
    def reset_parameters(self, std, seed):
        init_shard(self.weight, std, seed, self.dist, 0)
        self.bias.zero_()

    def forward(self, x):  # [B, T, C] replicated, or this rank's [B, T/tp, C] under sequence parallelism
        return column_parallel_matmul(x, self.weight, self.bias, self.dist)  # [B, T, out/tp]


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split by rows (X by columns): rank r computes X_r A_r, then g sums the partial products.
    Input [B, T, in/tp] sharded -> output [B, T, out] replicated (sequence parallel: [B, T/tp, out], this rank's
    tokens). The bias is added once, after the sum."""

    def __init__(self, in_features, out_features, dist):
        super().__init__()
        self.dist = dist
        self.weight = _sharded((out_features, in_features), 1, dist, "input size")  # [out, in/tp]
        self.weight.fuse_wgrad = True
        self.bias = nn.Parameter(torch.empty(out_features))  # replicated

    @torch.no_grad()
    def reset_parameters(self, std, seed):
        init_shard(self.weight, std, seed, self.dist, 1)
        self.bias.zero_()

    def forward(self, x):  # [B, T, in/tp]
        if self.dist.overlap and overlap_helps(self.weight, self.dist, column=False):  # wgrad into main_grad
            y = ParallelMatmul.apply(x, self.weight, None, self.dist, False)
        else:
            y = F.linear(x, self.weight)  # partial sums [B, T, out]
        return g(y, self.dist) + self.bias  # -> [B, T, out] (sequence parallel: [B, T/tp, out])


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by vocabulary rows: rank r holds rows [r V/tp, (r+1) V/tp). Each rank looks up
    the ids it owns, writes zeros for the others, and g sums the partial results. Input [B, T] -> [B, T, C]
    (sequence parallel: [B, T/tp, C], this rank's tokens)."""

    def __init__(self, vocab_size, dim, dist):
        super().__init__()
        hint = f"HINT: pass --vocab_size with a multiple of {128 * dist.tp} at least the tokenizer's."
        self.weight = _sharded((vocab_size, dim), 0, dist, "vocabulary", hint)
        self.dist, self.per_rank = dist, vocab_size // dist.tp
        self.start = dist.tp_rank * self.per_rank

    def reset_parameters(self, std, seed):
        init_shard(self.weight, std, seed, self.dist, 0)

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
        # why: softmax needs the max over the whole vocabulary for a stable exp; each rank only has its slice.
        max_logit = logits.max(dim=-1).values.float()
        tdist.all_reduce(max_logit, op=tdist.ReduceOp.MAX, group=group)
        logits = logits.float() - max_logit.unsqueeze(-1)  # a new [N, V/tp] tensor: the ops below work in place
        # why: the target's logit lives on exactly one rank; the others contribute 0 to the sum.
        local = targets - start
        mine = (local >= 0) & (local < logits.size(-1))
        rows = torch.arange(logits.size(0), device=logits.device)
        target_logit = logits[rows, local.clamp(0, logits.size(-1) - 1)] * mine
        tdist.all_reduce(target_logit, group=group)
        # why: the softmax denominator sums exp over all V entries = the sum of every rank's partial sum.
        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        tdist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, mine)  # the softmax, in exp's storage
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine = ctx.saved_tensors  # d loss / d logits = softmax - one_hot(target), per rank's slice
        rows = torch.arange(softmax.size(0), device=softmax.device)
        g_logits = softmax.clone()
        g_logits[rows, local.clamp(0, softmax.size(-1) - 1)] -= mine.float()
        return g_logits.mul_(grad.unsqueeze(-1)), None, None, None


def vocab_parallel_cross_entropy(logits, targets, dist, start):
    """Mean cross-entropy of logits [N, V/tp] against targets [N] without ever gathering [N, V] on one rank."""
    if dist.tp == 1:
        return F.cross_entropy(logits.float(), targets)
    return _VocabParallelCrossEntropy.apply(logits, targets, start, dist.tp_group).mean()
