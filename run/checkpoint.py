"""Checkpoints: one file per tensor-parallel rank, written atomically, the newest keep_ckpts kept; resuming from
them at the layout they were written with or at another one (resharding); one consolidated model for sample.py and
export.py. Metrics and the output directory's other files are runtime/run_dir.py's.

    OUT/ckpt_0000100.pt            tp = 1: model (fp32), optimizer (torch AdamW's format), loss scale, generators
    OUT/ckpt_0000100.tp0of2.pt     tp = 2: each tensor-parallel rank's shard (data-parallel rank 0 writes it)

A shard holds this rank's slice of every split parameter (parallel.py marks each with the dimension it is split
along, `tp_dim`: 0 for column-parallel weights and biases and the vocabulary-parallel embedding, 1 for row-parallel
weights) and a copy of every replicated one; the AdamW moments are shaped like their parameters. So a checkpoint
written at tp = T becomes one at tp = T' by concatenating each split tensor's T slices along its dimension and
cutting the result into T' slices; the data position (seed, step) and the loss scale do not depend on the layout.
Data parallelism needs nothing: data-parallel rank 0 writes the full optimizer state (ZeRO-1 gathers it first:
data_parallel.ZeroAdamW.state_dict).
"""
import os
import shutil
import sys
from dataclasses import asdict, fields, replace

import torch
import torch.distributed as tdist

from runtime.errors import UserError
from runtime.mpi import mpi_world, wait_for_every_rank
from runtime.run_dir import ckpt_files, ckpt_name
from mixed_precision import fp32_state_dict, load_fp32_state_dict
from model import ModelConfig, Yuan
from dataprep.tokenizer import copy_spec, load_tokenizer

def save_checkpoint(out, step, model, opt, scaler, cfg, tokenizer, dist, protect=None):
    """Each tensor-parallel rank writes its own shard; only data-parallel rank 0 writes (the others hold copies).
    Then the oldest beyond keep_ckpts are deleted, except step `protect` (the last one written before a run of
    skipped steps: train.py keeps it while the trouble lasts). A write that fails (full disk, quota, permission) is
    a UserError naming the path and the size; its .tmp is removed and the older checkpoints stay."""
    opt_state = opt.state_dict()  # with --zero1 a collective (the moments are gathered): every rank calls it
    if dist.dp_rank == 0:
        _write(out, step, model, opt_state, scaler, cfg, tokenizer, dist, protect)
    # The ranks that do not write would otherwise wait in the next collective while the others write (12 bytes a
    # parameter per tp rank: 56 GB for yuan-4.7b at tp 1), and a file system slower than that size over
    # --collective_timeout_s (gloo's deadline, NCCL's watchdog) would end the job. So every rank waits here, over MPI,
    # however long the write takes. (A rank whose write fails raises instead, and run_or_abort ends the job.)
    wait_for_every_rank(note=f"checkpoint of step {step}: waiting for every rank to finish writing")


def _write(out, step, model, opt_state, scaler, cfg, tokenizer, dist, protect):
    """The file of data-parallel rank 0 of each tensor-parallel rank (save_checkpoint)."""
    # The data position is (seed, step): Batches reads step s from the permuted epochs that (seed, s) determine.
    state = {"step": step, "model_config": asdict(cfg.model), "run_config": cfg.run, "tokenizer": tokenizer,
             "model": fp32_state_dict(model),
             "data_position": {"seed": cfg.seed, "next_step": step + 1},
             "layout": {"tp": dist.tp, "tp_rank": dist.tp_rank, "dp": dist.dp},
             "optimizer": opt_state, "scaler": scaler.state_dict(),
             "rng": rng_state(dist)}  # the CPU's, this rank's GPU's, the tp dropout generator's (below)
    path = os.path.join(out, ckpt_name(step, dist.tp, dist.tp_rank))
    size, free = tensor_bytes(state), shutil.disk_usage(out).free
    if free < size:
        print(f"warning: rank {dist.rank}: {path} needs about {size / 1e9:.2f} GB and {free / 1e9:.2f} GB are free",
              file=sys.stderr, flush=True)
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: the name ckpt_*.pt only ever points at a complete file
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise UserError(f"cannot write checkpoint {path} ({type(e).__name__}: {str(e)[:200]}). It needs about "
                        f"{size / 1e9:.3f} GB; {shutil.disk_usage(out).free / 1e9:.3f} GB are free there. The "
                        f"half-written file is removed and the older checkpoints are kept.\nHINT: free space (or "
                        f"point --out at a larger file system, copying the run there) and run again with --resume."
                        ) from None
    mine = [(s, p) for s, t, r, p in ckpt_files(out) if (t, r) == (dist.tp, dist.tp_rank)]
    for s, old in mine[:-cfg.keep_ckpts]:
        if s != protect:
            os.remove(old)


