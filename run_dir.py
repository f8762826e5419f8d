"""The run's output directory: checkpoints (one file per tensor-parallel rank, written atomically, the newest
keep_ckpts kept), resuming from them, metrics.jsonl, and the refusal to start a new run over an old one. train.py
calls these; sample.py reads the checkpoints.

    OUT/ckpt_0000100.pt            tp = 1: model (fp32), optimizer (torch AdamW's format), loss scale, generators
    OUT/ckpt_0000100.tp0of2.pt     tp = 2: each tensor-parallel rank's shard (data-parallel rank 0 writes it)
    OUT/metrics.jsonl              one JSON object per line (metrics.rewound.jsonl: rows a resume rewound)
    OUT/config.json, tokenizer.*   a record of the run, and the tokenizer for sample.py
"""
import json
import os
import re
import shutil
import sys
from dataclasses import asdict

import torch
import torch.distributed as tdist

from errors import UserError
from mixed_precision import fp32_state_dict, load_fp32_state_dict
from model import MODEL_FIELDS

CKPT_RE = re.compile(r"^ckpt_(\d{7})(?:\.tp(\d+)of(\d+))?\.pt$")  # ckpt_0000100.pt, ckpt_0000100.tp1of2.pt


def ckpt_name(step, tp=1, tp_rank=0):
    return f"ckpt_{step:07d}.pt" if tp == 1 else f"ckpt_{step:07d}.tp{tp_rank}of{tp}.pt"


def ckpt_files(out):
    """[(step, tp, tp_rank, path)] of every complete checkpoint file in out (a half-written one is still *.tmp)."""
    files = []
    for name in os.listdir(out) if os.path.isdir(out) else []:
        m = CKPT_RE.match(name)
        if m:
            files.append((int(m[1]), int(m[3] or 1), int(m[2] or 0), os.path.join(out, name)))
    return sorted(files)


def checkpoints(out, tp=1, tp_rank=0):
    """{step: this tp rank's file} for the steps whose every tensor-parallel shard is on disk, oldest first."""
    shards = {}
    for step, t, r, _ in ckpt_files(out):
        if t == tp:
            shards.setdefault(step, set()).add(r)
    return {s: os.path.join(out, ckpt_name(s, tp, tp_rank)) for s, ranks in shards.items() if len(ranks) == tp}


def save_checkpoint(out, step, model, opt, scaler, cfg, tokenizer, dist, protect=None):
    """Each tensor-parallel rank writes its own shard; only data-parallel rank 0 writes (the others hold copies).
    Then the oldest beyond keep_ckpts are deleted, except step `protect` (the last one written before a run of
    skipped steps: train.py keeps it while the trouble lasts). A write that fails (full disk, quota, permission) is
    a UserError naming the path and the size; its .tmp is removed and the older checkpoints stay."""
    opt_state = opt.state_dict()  # with --zero1 a collective (the moments are gathered): every rank calls it
    if dist.dp_rank != 0:
        return
    # The data position is (seed, step): Batches reads step s from the permuted epochs that (seed, s) determine.
    state = {"step": step, "config": asdict(cfg), "tokenizer": tokenizer, "model": fp32_state_dict(model),
             "data_position": {"seed": cfg.seed, "next_step": step + 1},
             "layout": {"tp": dist.tp, "tp_rank": dist.tp_rank, "dp": dist.dp},
             "optimizer": opt_state, "scaler": scaler.state_dict(),
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "tp": dist.rng.state if dist.rng.state is not None else torch.zeros(0, dtype=torch.uint8)}}
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


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None


def all_ranks(flag, dist):
    """Whether flag holds on every rank (a collective: every rank calls it)."""
    if dist.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return bool(t.item())


