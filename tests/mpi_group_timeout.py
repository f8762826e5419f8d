"""Run under mpiexec -n 2 by tests/test_stopping.py: a collective on the data-parallel group (a new_group, which
does not inherit init_process_group's timeout) gives up after --collective_timeout_s when a rank never arrives."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from distributed import init_distributed  # noqa: E402

dist = init_distributed(tp=1, device="cpu", timeout_s=3.0)
if dist.rank == 1:
    time.sleep(20)  # never arrives in time
    sys.exit(0)
t0 = time.time()
try:
    tdist.all_reduce(torch.ones(1), group=dist.dp_group)
    print("no timeout", flush=True)
except Exception as e:  # gloo raises on the timeout
    print(f"timed out after {time.time() - t0:.1f} s: {type(e).__name__}", flush=True)
os._exit(0)  # without leaving the process group: rank 1 is not there to leave it with
