"""Measured memory on any device: the bytes of tensor storage alive while a TorchDispatchMode watches, and their
peak. Used to check plan.py's estimates on CPU, where torch keeps no allocator statistics."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model import Yuan
from parallel import sync_sequence_parallel_grads


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


def measured_peak(cfg, autocast_dtype=None, steps=2, accum=2, dist=None):
    """Peak bytes alive during the last of `steps` optimizer steps of `accum` micro-batches each, counting the model,
    AdamW and everything autograd keeps (the loop of train.py: forward, backward, step, zero_grad)."""
    torch.manual_seed(0)
    with LiveBytes() as mem:
        model = Yuan(cfg, dist)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(steps):
            mem.peak = mem.live
            for _ in range(accum):
                x = torch.randint(0, cfg.vocab_size, (cfg.micro_batch, cfg.seq_len))
                with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                    loss = model(x, x)[1]
                loss.backward()
            if dist is not None:
                sync_sequence_parallel_grads(list(model.parameters()), dist)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return mem.peak
