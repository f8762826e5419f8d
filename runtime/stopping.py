"""When a run stops between two steps, and how: what a batch system's signal, a wall-time limit or a diverging model
does to the training loop (train.py asks after every step).

    signal      SIGTERM (Slurm and PBS before the time limit, preemption), SIGUSR1 (`#SBATCH --signal=USR1@120`),
                SIGINT (Ctrl-C): finish the step, write a checkpoint, exit with EXIT_REQUEUE (75).
                Copies: PBS, LSF and a job-wide `kill` signal every process, and mpiexec forwards what it got, so
                each rank sees the signal twice, a fraction of a second apart. One request per rank, however many
                copies: a stop signal within --signal_grace_s (5 s) of the first is a copy and changes nothing.
                Meant as "now": the same again after the grace period, or SIGQUIT (Ctrl-\\) at any time, exits at
                once (128 + the signal's number), without a checkpoint.
    time limit  --time_limit_min: the same, when the next step and a checkpoint might not fit in what is left
    (a rank that hangs is distributed.py's: --collective_timeout_s)
    divergence  --max_skipped_steps steps in a row skipped for non-finite gradients, or (bf16/fp32, where no loss
                scale explains it) a non-finite loss: stop with an error naming the step and the last checkpoint
                written before the trouble began, which checkpoint rotation keeps until the run recovers

Every rank takes the same decision at the same step: a signal may reach some ranks only (a rank that got it only
through mpiexec's forwarding is like one that got it directly), or a step later, so the requeue reasons are
all-reduced (MAX) over the world; divergence is decided from numbers every rank shares (the loss and the gradient
norm).

A signal's time is taken when it arrives, not when Python gets round to its handler: Python runs handlers in the
main thread between bytecodes, which can be many seconds late while a step or a collective runs in C++, and would
make a copy look like a deliberate second signal. So the C-level handler writes each signal's number to a pipe
(signal.set_wakeup_fd) and a small thread, which waits on that pipe with the GIL released, stamps and judges it."""
import atexit
import math
import os
import signal
import threading
import time

import torch
import torch.distributed as tdist

from runtime.errors import EXIT_REQUEUE, Requeue, UserError
from runtime.mpi import wait_for_every_rank

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # checkpoint, then exit 75
NOW = signal.SIGQUIT  # Ctrl-\: exit at once, without a checkpoint (its default, a core dump, can fill a disk)


def judge(signum, now, first, first_at, grace_s):
    """What a signal arriving at time `now` asks for, given the first stop signal taken (`first`, 0 if none yet, at
    time `first_at`): "stop" (finish the step, checkpoint, exit 75), "copy" (the same request again: nothing new) or
    "now" (exit at once, without a checkpoint)."""
    if signum == NOW or (first and now - first_at >= grace_s):
        return "now"
    return "copy" if first else "stop"


class Stopping:
    def __init__(self, cfg, dist, last_ckpt):
        self.cfg, self.dist, self.start = cfg, dist, time.time()
        self.signal, self.signal_at, self.skipped, self.slowest, self.ckpt_s = 0, 0.0, 0, 0.0, 0.0
        self.last_ckpt, self.protect = last_ckpt, None  # steps of checkpoints: the newest, and the one to keep
        read, write = os.pipe()
        os.set_blocking(write, False)  # set_wakeup_fd's rule: a full pipe must not block a signal handler
        for sig in (*SIGNALS, NOW):
            signal.signal(sig, lambda signum, frame: None)  # Python's C handler writes signum to the pipe
        signal.set_wakeup_fd(write)
        threading.Thread(target=self._listen, args=(read,), daemon=True, name="signals").start()
        atexit.register(self._at_exit)
        # A signal that finds another rank still starting up ends that rank with 75 (runtime/errors.py), and this one
        # would wait for it in the first step's collectives until --collective_timeout_s. So the ranks meet here
        # first, over MPI. A stop signal while waiting: if every rank still arrives within --signal_grace_s, the
        # first step's requeue_reason stops them all together; if not, the others ended in start-up: exit 75 too.
        late = lambda: self.signal and time.monotonic() - self.signal_at > cfg.signal_grace_s  # noqa: E731
        if dist.world > 1 and wait_for_every_rank(give_up=late) is None:
            self._say(f"{signal.Signals(self.signal).name} before every rank had started: nothing trained, nothing "
                      f"lost; exit {EXIT_REQUEUE}")
            os._exit(EXIT_REQUEUE)

    def _listen(self, read):
        while True:
            arrived = os.read(read, 64)  # blocks with the GIL released; several bytes if several signals arrived
            now = time.monotonic()
            for signum in arrived:  # the pipe hears every signal with a Python handler: only ours count
                if signum in (*SIGNALS, NOW):
                    self._on_signal(signum, now)

    def _on_signal(self, signum, now):
        name, grace, since = signal.Signals(signum).name, self.cfg.signal_grace_s, now - self.signal_at
        verdict = judge(signum, now, self.signal, self.signal_at, grace)
        if verdict == "now":
            again = "" if signum == NOW else f" {since:.1f} s after the first, a second signal"
            self._say(f"{name}{again}: exiting now, without a checkpoint")
            os._exit(128 + signum)
        elif verdict == "copy":  # a batch system's copy, or mpiexec's forwarded one
            self._say(f"{name} {since:.2f} s after the first: a copy (within --signal_grace_s {grace:g}), ignored")
        else:
            self.signal, self.signal_at = signum, now
            self._say(f"{name}: finishing this step, then a checkpoint and exit 75. Copies of a signal within "
                      f"--signal_grace_s {grace:g} change nothing; to exit at once without a checkpoint, signal "
                      f"again after {grace:g} s, or send SIGQUIT (Ctrl-\\)")

    def _at_exit(self):
        """Python's shutdown puts back the signals' default action (death), and MPI_Finalize then waits for the
        other ranks: a copy arriving in that window killed the rank after its checkpoint, and mpiexec exited 15, not
        75 (9 runs of 12 at tp 2 with the copy 0.05-0.3 s behind). Once a stop was asked for and the run is leaving,
        copies are ignored to the end."""
        if self.signal:
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def _say(self, message):
        try:  # unbuffered and lock-free: out even if os._exit follows, never waiting on the loop's stderr
            os.write(2, f"rank {self.dist.rank}: {message}\n".encode())
        except OSError:  # stderr closed: the signal still counts
            pass

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