def tensor_bytes(tree):
    """Bytes of the tensors in nested dicts and lists: what torch.save will write, about."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return sum(tensor_bytes(t) for t in items)


def load_checkpoint(path, mmap=False):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if "model_config" not in ckpt:  # written before the Config was split in two: one flat "config"
        flat, model = ckpt.pop("config"), {f.name for f in fields(ModelConfig)}
        ckpt["model_config"] = {k: v for k, v in flat.items() if k in model}
        ckpt["run_config"] = {k: v for k, v in flat.items() if k not in model}
    return ckpt


def all_ranks(flag, dist):
    """Whether flag holds on every rank (every rank calls it), over MPI: reading a checkpoint may take any time,
    which a torch collective's deadline must not race (runtime/mpi.wait_for_every_rank)."""
    if dist.world == 1:
        return flag
    if mpi_world()[1] is None:  # torch.distributed started without MPI (tests): its own collective
        t = torch.tensor([int(flag)], device=dist.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())
    return wait_for_every_rank(flag, note="--resume: waiting for every rank to read its checkpoint")


def check_compatible(ckpt, cfg, tokenizer, path):
    """A checkpoint continues only a run of the same model shape and tokenizer."""
    saved = config_of(ckpt)  # dropout and init_std may change between the legs of a run
    diff = [f"{f.name}: checkpoint {getattr(saved, f.name)} vs now {getattr(cfg, f.name)}" for f in fields(saved)
            if f.name not in ("dropout", "init_std") and getattr(saved, f.name) != getattr(cfg, f.name)]
    if diff:
        raise UserError(f"checkpoint {path} is from another model config:\n  " + "\n  ".join(diff) +
                        "\nHINT: use the same --preset and overrides as the run that wrote it, or another --out.")
    if ckpt["tokenizer"]["hash"] != tokenizer["hash"]:
        raise UserError(f"checkpoint {path} was trained with tokenizer {ckpt['tokenizer']['name']}, but the data "
                        f"was prepared with {tokenizer['name']} (different hash).\nHINT: pass the --data it was "
                        f"trained on.")


def complete_steps(out):
    """{step: [tensor-parallel sizes at which every shard of that step is on disk]}, oldest first."""
    shards = {}
    for step, t, r, _ in ckpt_files(out):
        shards.setdefault((step, t), set()).add(r)
    steps = {}
    for (step, t), ranks in sorted(shards.items()):
        if len(ranks) == t:
            steps.setdefault(step, []).append(t)
    return steps


def config_of(ckpt):
    """The ModelConfig a checkpoint was written with: what rebuilds its network."""
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})


def split_dims(cfg):
    """{parameter name: the dimension its tensor-parallel slices are cut along, or None for a replicated one}, and
    the names in the optimizer's order (step.build: matrices and embeddings first, then the rest). From the model
    built on the meta device: nothing allocated."""
    with torch.device("meta"):
        model = Yuan(replace(cfg, dropout=0.0))
    named = list(model.named_parameters())
    order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
    return {n: getattr(p, "tp_dim", None) for n, p in named}, order


def reshard(shards, tp, tp_rank):
    """Rank tp_rank's checkpoint at tensor-parallel size tp, from every shard (in rank order) of one written at
    another size: model and AdamW moments merged and cut again; everything else from shard 0. The dropout
    generator of a tensor-parallel rank that did not exist is left as seeded (its masks differ from an
    uninterrupted run's; with dropout 0, the default, nothing does)."""
    dims, order = split_dims(config_of(shards[0]))

    def cut(name, tensors):
        dim = dims.get(name)
        if dim is None:
            return tensors[0]
        return torch.cat(tensors, dim).chunk(tp, dim)[tp_rank].clone()

    model = {name: cut(name, [s["model"][name] for s in shards]) for name in shards[0]["model"]}
    state = {i: {k: v if k == "step" else cut(order[i], [s["optimizer"]["state"][i][k] for s in shards])
                 for k, v in st.items()} for i, st in shards[0]["optimizer"]["state"].items()}
    tp_rng = shards[tp_rank]["rng"]["tp"] if tp_rank < len(shards) else torch.zeros(0, dtype=torch.uint8)
    return {**shards[0], "model": model, "optimizer": {**shards[0]["optimizer"], "state": state},
            "rng": {**shards[0]["rng"], "tp": tp_rng}, "layout": {**shards[0]["layout"], "tp": tp, "tp_rank": tp_rank}}


