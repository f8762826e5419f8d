"""What a run leaves for people to look at: the output directory's metrics.jsonl and TensorBoard events, the
console (a progress bar on a terminal, plain lines in a batch log), and the refusal to start a new run over an old
one. Its checkpoints are run/checkpoint.py's.

    OUT/ckpt_*.pt                  checkpoints (run/checkpoint.py)
    OUT/metrics.jsonl              one JSON object per line (metrics.rewound.jsonl: rows a resume rewound)
    OUT/tensorboard/               TensorBoard event files (`tensorboard --logdir OUT`)
    OUT/config.json, tokenizer.*   a record of the run, and the tokenizer for sample.py
    OUT/.lock                      held by the live run's rank 0: one run per output directory
"""
import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time

from runtime.errors import UserError

# The checkpoint files' names (run/checkpoint.py writes and reads them; prepare_out_dir protects them)
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


TB_TAGS = {"loss": "loss/train", "val_loss": "loss/val", "lr": "lr", "grad_norm": "grad_norm",
           "tokens_per_s": "speed/tokens_per_s", "mfu": "speed/mfu", "loss_scale": "loss_scale", "skipped": "skipped"}


def tensorboard_writer(out, resume_step, asked):
    """A SummaryWriter on OUT/tensorboard, or None. asked: True (--tensorboard true: the package must be there),
    None (the default: on when the `tensorboard` package is installed), False (off). purge_step hides the events an
    interrupted run wrote after the checkpoint it is resumed from, as metrics.jsonl moves its rows."""
    if asked is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if asked:
            raise UserError("--tensorboard true, but the `tensorboard` package is not installed.\nHINT: "
                            ".venv/bin/pip install tensorboard, or --tensorboard false.") from None
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"), purge_step=resume_step + 1 if resume_step else None)


