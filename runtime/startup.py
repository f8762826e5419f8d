"""What distributed.init_distributed does around the process layout: the --device checks, the device each rank
takes, and what rank 0 says once the ranks have met (groups that span hosts, settings kept from the environment).
"""
import os

import torch

from runtime.errors import UserError


def check_device(device):
    """--device: '' (a GPU if torch sees one, else the CPU), cpu, cuda or cuda:N; checked before anything starts."""
    try:
        asked = torch.device(device) if device else None
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device.\nHINT: cpu, cuda or cuda:N.") from None
    if asked is not None and asked.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} but this torch ({torch.__version__}) sees no CUDA device.\nHINT: --device "
                        f"cpu, or install the torch build that matches the driver (README, \"Two commands\").")


def device_for(device, local_rank, local_world, n_gpus, own_gpus=False):
    """The device a rank takes, decided from numbers alone (so it is tested without a GPU): --device (already
    checked by check_device), this rank's place on its host (local_rank of local_world ranks) and the GPUs torch
    sees here (n_gpus, 0 for none). A world of one is a host of one rank.

    --device cpu, or '' without a GPU: the CPU. --device cuda, or '' with GPUs: GPU local_rank, one GPU per rank.
    A host with more ranks than GPUs is refused: two ranks on one GPU share its memory, and NCCL refuses (or hangs
    on) a communicator that holds a GPU twice. --device cuda:N: GPU N for the one rank of its host (a world of one,
    or one rank per node); with several ranks on a host one index cannot serve them all, so that is refused too.
    own_gpus: every rank of the host sees GPUs that no other rank of it sees (a launcher that binds GPUs per task:
    Slurm's --gpus-per-task or --gpu-bind, a wrapper setting CUDA_VISIBLE_DEVICES per rank): the first of its own."""
    asked = torch.device(device) if device else torch.device("cuda" if n_gpus else "cpu")
    if asked.type != "cuda":
        return asked
    if asked.index is None and own_gpus and n_gpus:
        return torch.device("cuda", 0)
    if asked.index is not None:  # --device cuda:N
        if local_world > 1:
            raise UserError(f"--device {device} names one GPU, but {local_world} ranks share this host and each "
                            f"needs its own.\nHINT: --device cuda (rank i of a host takes GPU i); to choose which "
                            f"GPUs, set CUDA_VISIBLE_DEVICES.")
        if asked.index >= n_gpus:
            raise UserError(f"--device {device} but torch sees {n_gpus} GPU(s) here.\nHINT: an index below "
                            f"{n_gpus}, or check CUDA_VISIBLE_DEVICES ({_visible()}).")
        return asked
    if local_world > n_gpus:
        raise UserError(f"{local_world} ranks on this host but torch sees {n_gpus} GPU(s) here: each rank needs a GPU "
                        f"of its own (NCCL fails or hangs when two ranks share one).\nHINT: launch at most {n_gpus} "
                        f"rank(s) per node (mpiexec -ppn {n_gpus}, Open MPI --map-by ppr:{n_gpus}:node), or check "
                        f"CUDA_VISIBLE_DEVICES ({_visible()}).")
    return torch.device("cuda", local_rank)  # an index: set_device and init_process_group(device_id=) want one


def _visible():
    return "now " + os.environ["CUDA_VISIBLE_DEVICES"] if "CUDA_VISIBLE_DEVICES" in os.environ else "unset"


def pick_device(device, world=1, local_rank=0, local_world=1, local_comm=None):
    """This rank's device (device_for), made current. Several ranks on the CPU share the host's cores. With several
    ranks on a host (local_comm, MPI's communicator of the host's ranks; every rank of it calls this) the ranks
    compare the GPUs they see, by UUID, to tell a launcher that gives each rank GPUs of its own from ranks sharing."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    own = False
    if local_comm is not None and local_world > 1 and device != "cpu":
        seen = local_comm.allgather([str(torch.cuda.get_device_properties(i).uuid) for i in range(n_gpus)])
        everyone = [u for gpus in seen for u in gpus]
        own = all(seen) and len(set(everyone)) == len(everyone)  # each rank sees GPUs, none seen by two
    dev = device_for(device, local_rank, local_world, n_gpus, own_gpus=own and n_gpus < local_world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return dev


def notes_after_start(dist, hosts, where, backend, kept, queues):
    """Rank 0's words after the start: tensor-parallel groups that span hosts (each layer's all-reduce then crosses
    the network), the hosts and where they met, and the settings the user's environment kept."""
    tp = dist.tp
    split = [list(range(s, s + tp)) for s in range(0, dist.world, tp) if len(set(hosts[s:s + tp])) > 1]
    if split:
        dist.print0(f"warning: {len(split)} tensor-parallel group(s) span hosts (ranks {split[0]} first), so every "
                    f"layer's all-reduce crosses the network.\nHINT: place ranks in blocks of --tp per host "
                    f"(mpiexec -ppn N, Open MPI --map-by ppr:N:node, N a multiple of --tp).")
    if len(set(hosts)) > 1:
        dist.print0(f"{len(set(hosts))} hosts, {dist.world} ranks; rendezvous at {where}; rank 0's gloo/NCCL sockets "
                    f"on {os.environ.get('NCCL_SOCKET_IFNAME' if backend == 'nccl' else 'GLOO_SOCKET_IFNAME', '?')}")
    for note in kept:
        dist.print0(note)
    if queues != "1":
        dist.print0(f"note: CUDA_DEVICE_MAX_CONNECTIONS={queues} from the environment is kept; Megatron-LM uses 1 "
                    f"with tensor parallelism, so that the backward's all-reduce is not queued behind a GEMM")
