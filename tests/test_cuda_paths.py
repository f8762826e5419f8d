"""The CUDA paths, tested on a CPU (issue 27, findings 7-10): torch.cuda replaced by small fakes (monkeypatch, so
nothing leaks) that record what the code asked of which GPU, and a fake MPI world for the start-up. What each fake
stands for is said where it is made; tests/test_cuda.py and test_cuda_multi.py run the real thing on a GPU."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist

import distributed
from distributed import Dist
from recompute import TPRandom
from run.checkpoint import restore_rng, rng_state
from runtime.errors import UserError
from runtime.startup import device_for
from step import resolve_dtype

CPU_STATE = torch.get_rng_state().numel()  # mt19937: 5056 bytes
CUDA_STATE = 16  # philox: an 8-byte seed and an 8-byte offset


def unset_env(monkeypatch, name):
    """Remove name from the environment for this test and put the user's value back after it, even if the code
    under test sets it (monkeypatch.delenv alone does not restore a variable that was absent)."""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


def fake_gpus(monkeypatch, capabilities, calls=None):
    """torch.cuda with len(capabilities) GPUs of these compute capabilities. Each GPU's generator state is 16 bytes
    holding its index, as a CUDA (philox) state is 16 bytes. calls, if given, records (function, argument, the
    CUDA_DEVICE_MAX_CONNECTIONS the call saw) in order."""
    states = {i: torch.full((CUDA_STATE,), i, dtype=torch.uint8) for i in range(len(capabilities))}
    index = lambda device: 0 if device is None else torch.device(device).index  # noqa: E731

    def record(name, result):
        def fn(*args, **kwargs):
            if calls is not None:
                calls.append((name, args, os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")))
            return result(*args, **kwargs)
        monkeypatch.setattr(torch.cuda, name, fn)

    def set_rng_state(state, device="cuda"):
        states[index(device)] = state.clone()

    def everything(*args):
        raise AssertionError("every GPU's generator: only this rank's own device's is to be saved or restored")

    record("is_available", lambda: True)
    record("device_count", lambda: len(capabilities))
    record("set_device", lambda device: None)
    record("current_device", lambda: 0)
    record("get_device_capability", lambda device=None: capabilities[index(device)])
    # torch's default, including_emulation=True, says yes on a V100 too: bf16 is emulated there
    record("is_bf16_supported", lambda including_emulation=True: including_emulation or capabilities[0] >= (8, 0))
    record("get_rng_state", lambda device="cuda": states[index(device)].clone())
    record("set_rng_state", set_rng_state)
    record("get_rng_state_all", everything)
    record("set_rng_state_all", everything)
    uuid = getattr(monkeypatch, "gpu_uuid", "GPU")  # what this rank's GPUs call themselves (own_gpus_test sets it)
    record("get_device_properties", lambda i: SimpleNamespace(uuid=f"{uuid}-{i}"))
    return states


# ------------------------------------------------------------------------------------------------------------------
# Finding 7: --dtype auto is bf16 only where the GPU has it natively (sm80 on), as tools/plan.py gpu_dtype assumes


def test_auto_dtype_is_bf16_only_with_native_bf16(monkeypatch):
    for name, capability, want in [("V100", (7, 0), "fp16"), ("T4", (7, 5), "fp16"), ("A100", (8, 0), "bf16"),
                                   ("H100", (9, 0), "bf16")]:
        fake_gpus(monkeypatch, [capability])
        cfg = SimpleNamespace(dtype="auto")
        resolve_dtype(cfg, torch.device("cuda", 0))
        assert cfg.dtype == want, name


def test_auto_dtype_asks_the_ranks_own_gpu(monkeypatch):
    """GPU 0 (the current device) an H100, GPU 1 a V100: rank 1's dtype is the V100's."""
    fake_gpus(monkeypatch, [(9, 0), (7, 0)])
    cfg = SimpleNamespace(dtype="auto")
    resolve_dtype(cfg, torch.device("cuda", 1))
    assert cfg.dtype == "fp16"


# ------------------------------------------------------------------------------------------------------------------
# Finding 8: the generators a checkpoint keeps are this rank's own; the tp generator survives a change of device


def test_rng_state_saves_and_restores_only_this_ranks_gpu(monkeypatch):
    calls = []
    states = fake_gpus(monkeypatch, [(9, 0)] * 4, calls)
    dist = Dist(device=torch.device("cuda", 2))
    saved = rng_state(dist)  # get_rng_state_all would fail here (fake_gpus)
    assert torch.equal(saved["cuda"], states[2]) and [c[:2] for c in calls] == [("get_rng_state", (dist.device,))]
    assert saved["tp"].numel() == 0  # tp == 1: no tensor-parallel generator
    states[2] = torch.zeros(CUDA_STATE, dtype=torch.uint8)
    calls.clear()
    restore_rng(saved, dist, seed=1234)
    assert [c[:2] for c in calls] == [("set_rng_state", (saved["cuda"], dist.device))]
    assert torch.equal(states[2], saved["cuda"]) and all(states[i].eq(i).all() for i in (0, 1, 3))  # the others: untouched


@pytest.mark.parametrize("gpus_then, device, entry", [(4, 1, 1), (4, 3, 3), (1, 1, 0), (2, 0, 0)],
                         ids=["own-entry", "own-entry-last", "fewer-entries-first", "first"])
def test_old_checkpoints_list_gives_this_device_its_entry(monkeypatch, gpus_then, device, entry):
    """A checkpoint written before issue 27 holds every GPU's state (get_rng_state_all): this rank's device takes
    its own entry, or the first where the list is shorter; no other GPU is touched (there may be fewer now)."""
    states = fake_gpus(monkeypatch, [(9, 0)] * 4)
    written = [torch.full((CUDA_STATE,), 100 + i, dtype=torch.uint8) for i in range(gpus_then)]
    old = {"torch": torch.get_rng_state(), "cuda": written, "tp": torch.zeros(0, dtype=torch.uint8)}
    restore_rng(old, Dist(device=torch.device("cuda", device)), seed=1234)
    assert torch.equal(states[device], written[entry])
    assert all(states[i].eq(i).all() for i in range(4) if i != device)


def test_old_checkpoints_gpu_states_are_ignored_on_the_cpu(monkeypatch):
    fake_gpus(monkeypatch, [(9, 0)] * 2)
    old = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(CUDA_STATE, dtype=torch.uint8)] * 2,
           "tp": torch.zeros(0, dtype=torch.uint8)}
    restore_rng(old, Dist(), seed=1234)  # set_rng_state_all would fail (fake_gpus); nothing else is asked of CUDA


def test_cpu_tp_state_on_a_gpu_is_seeded_afresh(monkeypatch, capsys):
    """A tp 2 checkpoint written on the CPU (mt19937, 5056 bytes) resumed on a GPU (philox, 16 bytes): the old code
    handed the CPU state to the GPU generator in fork(). Now it is seeded as a fresh run's, and rank 0 says so."""
    fake_gpus(monkeypatch, [(9, 0)] * 2)
    dist = Dist(rank=0, world=2, tp=2, tp_rank=1, device=torch.device("cuda", 1))
    seeded = []

    def seed(s):  # TPRandom.seed on a GPU makes a torch.Generator("cuda"), which this CPU build cannot
        seeded.append(s)
        dist.rng.state = torch.full((CUDA_STATE,), 7, dtype=torch.uint8)
    monkeypatch.setattr(dist.rng, "seed", seed)
    cpu_run = TPRandom(2, 1, torch.device("cpu"))
    cpu_run.seed(1234)
    restore_rng({"torch": torch.get_rng_state(), "cuda": torch.zeros(0, dtype=torch.uint8), "tp": cpu_run.state},
                dist, seed=1234)
    assert seeded == [1234] and dist.rng.state.numel() == CUDA_STATE
    assert capsys.readouterr().out.count("does not fit this cuda run's, so it is seeded as a fresh run's") == 1