def load_step(out, step, written_tp, tp, tp_rank):
    """This rank's checkpoint of `step` at tp: its own file if the step was written at tp, else resharded from
    every file of the layout it was written at (memory-mapped: only the slices needed are read)."""
    if written_tp == tp:
        paths = [os.path.join(out, ckpt_name(step, tp, tp_rank))]
    else:
        paths = [os.path.join(out, ckpt_name(step, written_tp, r)) for r in range(written_tp)]
    shards = [load_checkpoint(p, mmap=True) for p in paths]  # read as used; the ranks of a node share the pages
    for path, shard in zip(paths, shards):
        if shard["step"] != step:
            raise UserError(f"checkpoint {path} says it is step {shard['step']}")
    return (shards[0] if written_tp == tp else reshard(shards, tp, tp_rank)), paths[0]


def run_tokenizer(run, ckpt):
    """The tokenizer (dataprep/tokenizer.py) and identity a checkpoint was trained with: the copy train.py keeps in
    the run's directory (or the built-in of that name), checked against the checkpoint's hash."""
    spec = copy_spec(run, ckpt["tokenizer"])
    enc, tok = load_tokenizer(spec)
    if tok["hash"] != ckpt["tokenizer"]["hash"]:
        raise UserError(f"{spec} is not the tokenizer the checkpoint of step {ckpt['step']} was trained with (hash "
                        f"differs).")
    return enc, tok


def saved_vocab_size(out):
    """The padded vocabulary of the newest complete checkpoint in out, or None: a resumed run keeps it (the padding
    to 128 * tp of a fresh run would differ at another tp, and the embedding's rows with it)."""
    steps = complete_steps(out)
    if not steps:
        return None
    step = max(steps)
    try:
        ckpt = load_checkpoint(os.path.join(out, ckpt_name(step, steps[step][-1], 0)), mmap=True)
    except UserError:
        return None  # resume() names the unreadable file and falls back
    return ckpt["model_config"]["vocab_size"]


def consolidated(out, step=None):
    """One checkpoint of the whole model (tp = 1) from the newest complete step in out, or `step`, whatever layout
    wrote it. Returns (checkpoint, a description of where it came from)."""
    steps = complete_steps(out)
    if not steps:
        hint = "some shards are missing" if ckpt_files(out) else "there is none"
        raise UserError(f"no complete checkpoint (ckpt_*.pt) in {out}: {hint}.\nHINT: train first (python train.py "
                        f"--out {out} ...), or point --out at the run's directory.")
    if step is None:
        step = max(steps)
    if step not in steps:
        raise UserError(f"no complete checkpoint of step {step} in {out}; complete steps: {sorted(steps)}.")
    written = steps[step][0]
    ckpt, path = load_step(out, step, written, 1, 0)
    where = path if written == 1 else f"{path} and the other {written - 1} shard(s), merged"
    return ckpt, where


def load_model(out=None, step=None, path=None):
    """For sample.py: (the model in eval mode, fp32, one process; its tokenizer (dataprep/tokenizer.py) and that
    tokenizer's identity; the checkpoint's step; where it came from). From the checkpoint file `path` (tp = 1), or
    the newest complete step in out (or `step`) whatever layout wrote it, merged."""
    if path:
        ckpt, where = load_checkpoint(path), path
        if ckpt["layout"]["tp"] > 1:
            raise UserError(f"{path} is one of {ckpt['layout']['tp']} tensor-parallel shards.\nHINT: pass "
                            f"--out DIR (and --step N): every shard is then merged.")
    else:
        ckpt, where = consolidated(out, step)
    enc, tok = run_tokenizer(os.path.dirname(path) if path else out, ckpt)
    model = Yuan(replace(config_of(ckpt), dropout=0.0))
    model.load_state_dict(ckpt["model"])
    return model.eval(), enc, tok, ckpt["step"], where


