"""Randomness across tensor-parallel ranks, and activation recomputation that replays it (Megatron-LM keeps the
same two things together in mpu/random.py). Used by distributed.Dist (every process layout carries its generator),
by model.py (--recompute) and by run/checkpoint.py (rng_state and restore_rng: the generators a checkpoint
keeps)."""
from contextlib import contextmanager

import torch
import torch.utils.checkpoint


class TPRandom:
    """Megatron's RNG tracker, reduced to what this model needs. Dropout on replicated activations uses the global
    generator, seeded the same on every rank of a tensor-parallel group so their masks agree; dropout on a rank's
    own heads (and, under sequence parallelism, on a rank's own tokens) runs inside fork(), on a generator seeded
    differently per tp rank. At tp = 1 fork() does nothing."""

    def __init__(self, tp, tp_rank, device):
        self.tp, self.tp_rank, self.device, self.state = tp, tp_rank, device, None

    def _get(self):
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state):
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def fits(self, state):
        """Whether a saved state can be this device's generator's: the CPU's (mt19937) is 5056 bytes, a CUDA
        generator's (philox: seed and offset) 16, so a checkpoint moved between a CPU and a GPU run does not fit."""
        return state.numel() == self._get().numel()

    def seed(self, seed):
        if self.tp > 1:
            saved = self._get()
            gen = torch.Generator(self.device).manual_seed(seed + 2718 + self.tp_rank)
            self.state = gen.get_state()
            self._set(saved)

    @contextmanager
    def fork(self):
        if self.state is None:
            yield
            return
        saved = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(saved)


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


def checkpoint(fn, dist, *args):
    """Activation recomputation: run fn(*args) keeping only its inputs; backward runs it again to rebuild what it
    needs. The recomputation must draw the same dropout masks: torch restores the default generator
    (preserve_rng_state), and this restores the tensor-parallel generator to its state at the first run."""
    state, calls = dist.rng.state, [0]

    def run(*a):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*a)
        later, dist.rng.state = dist.rng.state, state
        try:
            return fn(*a)
        finally:
            dist.rng.state = later
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
