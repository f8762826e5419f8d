"""Run under mpiexec by tests/test_parallel.py: each tensor-parallel layer against the unsharded computation,
forward and every gradient, with co-prime sizes (13, 17, 7 x tp) so a transposed or mis-sliced shard fails; the
same with sequence parallelism; the whole model with and without sequence parallelism. First the two
sequence-parallel collectives on their own.

    mpiexec -n 2 python tests/mpi_tp_layers.py TP [cpu|cuda]     (cpu, gloo, by default; cuda: NCCL, one GPU a rank)
"""
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as model_py  # noqa: E402
import parallel  # noqa: E402
from distributed import init_distributed  # noqa: E402
from runtime.mpi import run_or_abort  # noqa: E402
from model import ModelConfig, Yuan  # noqa: E402
from parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, all_gather_seq,  # noqa: E402
                      f, reduce_scatter_seq, sync_sequence_parallel_grads, vocab_parallel_cross_entropy)


def close(name, a, b, rtol=1e-5, atol=1e-6):
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{name}: max difference {(a - b).abs().max().item():.3g}")


def report(dist, line):
    """Rank 0 prints every rank's line, so that the launcher cannot interleave them mid-line."""
    lines = [None] * dist.world
    tdist.all_gather_object(lines, line)
    if dist.rank == 0:
        print("\n".join(lines), flush=True)


def on_gpu(dist):
    """Make every tensor below a GPU tensor without editing each line: the default device becomes the rank's GPU,
    and the full weights are still drawn from full_normal's CPU generator (the same numbers as on the CPU), then
    copied over. Both modules that call full_normal see the wrapper."""
    torch.set_default_device(dist.device)
    cpu_full_normal = parallel.full_normal

    def full_normal_on_gpu(shape, std, seed):
        with torch.device("cpu"):
            return cpu_full_normal(shape, std, seed).to(dist.device)

    parallel.full_normal = model_py.full_normal = full_normal_on_gpu
    return full_normal_on_gpu


def check_collectives(dist):
    """all_gather_seq and reduce_scatter_seq against torch.cat / chunk of an all-reduced tensor, synchronous and
    asynchronous: B = 1 (the copy-free path, yuan-4.7b's micro-batch) and B = 3 (the path with one copy), T = 5 tp,
    width 7, and a non-contiguous input to the reduce-scatter."""
    tp, r = dist.tp, dist.tp_rank
    for B in (1, 3):
        full = torch.randn(B, 5 * tp, 7)  # the same on every rank
        partial = torch.randn(B, 7, 5 * tp).transpose(1, 2) * (r + 1) + r  # [B, T, 7], different on every rank
        total = partial.contiguous()
        tdist.all_reduce(total, group=dist.tp_group)  # the reference sum, sliced below
        for async_op in (False, True):
            got = all_gather_seq(full.chunk(tp, dim=1)[r].contiguous(), dist, async_op=async_op)
            got = got.wait() if async_op else got
            assert got.shape == (B, 5 * tp, 7), got.shape
            close(f"all_gather_seq B={B} async={async_op}", got, torch.cat(full.chunk(tp, dim=1), dim=1))
            got = reduce_scatter_seq(partial, dist, async_op=async_op)
            got = got.wait() if async_op else got
            assert got.shape == (B, 5, 7), got.shape
            close(f"reduce_scatter_seq B={B} async={async_op}", got, total.chunk(tp, dim=1)[r])


