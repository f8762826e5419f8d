"""Measured memory on any device: the bytes of tensor storage alive while a TorchDispatchMode watches, and their
peak. Used to check tools/plan.py's estimates on CPU, where torch keeps no allocator statistics."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distributed import Dist
from mixed_precision import LossScaler
from train import build, train_step


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


def measured_peak(cfg, steps=2, accum=2, dist=None):
    """Peak bytes alive during the last of `steps` optimizer steps of `accum` micro-batches each, counting the model,
    the optimizer and everything autograd keeps: train.build and train.train_step, as the loop runs them, in
    cfg.dtype (bf16/fp16: working weights, fp32 masters and main gradients)."""
    dist = dist or Dist()
    torch.manual_seed(0)
    with LiveBytes() as mem:
        model, opt, reducer, clip_params = build(cfg, dist)
        scaler = LossScaler(enabled=cfg.dtype == "fp16")
        for _ in range(steps):
            mem.peak = mem.live
            batch = lambda micro: (torch.randint(0, cfg.vocab_size, (cfg.micro_batch, cfg.seq_len)),) * 2  # noqa: E731
            train_step(model, opt, reducer, scaler, clip_params, accum, cfg, dist, batch)
    return mem.peak
