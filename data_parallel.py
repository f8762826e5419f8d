"""Data parallelism by hand: the gradient norm across all ranks, the bucketed gradient all-reduce, and ZeRO-1.

distributed.py starts the processes, parallel.py splits the layers (tensor parallelism); this file keeps the
data-parallel replicas of those layers in step. Tested under mpiexec against one process (tests/test_parallel_train.py).
"""
import math

import torch
import torch.distributed as tdist
import torch.nn as nn

from mixed_precision import grad_of
from parallel import all_reduce, sync_sequence_parallel_grads
from runtime.collectives import Pending, gather_into, scatter_sum_into, wait


def adamw(groups, **hyper):
    """torch's AdamW with its fused kernel where this device and torch build have one."""
    try:
        return torch.optim.AdamW(groups, fused=True, **hyper)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **hyper)


def clip_grad_norm(params, max_norm, dist):
    """Global gradient norm, then clip. Sharded parameters (tp_sharded) hold different slices on each tp rank, so
    their squared norms are summed over the tensor-parallel group; replicated ones are identical on every rank and
    counted once. ZeRO-1 shards (dp_sharded) are disjoint slices on each data-parallel rank: summed over that group
    first. Every rank gets the same norm, so all agree on skipping an fp16 overflow step."""
    pairs = [(p, grad_of(p)) for p in params if grad_of(p) is not None]
    grads = [g for _, g in pairs]
    sharded = [g for p, g in pairs if getattr(p, "tp_sharded", False)]
    replicated = [g for p, g in pairs if not getattr(p, "tp_sharded", False)]
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


class Bucket:
    """Parameters whose gradients travel in one collective. grads: under master weights, the flat fp32 buffer whose
    views are the parameters' main_grad (home_main_grads), so that the collective runs on it in place. ZeRO-1 also
    gives each bucket a flat fp32 buffer of the weights: flat (the parameters, now views of it, padded to dp equal
    slices), offsets (where each starts), shard (this rank's slice, the Parameter AdamW updates), sp (a replicated
    bucket under sequence parallelism), group (its index in the optimizer's groups)."""

    def __init__(self, run):
        self.run, self.params, self.ready, self.launched = run, [], 0, False
        self.flat = self.offsets = self.shard = self.grads = None
        self.sp, self.group = False, 0


@torch.no_grad()
def flatten(tensors, multiple=1):
    """(flat, views): one new fp32 buffer holding the tensors one after the other, padded with zeros to a multiple
    of `multiple`, and a view of it in each one's shape. One copy (a cat) for the lot."""
    n = sum(t.numel() for t in tensors)
    pad = torch.zeros(-(-n // multiple) * multiple - n, device=tensors[0].device)
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors] + [pad])
    return flat, [c.view_as(t) for t, c in zip(tensors, flat[:n].split([t.numel() for t in tensors]))]


def home_main_grads(b, multiple=1):
    """Under master weights: one flat fp32 buffer (padded to a multiple of `multiple`) for bucket b's gradients,
    each parameter's main_grad a view of it, so that the bucket's collective reads and writes the gradients where
    they are: no copy into a send buffer, no copy back, and no second buffer the size of the gradients alive during
    the collective (Megatron-LM's contiguous grad buffer, torch DDP's gradient_as_bucket_view). Elsewhere (fp32,
    no main_grad) b.grads stays None."""
    if not all(hasattr(p, "main_grad") for p in b.params):
        return
    b.grads, views = flatten([p.main_grad for p in b.params], multiple)
    for p, view in zip(b.params, views):
        p.main_grad = view


class Buckets:
    """The buckets of both data-parallel reductions (GradReducer's all-reduce, ZeroAdamW's reduce-scatter). Each run
    of parameters is cut, in reverse order (the order backward produces their gradients), into buckets of about
    bucket_mb MB of fp32 gradients. After start(), a hook counts each bucket's final gradients and calls
    launch(bucket) as soon as all have arrived, so that its collective overlaps with the rest of the backward;
    launch_rest() sends the buckets that never filled (parameters without a gradient this step)."""

    def __init__(self, runs, bucket_mb, launch, hooks=True):
        self.list, self.of, self.launch, self.armed = [], {}, launch, False
        for i, run in enumerate(runs):
            size, first = 0, len(self.list)
            for p in reversed(run):
                if len(self.list) == first or size + p.numel() * 4 > bucket_mb * 2**20:
                    self.list.append(Bucket(i))
                    size = 0
                self.list[-1].params.append(p)
                self.of[p] = self.list[-1]
                size += p.numel() * 4
        if hooks:
            for p in self.of:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def __len__(self):
        return len(self.list)

    def __iter__(self):
        return iter(self.list)

    def _on_grad(self, p):
        if self.armed:
            b = self.of[p]
            b.ready += 1
            if b.ready == len(b.params):
                b.launched = True
                self.launch(b)

    def start(self):
        """Call before the backward of the last micro-batch: only then are the gradients final."""
        self.armed = True
        for b in self.list:
            b.ready, b.launched = 0, False

    def launch_rest(self):
        for b in self.list:
            if not b.launched:
                b.launched = True
                self.launch(b)
        self.armed = False