def test_gpu_tp_state_on_the_cpu_is_seeded_afresh_and_a_fitting_one_kept(capsys):
    """The other way: a 16-byte GPU state on a CPU run is replaced by a fresh run's seeding (and fork() then runs;
    with the old code torch.set_rng_state refused the 16 bytes there); a CPU state on the CPU is taken as saved.
    Only rank 0 speaks."""
    fresh = TPRandom(2, 1, torch.device("cpu"))
    fresh.seed(1234)
    for rank in (0, 1):
        dist = Dist(rank=rank, world=2, tp=2, tp_rank=1)
        dist.rng.seed(99)  # whatever build seeded: restore_rng seeds again as a fresh run (seed 1234) would
        gpu_state = torch.arange(CUDA_STATE, dtype=torch.uint8)
        restore_rng({"torch": torch.get_rng_state(), "cuda": torch.zeros(0, dtype=torch.uint8), "tp": gpu_state},
                    dist, seed=1234)
        assert dist.rng.state.numel() == CPU_STATE and torch.equal(dist.rng.state, fresh.state)
        with dist.rng.fork():
            torch.rand(3)
        assert capsys.readouterr().out.count("seeded as a fresh run's") == (rank == 0)
    kept = TPRandom(2, 1, torch.device("cpu"))
    kept.seed(5)
    dist = Dist(rank=0, world=2, tp=2, tp_rank=1)
    restore_rng({"torch": torch.get_rng_state(), "cuda": torch.zeros(0, dtype=torch.uint8), "tp": kept.state},
                dist, seed=1234)
    assert torch.equal(dist.rng.state, kept.state) and capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------------------------------