def check_compatible(ckpt, cfg, tokenizer, path):
    """A checkpoint continues only a run of the same model shape and tokenizer."""
    diff = [f"{k}: checkpoint {ckpt['config'][k]} vs now {getattr(cfg, k)}"
            for k in MODEL_FIELDS if ckpt["config"][k] != getattr(cfg, k)]
    if diff:
        raise UserError(f"checkpoint {path} is from another model config:\n  " + "\n  ".join(diff) +
                        "\nHINT: use the same --preset and overrides as the run that wrote it, or another --out.")
    if ckpt["tokenizer"]["hash"] != tokenizer["hash"]:
        raise UserError(f"checkpoint {path} was trained with tokenizer {ckpt['tokenizer']['name']}, but the data "
                        f"was prepared with {tokenizer['name']} (different hash).\nHINT: pass the --data it was "
                        f"trained on.")


class Metrics:
    """OUT/metrics.jsonl, one JSON object per line. On resume, rows past the checkpoint's step (written after it,
    before the interruption) are moved to metrics.rewound.jsonl, so metrics.jsonl reads as one clean run."""

    def __init__(self, out, resume_step, enabled=True):
        self.file = None
        if not enabled:  # logging happens on rank 0 only
            return
        self.path = os.path.join(out, "metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [line for line in f if line.strip()]
            keep = [r for r in rows if json.loads(r)["step"] <= resume_step]
            if len(keep) < len(rows):
                with open(os.path.join(out, "metrics.rewound.jsonl"), "a") as f:
                    f.writelines(r for r in rows if json.loads(r)["step"] > resume_step)
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(keep)
                os.replace(self.path + ".tmp", self.path)
                print(f"metrics: {len(rows) - len(keep)} rows after step {resume_step} moved to metrics.rewound.jsonl")
        self.file = open(self.path, "a")

    def log(self, **row):
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def prepare_out_dir(out, resume, overwrite, dist):
    """Refuse to start a fresh run over an earlier one unless told to (--resume or --overwrite)."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: pass one of them.")
    os.makedirs(out, exist_ok=True)
    if dist.rank != 0:  # rank 0 decides; if it refuses, run_or_abort ends every rank
        return
    names = sorted(os.listdir(out))
    old = [n for n in names if CKPT_RE.match(n) or n.startswith("metrics.") and n.endswith(".jsonl")]
    if old and not resume:
        if not overwrite:
            raise UserError(f"{out} already holds a run ({', '.join(old)}).\n"
                            f"HINT: --resume to continue it, --overwrite to delete it, or another --out.")
        old += [n for n in names if n in ("config.json", "tokenizer.tiktoken", "tokenizer.json")]
        for name in old:
            os.remove(os.path.join(out, name))
        print(f"--overwrite: deleted {len(old)} files of the earlier run in {out}")


def resume(out, model, opt, scaler, cfg, tokenizer, dist):
    """--resume: load the newest checkpoint whose every shard every rank can read (model, optimizer, loss scale,
    every generator) and return its step; 0 when out holds none. An unreadable newest one (truncated by a crash, a
    full disk) is named, and the next older one is tried. Checkpoints of another tp size are refused."""
    ckpts = checkpoints(out, dist.tp, dist.tp_rank)
    if not ckpts:
        if ckpt_files(out):
            layouts = sorted({t for _, t, _, _ in ckpt_files(out)})
            raise UserError(f"{out} holds checkpoints written at tensor-parallel size {layouts}, this run has "
                            f"tp = {dist.tp}; resharding is not supported.\nHINT: resume with --tp {layouts[-1]}.")
        dist.print0(f"--resume: no checkpoint in {out}, starting from step 0")
        return 0
    newest, ckpt = max(ckpts), None
    for step in sorted(ckpts, reverse=True):  # every rank walks the same steps (the complete ones) in the same order
        path = ckpts[step]
        try:
            ckpt = load_checkpoint(path)
            if ckpt["step"] != step:
                raise UserError(f"checkpoint {path} says it is step {ckpt['step']}")
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
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and dist.device.type == "cuda":
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    if ckpt["rng"]["tp"].numel():
        dist.rng.state = ckpt["rng"]["tp"]
    changed = [k for k, v in ckpt["config"].items() if k != "max_steps" and getattr(cfg, k, v) != v]
    if step != newest:
        dist.print0(f"--resume: the newest checkpoint (step {newest}) cannot be read; falling back to step {step}")
    dist.print0(f"resumed from {path} at step {step}" + (f" (changed: {', '.join(changed)})" if changed else ""))
    return step
