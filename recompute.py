"""Randomness across tensor-parallel ranks, and activation recomputation that replays it (Megatron-LM keeps the
same two things together in mpu/random.py). Used by distributed.Dist (every process layout carries its generator)
and by model.py (--recompute); run/checkpoint.py saves and restores the generators (rng_state, restore_rng)."""
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


def recomputed(fn, dist, *args):
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