def resume(out, model, opt, scaler, cfg, tokenizer, dist):
    """--resume: load the newest checkpoint whose every shard every rank can read (model, optimizer, loss scale,
    every generator) and return its step; 0 when out holds none. An unreadable newest one (truncated by a crash, a
    full disk) is named, and the next older one is tried. A checkpoint written at another tensor-parallel size is
    resharded to this one."""
    steps = complete_steps(out)
    if not steps:
        if ckpt_files(out):
            raise UserError(f"{out} holds checkpoint shards but no step with all of its shards "
                            f"({', '.join(os.path.basename(p) for *_, p in ckpt_files(out))}).\nHINT: copy the missing "
                            f"shards back, or start again with --overwrite.")
        dist.print0(f"--resume: no checkpoint in {out}, starting from step 0")
        return 0
    newest, ckpt = max(steps), None
    for step in sorted(steps, reverse=True):  # every rank walks the same steps (the complete ones) in the same order
        written = dist.tp if dist.tp in steps[step] else steps[step][-1]
        try:
            ckpt, path = load_step(out, step, written, dist.tp, dist.tp_rank)
        except UserError as e:
            print(f"rank {dist.rank}: {e}", file=sys.stderr, flush=True)
            ckpt = None
        if all_ranks(ckpt is not None, dist):
            break
        ckpt = None
    if ckpt is None:
        raise UserError(f"no checkpoint in {out} can be read by every rank (the reasons are above).\nHINT: move the "
                        f"broken files away and --resume from what is left, or start again with --overwrite.")
    check_compatible(ckpt, cfg, tokenizer, path)
    load_fp32_state_dict(model, ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], dist, cfg.seed)  # on this rank's device only (below)
    saved = {**ckpt["model_config"], **ckpt["run_config"]}
    changed = [k for k, v in saved.items() if k not in ("max_steps", "tp") and getattr(cfg, k, v) != v]
    if step != newest:
        dist.print0(f"--resume: the newest checkpoint (step {newest}) cannot be read; falling back to step {step}")
    if written != dist.tp:
        dist.print0(f"--resume: step {step} was written at tp {written}; resharded to tp {dist.tp}" +
                    (" (dropout masks of the new tp ranks differ from an uninterrupted run's)" if cfg.dropout else ""))
    dist.print0(f"resumed from {path} at step {step}" + (f" (changed: {', '.join(changed)})" if changed else ""))
    return step


# ------------------------------------------------------------------------------------------------------------------
# The random generators a checkpoint keeps


def rng_state(dist):
    """The generators a checkpoint keeps for this rank: the CPU's, this rank's own GPU's (no other GPU's: a run
    resumed on fewer GPUs could not take them back, and each GPU would get the writer's state) and the
    tensor-parallel dropout generator's. Empty tensors for the ones this run has not (no GPU; tp == 1)."""
    none = torch.zeros(0, dtype=torch.uint8)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else none,
            "tp": dist.rng.state if dist.rng.state is not None else none}


def restore_rng(saved, dist, seed):
    """Put back what rng_state saved, on this rank's device only. A checkpoint written before issue 27 holds a list
    (every visible GPU's state): this device's entry is taken if there is one, else the first. A tensor-parallel
    generator state that does not fit this device's generator (written on the CPU, resumed on a GPU, or the other
    way) is replaced by a fresh run's seeding (seed, as step.build seeds it)."""
    torch.set_rng_state(saved["torch"])
    cuda = saved["cuda"]
    if isinstance(cuda, (list, tuple)):  # the old format: every GPU's state, by index ([] where torch saw none)
        states, index = cuda, dist.device.index or 0
        cuda = states[index] if index < len(states) else (states[0] if states else torch.zeros(0, dtype=torch.uint8))
    if dist.device.type == "cuda" and cuda.numel():
        torch.cuda.set_rng_state(cuda, dist.device)
    if dist.tp == 1 or not saved["tp"].numel():  # no tp generator here, or none saved: it stays as seeded
        return
    if dist.rng.fits(saved["tp"]):
        dist.rng.state = saved["tp"]
        return
    dist.rng.seed(seed)
    dist.print0(f"note: --resume: the saved tensor-parallel dropout generator ({saved['tp'].numel()} bytes) was "
                f"written on another kind of device and does not fit this {dist.device.type} run's, so it is seeded as "
                f"a fresh run's: the masks of tp-local dropout differ from an uninterrupted run's (with dropout 0, the "
                f"default, nothing differs)")
