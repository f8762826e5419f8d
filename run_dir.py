"""The run's output directory: metrics.jsonl, and the refusal to start a new run over an old one. Its checkpoints
are checkpoint.py's.

    OUT/ckpt_*.pt                  checkpoints (checkpoint.py)
    OUT/metrics.jsonl              one JSON object per line (metrics.rewound.jsonl: rows a resume rewound)
    OUT/config.json, tokenizer.*   a record of the run, and the tokenizer for sample.py
"""
import json
import os

from checkpoint import CKPT_RE
from errors import UserError


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