class GradReducer:
    """Average gradients over the data-parallel group, by hand: during the backward of the last micro-batch each
    bucket (class Buckets) is all-reduced asynchronously as soon as its gradients are final, overlapping
    communication with the rest of the backward; finish() waits for all of them before the optimizer step. Earlier
    micro-batches only accumulate locally: no communication. Under sequence parallelism finish() also sums the
    replicated parameters' gradients over the tp group.
    Memory: the all-reduce runs in place on one flat buffer per bucket, of which the gradients are views. Under
    master weights that buffer is the main_grads' home for the whole run (home_main_grads); in fp32 the bucket's
    .grad tensors are copied into a new buffer when the bucket is launched and become views of it, the originals
    freed: at no time do two copies of the gradients coexist, beyond one bucket (tools/plan.py counts 4 bytes)."""

    def __init__(self, params, dist, bucket_mb=25.0):
        self.dist, self.pending, self.params = dist, [], params
        self.buckets = Buckets([[p for p in params if p.requires_grad]], bucket_mb, self._launch, hooks=dist.dp > 1)
        if dist.dp > 1:
            for b in self.buckets:
                home_main_grads(b)

    def _launch(self, b):
        flat = b.grads
        if flat is None:  # fp32 .grad: gathered into one buffer, each .grad then a view of it
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in b.params])
            for p, chunk in zip(b.params, flat.split([p.numel() for p in b.params])):
                p.grad = chunk.view_as(p)  # the old .grad is freed here (a parameter unused this step: zeros)
        self.pending.append((flat, tdist.all_reduce(flat, group=self.dist.dp_group, async_op=True)))

    def start(self):
        """Call before the backward of the last micro-batch."""
        if self.dist.dp > 1:
            self.buckets.start()

    def finish(self):
        """Wait for every bucket; the gradients (views of the buckets' buffers) then hold the sums: average them."""
        if self.dist.dp > 1:
            self.buckets.launch_rest()
            for flat, work in self.pending:
                wait(work, self.dist)
                flat /= self.dist.dp
            self.pending = []
        sync_sequence_parallel_grads(self.params, self.dist)  # mean over dp, then sum over tp: the order is free