class Metrics:
    """OUT/metrics.jsonl, one JSON object per line. On resume, rows past the checkpoint's step (written after it,
    before the interruption) are moved to metrics.rewound.jsonl, so metrics.jsonl reads as one clean run."""

    def __init__(self, out, resume_step, enabled=True, tensorboard=None):
        self.file = self.tb = None
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
        self.tb = tensorboard_writer(out, resume_step, tensorboard)

    def log(self, **row):
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, tag in TB_TAGS.items():
                if row.get(key) is not None:
                    self.tb.add_scalar(tag, float(row[key]), row["step"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Score:
    """ASC22's score: a number of tokens trained as fast as possible, with the validation loss at or under a target
    (--target_loss). Records when the validation loss first reaches the target (step, tokens, wall time) as a
    metrics.jsonl row, and ends the run with one line: N tokens in T at X tokens/s; final validation loss Y; target L
    met or not met. The wall time counts across resumes: each training row carries elapsed_s, and a resumed run
    continues from the last row kept (the time between that row and an interruption, and the restart, are not in).
    Built after Metrics, which has already moved a resume's rewound rows out."""

    def __init__(self, target, out, enabled):
        self.target, self.t0, self.prior_s, self.met = target, time.time(), 0.0, None
        path = os.path.join(out, "metrics.jsonl")
        if enabled and os.path.exists(path):
            with open(path) as f:
                for row in map(json.loads, filter(str.strip, f)):
                    self.prior_s = row.get("elapsed_s", self.prior_s)
                    self.met = row if "target_met" in row and self.met is None else self.met

    def elapsed(self):
        return self.prior_s + time.time() - self.t0

    def evaluated(self, step, tokens, val_loss, metrics, console):
        if self.target and self.met is None and val_loss <= self.target:
            self.met = dict(step=step, target_met=self.target, tokens=tokens, elapsed_s=self.elapsed())
            metrics.log(**self.met)
            console.write(f"target loss {self.target:g} met at step {step}: val loss {val_loss:.4f} after "
                          f"{tokens:,} tokens, {clock(self.met['elapsed_s'])}")

    def summary(self, tokens, val_loss):
        seconds = self.elapsed()
        line = (f"{tokens:,} tokens in {clock(seconds)} ({seconds:.1f} s) at {tokens / seconds:,.0f} tokens/s; final "
                f"validation loss {val_loss:.4f}")
        if not self.target:
            return line
        met = self.met
        return line + (f"; target {self.target:g} met at step {met['step']} ({met['tokens']:,} tokens, "
                       f"{clock(met['elapsed_s'])})" if met else f"; target {self.target:g} not met")


def clock(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


class Console:
    """What rank 0 prints while training. On a terminal, tqdm's bar. Otherwise (a Slurm or PBS log, a pipe) plain
    lines, no carriage returns: the first step, then one at the next multiple of log_interval once 30 s have passed
    since the last line, and the last step, each with step, loss, lr, grad norm, tokens/s, MFU, elapsed time and ETA.
    Evaluations and notes are lines in both cases. elapsed: the run's wall time in seconds (Score.elapsed, which
    continues across a resume as the score line does); by default this process's. The ETA is from this process's
    pace alone (a resume's first steps are not slowed by the time before it)."""

    def __init__(self, cfg, start_step, enabled, every_s=30.0, elapsed=None):
        self.cfg, self.enabled, self.every_s = cfg, enabled, every_s
        self.t0 = self.last = time.time()
        self.elapsed = elapsed or (lambda: time.time() - self.t0)
        self.start, self.bar = start_step, None
        if enabled and sys.stdout.isatty() and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.max_steps, initial=start_step, dynamic_ncols=True, mininterval=1.0)

    def step(self, step, loss, lr, grad_norm, tok_s, mfu):
        if not self.enabled:
            return
        mfu_text = "n/a" if mfu is None else f"{mfu:.1%}"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=mfu_text, refresh=False)
            self.bar.update()
            return
        now = time.time()
        due = now - self.last >= self.every_s and step % self.cfg.log_interval == 0
        if step == self.start + 1 or step == self.cfg.max_steps or due:
            self.last = now
            eta = (now - self.t0) / (step - self.start) * (self.cfg.max_steps - step)
            print(f"step {step}/{self.cfg.max_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                  f"{tok_s:,.0f} tok/s | MFU {mfu_text} | elapsed {clock(self.elapsed())} | ETA {clock(eta)}",
                  flush=True)

    def write(self, text):
        if self.enabled:
            (self.bar.write if self.bar is not None else lambda t: print(t, flush=True))(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def announce(preset, cfg, dist, model, grad_accum):
    """train.py's first lines: the model, the process layout and the batch, then the features in use."""
    n_params = sum(p.numel() for p in model.parameters())
    dist.print0(f"model {preset}: {n_params:,} params on each of {dist.tp} tp ranks, vocab {cfg.vocab_size:,}, "
                f"{cfg.dtype} on {dist.device}; world {dist.world} = tp {dist.tp} x dp {dist.dp}; "
                f"{cfg.batch_tokens:,} tokens/step = {cfg.micro_batch} x {cfg.seq_len} x {grad_accum} micro-batches "
                f"x {dist.dp} dp")
    features = [name for name, on in (("sequence parallel", cfg.sp),
                                      (f"recompute {cfg.recompute}", cfg.recompute != "none"), ("ZeRO-1", cfg.zero1),
                                      ("compiled", cfg.compile)) if on]
    if features:
        dist.print0("with " + ", ".join(features))
    if cfg.sequence_parallel and dist.tp == 1:
        dist.print0("note: --sequence_parallel splits activations over the tp group; at tp 1 it changes nothing")


_held = {}  # the lock files this process holds, by real path: open for as long as it lives


def lock_out_dir(out):
    """One run per output directory: rank 0 holds an exclusive flock on OUT/.lock for as long as its process lives.
    The kernel lets go when the process ends, however it ends, so a killed run leaves no stale lock; a second run on
    the same --out (a duplicate job, `srun --mpi=none`'s independent processes) is refused before it writes
    anything, instead of interleaving checkpoints, metrics.jsonl and TensorBoard events. A file system without
    flock (a Lustre mount without -o flock) gets a warning and no lock."""
    path = os.path.realpath(os.path.join(out, ".lock"))
    if path in _held:
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not said which yet"
        f.close()
        raise UserError(f"{out} is in use by a run that is still live ({holder}); two runs in one --out would "
                        f"interleave their checkpoints and metrics.\nHINT: wait for it to end (SIGTERM makes it "
                        f"checkpoint and exit), or give this run another --out. Under Slurm: two jobs of one script, "
                        f"or srun without --mpi=pmi2 (docs/slurm.md).") from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP
        f.close()
        print(f"warning: cannot lock {path} ({e.strerror}): nothing stops a second run on {out}", file=sys.stderr)
        return
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
    f.flush()
    _held[path] = f


def prepare_out_dir(out, resume, overwrite, dist):
    """Refuse to start a fresh run over an earlier one unless told to (--resume or --overwrite)."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: pass one of them.")
    os.makedirs(out, exist_ok=True)
    if dist.rank != 0:  # rank 0 decides; if it refuses, run_or_abort ends every rank
        return
    lock_out_dir(out)  # before anything in --out is deleted or written
    names = sorted(os.listdir(out))
    old = [n for n in names if CKPT_RE.match(n) or n.startswith("metrics.") and n.endswith(".jsonl")]
    if old and not resume:
        if not overwrite:
            raise UserError(f"{out} already holds a run ({', '.join(old)}).\n"
                            f"HINT: --resume to continue it, --overwrite to delete it, or another --out.")
        old += [n for n in names if n in ("config.json", "tokenizer.tiktoken", "tokenizer.json", "tokenizer.vocab.txt")]
        for name in old:
            os.remove(os.path.join(out, name))
        if os.path.isdir(os.path.join(out, "tensorboard")):
            shutil.rmtree(os.path.join(out, "tensorboard"))
            old.append("tensorboard/")
        print(f"--overwrite: deleted {len(old)} files of the earlier run in {out}")


