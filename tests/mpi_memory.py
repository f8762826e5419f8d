"""Run under mpiexec -n 1, 2 and 4 by tests/test_plan.py: tools/plan.py's memory per GPU at data-parallel size dp =
the world, plain and ZeRO-1, in bf16 (master weights, as on a GPU), against the bytes alive on each rank
(tests/memtrack.py) during real training steps and while a checkpoint is gathered and written. The model is wide
and the micro-batch short, so that the parameters' bytes (what the data-parallel reductions and ZeRO-1 add to) and
not the activations make the peak, as for yuan-4.7b."""
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import torch.distributed as tdist  # noqa: E402

from memtrack import measured_peak  # noqa: E402
from run.config import make_config  # noqa: E402
from distributed import init_distributed  # noqa: E402
from runtime.mpi import run_or_abort  # noqa: E402
from tools.plan import estimate  # noqa: E402


def main():
    dist = init_distributed(tp=1, device="cpu")
    lines, bad = [], []
    for zero1 in (False, True):
        cfg = make_config("tiny", n_layer=2, n_embd=256, n_head=4, seq_len=64, vocab_size=2048, micro_batch=1,
                          dtype="bf16", zero1=zero1, bucket_mb=1.0)
        with tempfile.TemporaryDirectory() as out:  # only data-parallel rank 0 writes into its own
            train, ckpt = measured_peak(cfg, dist=dist, checkpoint_to=out)
        want, got = estimate(cfg, tp=1, dp=dist.world, dtype="bf16")["total_bytes"], max(train, ckpt)
        lines.append(f"dp {dist.world} zero1={zero1}: plan {want / 1e6:.2f} MB, measured {got / 1e6:.2f} MB (training "
                     f"{train / 1e6:.2f}, checkpoint {ckpt / 1e6:.2f}), plan / measured {want / got:.3f}")
        if abs(want - got) > 0.10 * got:  # the peak through a checkpoint write
            bad.append(lines[-1])
    everyone = [None] * dist.world
    if dist.world > 1:
        tdist.all_gather_object(everyone, lines)
    else:
        everyone = [lines]
    if dist.rank == 0:
        print("\n".join(f"rank {r}: {line}" for r, rank_lines in enumerate(everyone) for line in rank_lines))
    if bad:
        raise AssertionError(f"rank {dist.rank}: " + "; ".join(bad))


if __name__ == "__main__":
    run_or_abort(main)
