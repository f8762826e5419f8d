"""Collectives as the parallel layers use them, with two things that are plumbing, not parallelism: how a wait is
bounded (a deadline on gloo, the process group's own watchdog on NCCL) and torch's names for the single-buffer
collectives, which changed in torch 2.13. Called by parallel.py and data_parallel.py.
"""
import datetime

import torch.distributed as tdist


class Pending:
    """A collective in flight: wait() returns its result once it is done (see wait for how long that may take)."""

    def __init__(self, work, result, dist=None):
        self.work, self.result, self.dist = work, result, dist

    def wait(self):
        if self.work is not None:
            wait(self.work, self.dist)
        return self.result()


def wait(work, dist):
    """work.wait(), bounded by the collective timeout of dist's process layout where that costs nothing.

    gloo (CPU): an asynchronous collective's wait would otherwise wait forever for a rank that hangs, so it gets a
    deadline (dist.timeout_s, --collective_timeout_s).
    NCCL (GPU): work.wait() only makes the current CUDA stream wait for the collective's stream; the CPU goes on
    queueing kernels. A timeout would turn it into a CPU wait ("it will block the CPU thread until the NCCL work is
    completed or timed out", torch's Work.wait), draining the GPU's queue at every one of the ~81 waits of a
    tensor-parallel micro-batch. The same guarantee comes from NCCL's own means: the process group was created
    with timeout_s, and its watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, distributed.py) ends a collective that
    outlives it."""
    if dist is None or dist.device.type == "cuda":
        return work.wait()
    return work.wait(timeout=datetime.timedelta(seconds=dist.timeout_s))


# torch 2.13 names the single-buffer collectives all_gather_single / reduce_scatter_single and warns (FutureWarning)
# on the older names, all_gather_into_tensor / reduce_scatter_tensor; older releases have only those: take the new.
# Looked up by name at each call, so that a wrapper put on torch.distributed (tools/roofline.py's) sees the call.
_GATHER = "all_gather_single" if hasattr(tdist, "all_gather_single") else "all_gather_into_tensor"
_SCATTER = "reduce_scatter_single" if hasattr(tdist, "reduce_scatter_single") else "reduce_scatter_tensor"


def gather_into(out, x, group, async_op=False):
    """Every rank's x, in rank order, into the one buffer out along dim 0 (no list of tensors, so no copies)."""
    return getattr(tdist, _GATHER)(out, x, group=group, async_op=async_op)


def scatter_sum_into(out, x, group, async_op=False):
    """The sum over ranks of x, of which this rank keeps block `rank` (along dim 0) in out."""
    return getattr(tdist, _SCATTER)(out, x, group=group, async_op=async_op)