# Finding 9: which device a rank takes


@pytest.mark.parametrize("device, local_rank, local_world, n_gpus, want", [
    ("", 0, 1, 0, "cpu"), ("", 0, 1, 2, "cuda:0"), ("cuda", 0, 1, 1, "cuda:0"),  # a world of one
    ("cuda:1", 0, 1, 2, "cuda:1"),  # a world of one, or one rank per node, pinned to GPU 1
    ("", 1, 2, 2, "cuda:1"), ("cuda", 3, 4, 8, "cuda:3"),  # one GPU per rank
    ("", 2, 4, 0, "cpu"), ("cpu", 2, 3, 2, "cpu"),  # the CPU: any number of ranks share it
])
def test_device_for(device, local_rank, local_world, n_gpus, want):
    assert device_for(device, local_rank, local_world, n_gpus) == torch.device(want)


@pytest.mark.parametrize("device, local_rank, local_world, n_gpus, says", [
    ("", 2, 3, 2, ["3 ranks on this host but torch sees 2 GPU(s)", "HINT", "mpiexec -ppn 2", "--map-by ppr:2:node",
                   "CUDA_VISIBLE_DEVICES"]),
    ("cuda", 0, 9, 8, ["9 ranks on this host but torch sees 8 GPU(s)", "mpiexec -ppn 8"]),
    ("cuda:1", 1, 2, 2, ["--device cuda:1 names one GPU, but 2 ranks share this host", "HINT: --device cuda"]),
    ("cuda:2", 0, 1, 2, ["--device cuda:2 but torch sees 2 GPU(s)", "HINT", "CUDA_VISIBLE_DEVICES"]),
], ids=["oversubscribed", "oversubscribed-cuda", "one-index-several-ranks", "index-out-of-range"])
def test_device_for_refuses(device, local_rank, local_world, n_gpus, says):
    with pytest.raises(UserError) as e:
        device_for(device, local_rank, local_world, n_gpus)
    assert all(s in str(e.value) for s in says), str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# Findings 9 and 10: init_distributed in a fake MPI world of one host with two GPUs


class FakeComm:
    """mpi4py's COMM_WORLD, or its shared-memory split (local), on one host: what init_distributed asks of it."""

    def __init__(self, rank, size, local_rank=None, local_size=None):
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind, key):
        return FakeComm(self.local_rank, self.local_size)

    def bcast(self, value, root=0):
        return 0  # the host's first world rank: one host, rank 0

    def allgather(self, value):
        return [value] * self.size


