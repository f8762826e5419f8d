"""Measured memory on any device: the bytes of tensor storage alive while a TorchDispatchMode watches, and their
peak. Used to check tools/plan.py's estimates on CPU, where torch keeps no allocator statistics. What the code
copies to the host on purpose (t.to("cpu", copy=True): a checkpoint's gathered optimizer state) is not counted, as
on a GPU it is host memory, not the device's."""
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as tdist
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from distributed import Dist
from mixed_precision import LossScaler
from run.checkpoint import save_checkpoint
from runtime.collectives import _GATHER, _SCATTER
from step import build, train_step


class LiveBytes(TorchDispatchMode):
    """Every storage an op creates inside `with LiveBytes() as m:` is counted until it is freed; m.peak is the
    largest total seen. Create the model, optimizer and data inside the block so that they are counted too."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.refs = 0, 0, {}

    def _freed(self, key, nbytes):
        self.live -= nbytes
        del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and (kwargs or {}).get("device") == torch.device("cpu"):
            return out  # t.to("cpu", copy=True): a copy to host memory, which on a GPU is not the device's
        for t in tree_flatten(out)[0]:
            if hasattr(t, "untyped_storage") and not t.is_meta:
                st = t.untyped_storage()
                key = id(st)
                if key not in self.refs and st.nbytes():
                    n = st.nbytes()
                    self.refs[key] = weakref.ref(st, lambda _, k=key, n=n: self._freed(k, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


class _Unwatched:
    """A collective's work handle whose wait() runs unwatched (see backend_buffers_unwatched)."""

    def __init__(self, work):
        self.work = work

    def wait(self, *args, **kwargs):
        with _disable_current_modes():
            return self.work.wait(*args, **kwargs)


@contextmanager
def backend_buffers_unwatched():
    """The collectives of torch.distributed, and the waits for them, run unwatched: what gloo allocates for itself
    (its reduce-scatter copies the whole input for an all-reduce, and splits it again in wait) is a CPU backend's
    own, which NCCL on a GPU does not allocate from torch's memory; the buffers our code passes in are counted."""
    names = ["all_reduce", "all_gather", "broadcast", _GATHER, _SCATTER]
    saved = {name: getattr(tdist, name) for name in names}

    def unwatched(fn):
        def call(*args, **kwargs):
            with _disable_current_modes():
                work = fn(*args, **kwargs)
            return _Unwatched(work) if kwargs.get("async_op") else work
        return call
    for name, fn in saved.items():
        setattr(tdist, name, unwatched(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(tdist, name, fn)


def measured_peak(cfg, steps=2, accum=2, dist=None, checkpoint_to=None):
    """Peak bytes alive during the last of `steps` optimizer steps of `accum` micro-batches each, counting the model,
    the optimizer and everything autograd keeps: step.build and step.train_step, as the loop runs them, in
    cfg.dtype (bf16/fp16: working weights, fp32 masters and main gradients). With checkpoint_to (a directory) a
    checkpoint is then written there as train.py writes it, and the result is (peak of the last step, peak while
    the checkpoint is gathered and written)."""
    dist = dist or Dist(overlap=cfg.overlap)
    torch.manual_seed(0)
    with backend_buffers_unwatched(), LiveBytes() as mem:
        model, opt, reducer, clip_params = build(cfg, dist)
        scaler = LossScaler(enabled=cfg.dtype == "fp16")
        for _ in range(steps):
            mem.peak = mem.live
            batch = lambda micro: (torch.randint(0, cfg.vocab_size, (cfg.micro_batch, cfg.seq_len)),) * 2  # noqa: E731
            train_step(model, opt, reducer, scaler, clip_params, accum, cfg, dist, batch)
        if checkpoint_to is None:
            return mem.peak
        train_peak, mem.peak = mem.peak, mem.live
        save_checkpoint(checkpoint_to, steps, model, opt, scaler, cfg, {"name": "memtrack", "hash": "0"}, dist)
        return train_peak, mem.peak