def main():
    device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    dist = init_distributed(tp=int(sys.argv[1]), device=device)
    full_normal = on_gpu(dist) if dist.device.type == "cuda" else parallel.full_normal
    tp, r = dist.tp, dist.tp_rank
    mine = lambda t, dim: t.chunk(tp, dim=dim)[r]  # noqa: E731
    torch.manual_seed(0)  # the same inputs on every rank
    check_collectives(dist)

    # Column-parallel: [3, 13] -> [3, 7 tp], sharded output.
    x = torch.randn(3, 13, requires_grad=True)
    w_out = torch.randn(3, 7 * tp)
    full = full_normal((7 * tp, 13), 0.02, seed=1).requires_grad_()
    (F.linear(x, full) * w_out).sum().backward()
    col = ColumnParallelLinear(13, 7 * tp, dist)
    col.reset_parameters(0.02, seed=1)
    xs = x.detach().clone().requires_grad_()
    y = col(xs)
    close("column forward", y, mine(F.linear(x, full), 1))
    (y * mine(w_out, 1)).sum().backward()
    close("column grad x (f all-reduces it)", xs.grad, x.grad)
    close("column grad weight", col.weight.grad, mine(full.grad, 0))
    close("column grad bias", col.bias.grad, mine(w_out.sum(0), 0))

    # Row-parallel: [3, 7 tp] sharded -> [3, 17], replicated output.
    x = torch.randn(3, 7 * tp, requires_grad=True)
    w_out = torch.randn(3, 17)
    full = full_normal((17, 7 * tp), 0.02, seed=2).requires_grad_()
    (F.linear(x, full) * w_out).sum().backward()
    row = RowParallelLinear(7 * tp, 17, dist)
    row.reset_parameters(0.02, seed=2)
    xs = mine(x.detach(), 1).clone().requires_grad_()
    y = row(xs)
    close("row forward (g sums partial products)", y, F.linear(x, full))
    (y * w_out).sum().backward()
    close("row grad x", xs.grad, mine(x.grad, 1))
    close("row grad weight", row.weight.grad, mine(full.grad, 1))
    close("row grad bias", row.bias.grad, w_out.sum(0))

    # Vocab-parallel embedding: vocabulary 17 tp, width 13.
    ids = torch.randint(0, 17 * tp, (4, 5))
    w_out = torch.randn(4, 5, 13)
    full = full_normal((17 * tp, 13), 0.02, seed=3).requires_grad_()
    (F.embedding(ids, full) * w_out).sum().backward()
    emb = VocabParallelEmbedding(17 * tp, 13, dist)
    emb.reset_parameters(0.02, seed=3)
    y = emb(ids)
    close("embedding forward", y, F.embedding(ids, full))
    (y * w_out).sum().backward()
    close("embedding grad", emb.weight.grad, mine(full.grad, 0))

    # Sequence parallelism: the same layers, with activations outside the matmuls split along T = 5 tp.
    x = torch.randn(2, 5 * tp, 13, requires_grad=True)
    w_out = torch.randn(2, 5 * tp, 7 * tp)
    full = full_normal((7 * tp, 13), 0.02, seed=1).requires_grad_()
    (F.linear(x, full) * w_out).sum().backward()
    sp_dist = replace(dist, sequence_parallel=True)  # the same ranks and groups, the layout with sequence parallelism
    col = ColumnParallelLinear(13, 7 * tp, sp_dist)
    col.reset_parameters(0.02, seed=1)
    xs = mine(x.detach(), 1).clone().requires_grad_()  # [2, 5, 13]: this rank's tokens
    y = col(xs)  # [2, 5 tp, 7]: every token, this rank's columns
    close("sequence-parallel column forward (all-gather along T)", y, mine(F.linear(x, full), 2))
    (y * mine(w_out, 2)).sum().backward()
    close("sequence-parallel column grad x (reduce-scatter)", xs.grad, mine(x.grad, 1))
    close("sequence-parallel column grad weight", col.weight.grad, mine(full.grad, 0))

    x = torch.randn(2, 5 * tp, 7 * tp, requires_grad=True)
    w_out = torch.randn(2, 5 * tp, 17)
    full = full_normal((17, 7 * tp), 0.02, seed=2).requires_grad_()
    bias = torch.zeros(17, requires_grad=True)
    (F.linear(x, full, bias) * w_out).sum().backward()
    row = RowParallelLinear(7 * tp, 17, sp_dist)
    row.reset_parameters(0.02, seed=2)
    row.bias.sequence_parallel = True
    xs = mine(x.detach(), 2).clone().requires_grad_()
    y = row(xs)  # [2, 5, 17]: this rank's tokens, summed over the ranks' partial products
    close("sequence-parallel row forward (reduce-scatter along T)", y, mine(F.linear(x, full), 1))
    (y * mine(w_out, 1)).sum().backward()
    close("sequence-parallel row grad x (all-gather)", xs.grad, mine(x.grad, 2))
    close("sequence-parallel row grad weight", row.weight.grad, mine(full.grad, 1))
    sync_sequence_parallel_grads([row.bias], dist)
    close("sequence-parallel row grad bias, summed over tp", row.bias.grad, bias.grad)

    # The fused column matmul in bf16 (working weights, as the trainer runs it) against the textbook f then F.linear.
    x = torch.randn(2, 5 * tp, 13, dtype=torch.bfloat16, requires_grad=True)
    w_out = torch.randn(2, 5 * tp, 7)
    col = ColumnParallelLinear(13, 7 * tp, dist)
    col.reset_parameters(0.02, seed=1)
    col.to(torch.bfloat16)
    w_ref, b_ref = (t.detach().clone().requires_grad_() for t in (col.weight, col.bias))
    y, y_ref = col(x), F.linear(f(x, dist), w_ref, b_ref)
    (y.float() * w_out).sum().backward()
    x_grad, x.grad = x.grad, None
    (y_ref.float() * w_out).sum().backward()
    assert y.dtype == col.weight.grad.dtype == x_grad.dtype == torch.bfloat16
    close("fused column matmul, bf16 forward", y.float(), y_ref.float())
    close("fused column matmul, bf16 grad x", x_grad, x.grad, rtol=1e-2, atol=1e-3)
    close("fused column matmul, bf16 grad weight", col.weight.grad, w_ref.grad, rtol=1e-2, atol=1e-3)
    close("fused column matmul, bf16 grad bias", col.bias.grad, b_ref.grad, rtol=1e-2, atol=1e-3)

    # --overlap (ParallelMatmul, one step) against the plain path (f, F.linear; F.linear, g) in fp32, with and
    # without sequence parallelism: the same forward and gradients within 1e-6.
    for sp in (False, True):
        x = torch.randn(2, 5 * tp if not sp else 5, 13)
        w_out = torch.randn(2, 5 * tp if not sp else 5, 13)
        outs = []
        for overlap in (True, False):
            layout = replace(dist, sequence_parallel=sp, overlap=overlap)
            col = ColumnParallelLinear(13, 7 * tp, layout)
            row = RowParallelLinear(7 * tp, 13, layout)
            col.reset_parameters(0.02, seed=1)
            row.reset_parameters(0.02, seed=2)
            xi = x.clone().requires_grad_()
            y = row(torch.nn.functional.gelu(col(xi)))
            (y * w_out).sum().backward()
            outs.append([y, xi.grad, col.weight.grad, col.bias.grad, row.weight.grad])
        for name, a, b in zip(("forward", "grad x", "grad column weight", "grad column bias", "grad row weight"),
                              *outs):
            close(f"--overlap against the plain path{' (sequence parallel)' if sp else ''}, {name}", a, b,
                  rtol=0, atol=1e-6)

    # Vocab-parallel cross-entropy: 13 rows, vocabulary 17 tp, against F.cross_entropy on the full logits.
    logits = (torch.randn(13, 17 * tp) * 3).requires_grad_()
    targets = torch.randint(0, 17 * tp, (13,))
    F.cross_entropy(logits, targets).backward()
    local = mine(logits.detach(), 1).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, dist, start=r * 17)
    close("cross-entropy", loss, F.cross_entropy(logits.detach(), targets))
    loss.backward()
    close("cross-entropy grad", local.grad, mine(logits.grad, 1))
    # Dropout: the residual stream is replicated, so its dropout masks must agree across the tp group (global
    # generator, same seed); attention dropout on each rank's own heads runs on the rank's forked generator.
    model = Yuan(ModelConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=512, seq_len=16, dropout=0.3), dist)
    torch.manual_seed(5)
    dist.rng.seed(5)
    seen = {}
    model.ln_f.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0].detach()))
    ids = torch.randint(0, 512, (2, 16))
    model(ids, ids)
    copies = [torch.empty_like(seen["x"]) for _ in range(tp)]
    tdist.all_gather(copies, seen["x"].contiguous(), group=dist.tp_group)
    for c in copies:
        close("replicated activations after dropout", c, seen["x"])

    # The whole model, with and without sequence parallelism: the same loss and, once the replicated parameters'
    # gradients are summed over tp, the same gradients.
    ids = torch.randint(0, 512, (2, 4 * tp))
    grads = []
    for sp in (False, True):
        model = Yuan(ModelConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=512, seq_len=4 * tp),
                     replace(dist, sequence_parallel=sp))
        loss = model(ids, ids)[1]
        loss.backward()
        sync_sequence_parallel_grads(list(model.parameters()), dist)
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    close("sequence-parallel model loss", grads[1][0], grads[0][0])
    for name, grad in grads[0][1].items():
        close(f"sequence-parallel model grad {name}", grads[1][1][name], grad)
    report(dist, f"rank {dist.rank} (tp_rank {r}, dp_rank {dist.dp_rank}): all tensor-parallel layers match "
                 f"({tdist.get_backend()})")


if __name__ == "__main__":
    run_or_abort(main)
