"""The process layout and how it starts: Dist (what every layer and the loop know about the ranks) and the MPI
bootstrap of torch.distributed (init_distributed). The device each rank takes and rank 0's notes after the start
are runtime/startup.py; how a command ends, every rank together (run_or_abort), runtime/mpi.py. The tensor- and
sequence-parallel layers are parallel.py; keeping the data-parallel replicas in step, data_parallel.py.

Ranks are laid out as blocks of `tp` consecutive ranks (one tensor-parallel group, kept inside a node) and the
data-parallel groups are the strided rest (new_groups). With 8 ranks and tp=4:

    rank:      0 1 2 3 | 4 5 6 7
    tp group:  [0 1 2 3] [4 5 6 7]          tp_rank = rank % tp
    dp group:  [0 4] [1 5] [2 6] [3 7]      dp_rank = rank // tp
"""
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from runtime.errors import UserError
from runtime.mpi import mpi_world
from recompute import TPRandom
from runtime.rendezvous import PROBE_TIMEOUT_S, bind_interface, rendezvous
from runtime.startup import check_device, notes_after_start, pick_device


@dataclass
class Dist:
    """Everything a layer or the loop needs to know about the process layout. Passed explicitly, never global."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # rank within this node
    local_world: int = 1
    tp: int = 1  # tensor-parallel size
    tp_rank: int = 0
    tp_group: object = None  # torch.distributed group of this rank's tp ranks (None when tp == 1)
    dp: int = 1  # data-parallel size
    dp_rank: int = 0
    dp_group: object = None
    device: torch.device = torch.device("cpu")
    timeout_s: float = 300.0  # how long a collective waits for a rank (init_distributed's timeout_s)
    sequence_parallel: bool = False  # outside the matmuls each tp rank holds T/tp tokens (only where tp > 1)
    overlap: bool = True  # tp matmuls as parallel.ParallelMatmul: the same numbers, communication hidden in backward
    rng: "TPRandom" = field(default=None, compare=False)  # dropout generator of this tensor-parallel rank

    def __post_init__(self):
        self.sequence_parallel = self.sequence_parallel and self.tp > 1
        if self.rng is None:
            self.rng = TPRandom(self.tp, self.tp_rank, self.device)

    def split(self, n, what, hint=""):
        """n // tp, this rank's share of n (heads, a matmul's features, vocabulary rows), which must split evenly."""
        if n % self.tp:
            raise UserError(f"{what} {n} is not divisible by tensor-parallel size {self.tp}." + (hint and f"\n{hint}"))
        return n // self.tp

    def print0(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs, flush=True)


def init_distributed(tp=1, device="", timeout_s=300.0, iface="", sequence_parallel=False, overlap=True):
    """Bootstrap torch.distributed from MPI. Rank and world size come from COMM_WORLD, the local rank (and which
    ranks share a host) from a shared-memory split; the rendezvous address and each rank's network interface from
    runtime/rendezvous.py (MASTER_ADDR/MASTER_PORT, --iface and GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME override).
    A collective that waits longer than timeout_s for a rank fails (run_or_abort then names the missing ranks and
    ends the job) instead of holding every GPU until the backend's own default (30 minutes for gloo)."""
    # CUDA_DEVICE_MAX_CONNECTIONS=1 with tensor parallelism, as Megatron-LM requires, unless the user set it: with
    # one hardware work queue per GPU, kernels start in launch order, so the input-gradient all-reduce that
    # the column-parallel matmul's backward launches before the weight-gradient GEMM starts first and runs beside it;
    # with several queues the GEMM can take every SM first and the communication waits. CUDA reads the variable
    # once, when the first context is created, so this comes first: before MPI starts (a CUDA-aware MPI may create a
    # context in MPI_Init) and before any torch.cuda call (check_device, pick_device).
    queues = os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1") if tp > 1 else "1"
    MPI, comm = mpi_world()
    world = comm.Get_size() if comm is not None else 1
    if world % tp:
        raise UserError(f"world size {world} is not divisible by --tp {tp}.\nHINT: launch a multiple of {tp} ranks, "
                        f"or pick --tp among the divisors of {world}.", shared=True)
    check_device(device)
    if world == 1:
        return Dist(device=pick_device(device), overlap=overlap)
    rank = comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = local.Get_rank(), local.Get_size()
    dev = pick_device(device, world, local_rank, local_world, local)  # refuses ranks that would share a GPU
    # One host or several: every rank learns the first world rank of its host (its host's id).
    hosts = comm.allgather(local.bcast(rank, root=0))
    spans_hosts = len(set(hosts)) > 1
    addr, port, ifname = rendezvous(comm, spans_hosts, iface, min(PROBE_TIMEOUT_S, timeout_s))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kept = bind_interface(ifname, spans_hosts)  # gloo's sockets (NCCL's across hosts) bind ifname, unless user-set
    if backend == "nccl":  # NCCL's watchdog turns a timed-out collective into an error instead of a hang
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s)
    # device_id binds the default group to this rank's GPU: without it a collective on the default group before any
    # other (a barrier) guesses the GPU from the global rank, a GPU this rank may not own.
    tdist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world, timeout=timeout,
                             device_id=dev if backend == "nccl" else None)
    tp_group, dp_group = new_groups(world, tp, rank, timeout)
    dist = Dist(rank=rank, world=world, local_rank=local_rank, local_world=local_world, tp=tp, tp_rank=rank % tp,
                tp_group=tp_group, dp=world // tp, dp_rank=rank // tp, dp_group=dp_group, device=dev,
                timeout_s=timeout_s, sequence_parallel=sequence_parallel, overlap=overlap)
    notes_after_start(dist, hosts, f"{addr}:{port}", backend, kept, queues)  # runtime/startup.py
    return dist


def new_groups(world, tp, rank, timeout):
    """This rank's tensor-parallel group (a block of tp consecutive ranks) and data-parallel group (ranks tp apart),
    None for a group of one. Every rank must create every group, in the same order, even the groups it is not in.
    Each gets the timeout too: new_group does not inherit it (its default is the backend's 30 minutes).
    No group of one is made (with NCCL bound to a device, each new_group splits the whole world's communicator),
    and a group of every rank is the default group itself, not a second communicator of the same ranks."""
    dp, tp_group, dp_group = world // tp, None, None
    for start in range(0, world, tp) if tp > 1 else ():
        group = tdist.group.WORLD if tp == world else tdist.new_group(list(range(start, start + tp)), timeout=timeout)
        if start <= rank < start + tp:
            tp_group = group
    for offset in range(tp) if dp > 1 else ():
        group = tdist.group.WORLD if dp == world else tdist.new_group(list(range(offset, world, tp)), timeout=timeout)
        if rank % tp == offset:
            dp_group = group
    return tp_group, dp_group