class ZeroAdamW:
    """ZeRO stage 1 (Rajbhandari et al. 2020) by hand: AdamW whose moments are sharded over the data-parallel group.

    The parameters are packed into flat fp32 buckets (class Buckets) of about bucket_mb MB, in reverse order
    (backward's), each of one weight-decay setting and tensor-parallel kind and padded to a multiple of dp; they
    become views of them. Each step:
        during the last backward: as soon as a bucket's gradients are all final, its flat gradient is
                   reduce-scattered over dp, asynchronously: this rank receives its 1/dp slice, averaged, while
                   backward goes on
        finish():  wait for every bucket (clip_grad_norm then works on the slices: their squares summed over dp)
        step():    AdamW on this rank's slices only (1/dp of the moments live here)
                   -> all-gather the updated slices: every rank has every parameter again
    It replaces GradReducer's all-reduce: a reduce-scatter plus an all-gather move the same bytes. Under master
    weights (mixed_precision.py) the flat buffers hold the fp32 masters, gradients come from main_grad, and after the
    all-gather the masters are copied into the bf16/fp16 working weights. The state_dict is
    the plain torch.optim.AdamW one (moments gathered to full size), so checkpoints do not depend on --zero1."""

    def __init__(self, groups, dist, bucket_mb=25.0, **hyper):
        self.dist, self.groups, self.pending = dist, groups, {}
        # a run of parameters for each optimizer group and kind (tp-sharded or replicated): a bucket holds one kind
        kinds = [(group, tp_kind) for group in range(len(groups)) for tp_kind in (True, False)]
        runs = [[p for p in groups[group]["params"] if getattr(p, "tp_sharded", False) == tp_kind]
                for group, tp_kind in kinds]
        self.buckets = Buckets(runs, bucket_mb, self._launch)
        for b in self.buckets:
            self._pack(b, *kinds[b.run])
            home_main_grads(b, dist.dp)  # under master weights: the reduce-scatter's input, in place
        self.inner = adamw([{"params": [b.shard], "weight_decay": groups[b.group]["weight_decay"]}
                            for b in self.buckets], **hyper)
        self.shards = [b.shard for b in self.buckets]

    @property
    def param_groups(self):  # the inner optimizer's, looked up each time: its load_state_dict replaces the list
        return self.inner.param_groups

    def _pack(self, b, group, tp_kind):
        """Bucket b's flat buffer, holding its parameters (which become views of it), and this rank's slice of it,
        a Parameter."""
        D, d = self.dist.dp, self.dist.dp_rank
        masters = [getattr(p, "master", None) for p in b.params]  # under master weights the fp32 copy is packed
        flat, views = flatten([p if m is None else m for p, m in zip(b.params, masters)], D)  # padded: dp equal slices
        offsets = [0]
        for p, m, view in zip(b.params, masters, views):
            if m is None:
                p.data = view  # the parameter now lives in the flat buffer
            else:
                p.master = view
            offsets.append(offsets[-1] + p.numel())
        offsets.pop()
        size = flat.numel() // D
        shard = nn.Parameter(flat[d * size:(d + 1) * size])  # a view: updating it updates the buffer
        shard.tp_sharded, shard.dp_sharded = tp_kind, True
        # Under sequence parallelism every replicated parameter saw only this rank's tokens (model.py): its slice's
        # gradient is summed over the tp group too. Replicated buckets have the same layout on every tp rank.
        b.group, b.flat, b.offsets, b.shard = group, flat, offsets, shard
        b.sp = not tp_kind and getattr(b.params[0], "sequence_parallel", False)

    def _launch(self, b):
        """Start the reduce-scatter of bucket b's flat gradient: under master weights b.grads itself, of which the
        main_grads are views (zeroed by zero_grad once it is done); in fp32 a buffer the .grad tensors are moved
        into (each freed as it is copied)."""
        D, flat = self.dist.dp, b.grads
        if flat is None:
            flat = torch.zeros_like(b.flat)
            for p, o in zip(b.params, b.offsets):
                if p.grad is not None:
                    flat[o:o + p.numel()].copy_(p.grad.reshape(-1))
                    p.grad = None
        if D == 1:
            self.pending[b] = Pending(None, lambda: flat)  # the whole sum is this rank's slice
        else:
            size, d = flat.numel() // D, self.dist.dp_rank
            # [n / dp]: this rank's slice of the sum. Under master weights in place, in b.grads' own slice (NCCL
            # takes an output that is the input's block `rank`, as Megatron-LM's distributed optimizer does; gloo
            # copies the input first); the main_grads there are then the sum, until zero_grad clears them.
            mine = flat[d * size:(d + 1) * size] if flat is b.grads else torch.empty(size, device=flat.device)
            work = scatter_sum_into(mine, flat, self.dist.dp_group, async_op=True)
            self.pending[b] = Pending(work, lambda: mine, self.dist)

    def start(self):
        """Call before the backward of the last micro-batch (GradReducer's interface)."""
        self.pending = {}
        self.buckets.start()

    def finish(self):
        """Wait for every bucket (launching those whose gradients never all arrived); set the slices' gradients."""
        self.buckets.launch_rest()
        for b in self.buckets:
            grad = self.pending[b].wait()
            grad /= self.dist.dp
            b.shard.grad = all_reduce(grad, self.dist) if b.sp and self.dist.tp > 1 else grad
        self.pending = {}

    def step(self):
        self.inner.step()
        if self.dist.dp > 1:  # every bucket's all-gather in flight at once, then wait for them
            works = []
            for b in self.buckets:  # in place: the input is this rank's block of the output, as NCCL allows (and
                # Megatron-LM's distributed optimizer does); gloo copies it first. No second copy of the shard.
                works.append(gather_into(b.flat, b.shard.detach(), self.dist.dp_group, async_op=True))
            for work in works:
                wait(work, self.dist)
        masters = [p for b in self.buckets for p in b.params if hasattr(p, "master")]
        if masters:
            with torch.no_grad():  # in place on the parameters
                torch._foreach_copy_(masters, [p.master for p in masters])  # rounded to bf16

    def zero_grad(self, set_to_none=True):
        self.inner.zero_grad(set_to_none=set_to_none)
        for b in self.buckets:
            if b.grads is not None:
                b.grads.zero_()  # the main_grads, ready for the next step's accumulation
            for p in b.params:
                p.grad = None

    # ZeRO-1's sharded AdamW state, saved and loaded in plain AdamW's format (run/checkpoint.py writes it)

    def _gathered(self, b, key):
        """A moment of bucket b's flat buffer at full size, on the device (a collective: every dp rank calls it)."""
        mine = self.inner.state[b.shard][key] if b.shard in self.inner.state else torch.zeros_like(b.shard)
        full = torch.empty_like(b.flat)
        if self.dist.dp > 1:  # into one buffer: a list of outputs would make NCCL allocate a flat copy of its own
            gather_into(full, mine.detach(), self.dist.dp_group)
        else:
            full.copy_(mine)
        return full

    def state_dict(self):
        """The state in torch.optim.AdamW's format for the original parameters, in the original groups' order: a
        checkpoint does not depend on --zero1. A collective: every data-parallel rank calls it; only data-parallel
        rank 0 (the one that writes the checkpoint) keeps the moments, in host memory. They are gathered one bucket's
        moment at a time and copied to the host before the next is gathered, so the device holds at most one bucket's
        moment (--bucket_mb) beyond training's own memory (tools/plan.py), not the whole model's 8 bytes per
        parameter gathered, plus their copies."""
        index = {id(p): i for i, p in enumerate(p for g in self.groups for p in g["params"])}
        keep, state = self.dist.dp_rank == 0, {}
        for b in self.buckets:
            if b.shard not in self.inner.state:
                continue
            for p in b.params if keep else ():
                state[index[id(p)]] = {"step": self.inner.state[b.shard]["step"].to("cpu", copy=True)}
            for key in ("exp_avg", "exp_avg_sq"):
                moment = self._gathered(b, key)  # [n padded]: this bucket's, on the device; every rank takes part
                for p, o in zip(b.params, b.offsets) if keep else ():  # copy=True: a copy even on the CPU device
                    state[index[id(p)]][key] = moment[o:o + p.numel()].view_as(p).to("cpu", copy=True)
                del moment  # freed before the next one is gathered
        groups = []
        for g in self.groups:
            groups.append({**{k: v for k, v in self.param_groups[0].items() if k != "params"},
                           "weight_decay": g["weight_decay"], "params": [index[id(p)] for p in g["params"]]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd):
        """Take this rank's slice of every moment from a plain AdamW state_dict (on the host, as load_checkpoint maps
        it). The slices are handed to the inner optimizer's own load_state_dict, which puts each piece of state where
        that optimizer needs it: the moments on the shard's device and dtype, and `step` on the device too where the
        optimizer is fused or capturable (torch's rule; CUDA's fused AdamW reads it there). Writing host tensors into
        self.inner.state directly would hand CPU tensors to a CUDA kernel."""
        index = {id(p): i for i, p in enumerate(p for g in self.groups for p in g["params"])}
        D, d = self.dist.dp, self.dist.dp_rank
        inner = self.inner.state_dict()  # {"state": {bucket: ...}, "param_groups": [{..., "params": [bucket]}]}
        state = {}
        for j, b in enumerate(self.buckets):
            ids = [index[id(p)] for p in b.params]
            if not all(i in sd["state"] for i in ids):
                continue
            size, st = b.flat.numel() // D, {}
            for k in ("exp_avg", "exp_avg_sq"):
                full = torch.zeros(b.flat.numel(), dtype=b.flat.dtype)  # [n padded], on the host
                for p, o, i in zip(b.params, b.offsets, ids):
                    full[o:o + p.numel()].copy_(sd["state"][i][k].reshape(-1))
                st[k] = full[d * size:(d + 1) * size].clone()
            st["step"] = sd["state"][ids[0]]["step"].clone()
            state[j] = st
        kept = ("params", "weight_decay", "fused", "foreach", "capturable", "differentiable")  # this run's own kernel
        groups = [{**g, **{k: v for k, v in sd["param_groups"][b.group].items() if k not in kept}}
                  for g, b in zip(inner["param_groups"], self.buckets)]
        self.inner.load_state_dict({"state": state, "param_groups": groups})