def fake_world(monkeypatch, rank, size, local_rank, local_size, gpus=2):
    """init_distributed's surroundings replaced, every call recorded in order in `calls`: MPI (and the variable it
    saw), torch.cuda with `gpus` GPUs, the rendezvous, the interface binding, init_process_group, new_groups."""
    calls = []
    fake_gpus(monkeypatch, [(9, 0)] * gpus, calls)
    unset_env(monkeypatch, "TORCH_NCCL_ASYNC_ERROR_HANDLING")  # init_distributed sets it for NCCL

    def mpi_world():
        calls.append(("mpi_world", (), os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")))
        return SimpleNamespace(COMM_TYPE_SHARED=1), FakeComm(rank, size, local_rank, local_size)

    def init_process_group(backend, **kwargs):
        calls.append(("init_process_group", (backend, kwargs), os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")))

    monkeypatch.setattr(distributed, "mpi_world", mpi_world)
    monkeypatch.setattr(distributed, "rendezvous", lambda comm, spans, iface, timeout: ("127.0.0.1", 29500, "lo"))
    monkeypatch.setattr(distributed, "bind_interface", lambda ifname, spans: [])
    monkeypatch.setattr(tdist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed, "new_groups", lambda world, tp, rank, timeout: ("tp group", None))
    return calls


@pytest.mark.parametrize("rank, user", [(0, None), (1, None), (0, "4")], ids=["rank0", "rank1", "rank0-user-value"])
def test_init_distributed_sets_the_queues_first_and_binds_this_ranks_gpu(monkeypatch, capsys, rank, user):
    """CUDA reads CUDA_DEVICE_MAX_CONNECTIONS once, when its first context is made (which a CUDA-aware MPI_Init may
    do): it is set before MPI starts and before any torch.cuda call; a value the user set is kept, and rank 0 says
    so. NCCL's default group gets this rank's GPU as device_id, not one guessed from the global rank."""
    if user is None:
        unset_env(monkeypatch, "CUDA_DEVICE_MAX_CONNECTIONS")
    else:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", user)
    calls = fake_world(monkeypatch, rank=rank, size=2, local_rank=rank, local_size=2)
    dist = distributed.init_distributed(tp=2, device="cuda")
    assert calls[0][0] == "mpi_world", calls
    assert [c for c in calls if c[2] != (user or "1")] == [], "CUDA_DEVICE_MAX_CONNECTIONS was not yet set at these"
    assert dist.device == torch.device("cuda", rank) and dist.tp == 2 and dist.tp_rank == rank
    assert ("set_device", (torch.device("cuda", rank),)) in [c[:2] for c in calls]
    (backend, kwargs), = [c[1] for c in calls if c[0] == "init_process_group"]
    assert backend == "nccl" and kwargs["rank"] == rank
    assert kwargs.get("device_id") == torch.device("cuda", rank), kwargs
    note = "note: CUDA_DEVICE_MAX_CONNECTIONS=4 from the environment is kept"
    assert capsys.readouterr().out.count(note) == (user == "4")


def test_init_distributed_refuses_more_ranks_than_gpus(monkeypatch):
    """Three ranks on a host with two GPUs: the old code gave rank 2 GPU 0 again (2 % 2), beside rank 0."""
    unset_env(monkeypatch, "CUDA_DEVICE_MAX_CONNECTIONS")
    calls = fake_world(monkeypatch, rank=2, size=3, local_rank=2, local_size=3)
    with pytest.raises(UserError, match="3 ranks on this host but torch sees 2 GPU"):
        distributed.init_distributed(tp=1, device="")
    assert "init_process_group" not in [c[0] for c in calls]


def test_a_launcher_that_gives_each_rank_its_own_gpu_is_accepted(monkeypatch):
    """Slurm's --gpus-per-task=1 (or a wrapper setting CUDA_VISIBLE_DEVICES per rank): two ranks on a host, each
    seeing one GPU, not the same one (by UUID, over the host's MPI communicator): each takes its own cuda:0. Two
    ranks seeing the same single GPU are still refused."""
    from runtime.startup import pick_device

    class Local:  # the host's communicator of two ranks: what each rank's GPUs call themselves
        def __init__(self, seen):
            self.seen = seen

        def allgather(self, mine):
            return self.seen
    unset_env(monkeypatch, "CUDA_DEVICE_MAX_CONNECTIONS")
    fake_gpus(monkeypatch, [(9, 0)])
    assert pick_device("", 2, 1, 2, Local([["GPU-0"], ["GPU-1"]])) == torch.device("cuda", 0)
    assert device_for("cuda", 1, 2, 1, own_gpus=True) == torch.device("cuda", 0)
    with pytest.raises(UserError, match="2 ranks on this host but torch sees 1 GPU"):
        pick_device("", 2, 1, 2, Local([["GPU-0"], ["GPU-0"]]))
