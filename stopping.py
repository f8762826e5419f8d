"""When a run stops between two steps, and how: what a batch system's signal, a wall-time limit or a diverging model
does to the training loop (train.py asks after every step).

    signal      SIGTERM (Slurm and PBS before the time limit, preemption), SIGUSR1 (`#SBATCH --signal=USR1@120`),
                SIGINT (Ctrl-C): finish the step, write a checkpoint, exit with EXIT_REQUEUE (75); a second signal
                exits at once
    time limit  --time_limit_min: the same, when the next step and a checkpoint might not fit in what is left
    (a rank that hangs is distributed.py's: --collective_timeout_s)
    divergence  --max_skipped_steps steps in a row skipped for non-finite gradients, or (bf16/fp32, where no loss
                scale explains it) a non-finite loss: stop with an error naming the step and the last checkpoint
                written before the trouble began, which checkpoint rotation keeps until the run recovers

Every rank takes the same decision at the same step: a signal may reach some ranks only, or a step later, so the
requeue reasons are all-reduced (MAX) over the world; divergence is decided from numbers every rank shares (the loss
and the gradient norm)."""
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as tdist

from errors import Requeue, UserError

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopping:
    def __init__(self, cfg, dist, last_ckpt):
        self.cfg, self.dist, self.start = cfg, dist, time.time()
        self.signal, self.skipped, self.slowest, self.ckpt_s = 0, 0, 0.0, 0.0
        self.last_ckpt, self.protect = last_ckpt, None  # steps of checkpoints: the newest, and the one to keep
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal:  # the second one: the user or the batch system means it
            print(f"rank {self.dist.rank}: second signal ({name}): exiting now, without a checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum
        print(f"rank {self.dist.rank}: {name}: finishing this step, then a checkpoint and exit (a second signal exits "
              f"at once)", file=sys.stderr, flush=True)

    def check_divergence(self, step, loss, finite, ckpt_path):
        """After each step, before it is evaluated or checkpointed. ckpt_path(step) names a checkpoint's file."""
        self.skipped = 0 if finite else self.skipped + 1
        if self.skipped == 1:
            self.protect = self.last_ckpt  # the trouble begins: keep the last checkpoint written before it
        elif self.skipped == 0:
            self.protect = None
        why = None
        if not math.isfinite(loss) and self.cfg.dtype != "fp16":
            why = f"the loss is {loss} in {self.cfg.dtype}"
        elif self.skipped >= self.cfg.max_skipped_steps:
            why = (f"{self.skipped} steps in a row were skipped for non-finite gradients (--max_skipped_steps "
                   f"{self.cfg.max_skipped_steps})")
        if why:
            good = self.protect if self.skipped else self.last_ckpt
            raise UserError(f"training diverged at step {step}: {why}. The last checkpoint written before: "
                            f"{ckpt_path(good) if good else 'none'}.\nHINT: lower --lr (now {self.cfg.lr:g}) or "
                            f"raise --warmup_steps, then resume from that checkpoint (move the later ones out of "
                            f"--out) or start again with --overwrite.")

    def requeue_reason(self, step_s):
        """After each step: why every rank should checkpoint and exit now, or None. A collective."""
        self.slowest = max(self.slowest, step_s)
        limit = self.cfg.time_limit_min * 60
        time_up = limit > 0 and time.time() - self.start + 2 * self.slowest + self.ckpt_s > limit
        flags = torch.tensor([self.signal, int(time_up)], device=self.dist.device)
        if self.dist.world > 1:  # a signal may have reached only some ranks yet
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        sig, time_up = (int(v) for v in flags.tolist())
        if sig:
            return f"signal {signal.Signals(sig).name}"
        return f"--time_limit_min {self.cfg.time_limit_min:g} is near" if time_up else None

    def saved(self, step, seconds):
        self.last_ckpt, self.ckpt_s = step, max(self.ckpt_s, seconds)

    def requeue(self, step, reason, out):
        raise Requeue(f"stopped at step {step} ({reason}) after writing its checkpoint in {out}; exit code 75: run "
                      f"the same command with --resume to continue")
