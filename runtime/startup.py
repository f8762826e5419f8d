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


def pick_device(device, world=1, local_rank=0, local_world=1):
    """This rank's device, made current. A world of one: --device as given, else a GPU if torch sees one. Several
    ranks: GPU local_rank (round robin over the host's GPUs) unless --device cpu or torch sees none; on the CPU, the
    host's cores shared by its ranks."""
    if world == 1:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dev = torch.device("cuda", dev.index or 0) if dev.type == "cuda" else dev  # set_device wants an index
    elif torch.cuda.is_available() and device != "cpu":
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
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
