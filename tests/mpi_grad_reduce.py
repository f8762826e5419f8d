"""Run under mpiexec -n 2 by tests/test_parallel_train.py: GradReducer's bucketed, overlapped all-reduce gives the
same gradients as a plain all-reduce of every gradient after the backward; ZeroAdamW's bucketed reduce-scatter gives
each rank its slice of them. Both start every bucket's communication during the backward, not after it."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from model import Yuan  # noqa: E402
from run.config import Config  # noqa: E402
from data_parallel import GradReducer, ZeroAdamW  # noqa: E402
from distributed import init_distributed  # noqa: E402
from runtime.mpi import run_or_abort  # noqa: E402
from mpi_tp_layers import report  # noqa: E402  (tests/ is on sys.path: this script's folder)


def grads_after_two_micro_batches(model, dist, reducer, launched=None):
    torch.manual_seed(100 + dist.dp_rank)  # different data on each data-parallel rank
    for micro in range(2):
        x = torch.randint(0, 256, (2, 17))
        _, loss = model(x[:, :-1], x[:, 1:])
        if reducer is not None and micro == 1:
            reducer.start()
        (loss / 2).backward()
    if reducer is not None:
        launched.append(len(reducer.pending))  # buckets whose communication began inside the backward
        reducer.finish()
    else:
        for p in model.parameters():
            tdist.all_reduce(p.grad, group=dist.dp_group)
            p.grad /= dist.dp
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]  # ZeRO-1 frees them
    model.zero_grad(set_to_none=True)
    return grads


def main():
    dist = init_distributed(tp=1, device="cpu")
    model = Yuan(Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, seq_len=16), dist)
    plain = grads_after_two_micro_batches(model, dist, None)
    reducer, launched = GradReducer(list(model.parameters()), dist, bucket_mb=0.01), []  # ~10 KB: several buckets
    assert len(reducer.buckets) > 3, len(reducer.buckets)
    bucketed = grads_after_two_micro_batches(model, dist, reducer, launched)
    assert launched == [len(reducer.buckets)], launched
    for a, b in zip(plain, bucketed):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (a - b).abs().max()

    # ZeRO-1: the gradient of every flat bucket's slice is that slice of the plainly all-reduced gradients.
    index = {p: i for i, p in enumerate(model.parameters())}
    zero, launched = ZeroAdamW([{"params": list(model.parameters()), "weight_decay": 0.0}], dist, 0.01, lr=1e-3), []
    assert len(zero.buckets) > 3, len(zero.buckets)
    grads_after_two_micro_batches(model, dist, zero, launched)
    assert launched == [len(zero.buckets)], launched
    for b in zero.buckets:
        want = torch.zeros_like(b.flat)
        for p, o in zip(b.params, b.offsets):
            want[o:o + p.numel()] = plain[index[p]].reshape(-1)
        mine = want.chunk(dist.dp)[dist.dp_rank]
        assert torch.allclose(b.shard.grad, mine, rtol=1e-6, atol=1e-7), (b.shard.grad - mine).abs().max()
    report(dist, f"rank {dist.rank}: {len(reducer.buckets)} buckets, gradients equal to a plain all-reduce; "
                 f"ZeRO-1 {len(zero.buckets)} buckets, slices equal")


if __name__ == "__main__":
    run_or_abort(main)
