"""MPI without torch: the world when there is one (mpi_world), and how every command ends (run_or_abort): a clean
message, every rank leaving together or, on an error, the whole job aborted. data.py and dataprep/prepare.py use it
without paying torch's import; distributed.py starts torch.distributed on top of it."""
import sys
import time
import traceback

from runtime.errors import EXIT_REQUEUE, Requeue, UserError


def mpi_world():
    """mpi4py's COMM_WORLD, or None when there is no MPI (a plain `python train.py` is a world of one, even where
    libmpi is missing or broken)."""
    try:
        from mpi4py import MPI
        return MPI, MPI.COMM_WORLD
    except Exception:  # ImportError, or RuntimeError from a missing libmpi
        return None, None


def wait_for_every_rank(flag=True, note="", note_every_s=300.0):
    """Whether flag holds on every rank, waited for over MPI rather than through a torch collective: every rank
    calls it. For waits of unknown length (a checkpoint written to a slow file system, one read and resharded), which
    a torch collective would race: gloo's deadline and NCCL's watchdog (--collective_timeout_s) end a collective
    that waits longer, and the job with it. Polled, so a waiting rank uses no CPU; rank 0 prints `note` with the
    time waited every note_every_s seconds. A world of one, or no MPI: flag."""
    MPI, comm = mpi_world()
    if comm is None or comm.Get_size() == 1:
        return flag
    import numpy as np  # here: data.py imports this file without paying for numpy's import

    mine, every = np.array([int(flag)], dtype=np.int32), np.zeros(1, dtype=np.int32)
    request, start, told = comm.Iallreduce(mine, every, op=MPI.MIN), time.time(), 0
    while not request.Test():
        time.sleep(0.01)
        waited = time.time() - start
        if note and comm.Get_rank() == 0 and waited > (told + 1) * note_every_s:
            told += 1
            print(f"{note}: waited {waited:.0f} s so far", file=sys.stderr, flush=True)
    return bool(every[0])


def report_missing(MPI, comm, wait_s=10.0):
    """After a collective timed out: every rank that can still run tells rank 0 so over MPI (not through the
    collective that is stuck), and rank 0 names the ranks it did not hear from within wait_s: the ones to look at
    (stopped, swapping, on a wedged GPU or file system). Rank 0 then ends the job; if rank 0 is the stuck one, each
    other rank ends it after waiting."""
    rank, world, tag = comm.Get_rank(), comm.Get_size(), 7177
    if rank != 0:
        comm.isend(rank, dest=0, tag=tag)
        time.sleep(wait_s + 5)  # rank 0 aborts the job before this ends, unless rank 0 is the one that hangs
        print(f"rank {rank}: rank 0 did not answer either: it may be the rank that hangs", file=sys.stderr, flush=True)
        return
    heard, deadline = {0}, time.time() + wait_s
    while time.time() < deadline and len(heard) < world:
        if comm.iprobe(source=MPI.ANY_SOURCE, tag=tag):
            heard.add(comm.recv(source=MPI.ANY_SOURCE, tag=tag))
        else:
            time.sleep(0.05)
    missing = sorted(set(range(world)) - heard)
    print(f"error: a collective timed out (--collective_timeout_s). Rank(s) {missing or 'none'} did not arrive: "
          f"{'stopped or hanging' if missing else 'every rank is alive, so one is far behind'}.\nHINT: look at "
          f"those ranks' hosts; if a long compile or a checkpoint on a slow file system is all it is, raise "
          f"--collective_timeout_s.", file=sys.stderr, flush=True)


def run_or_abort(main):
    """Run main(). A UserError prints its message, anything else its traceback; then, if this is one rank of
    several, abort the whole MPI world so that no other rank waits forever in a collective: the job ends promptly
    with a non-zero exit. Requeue (every rank at once, after a checkpoint) leaves together with EXIT_REQUEUE."""
    code = 0
    try:
        try:
            main()
        except Requeue as e:  # raised by every rank at the same step: they still leave together
            print(e, file=sys.stderr, flush=True)
            code = EXIT_REQUEUE
        tdist = sys.modules.get("torch.distributed")  # never imported (data.py): nothing to leave
        if tdist is not None and tdist.is_initialized():  # leave together: a rank that exits early can break its
            tdist.barrier()  # peers' connections
            tdist.destroy_process_group()
        if code:
            sys.exit(code)
        return
    except UserError as e:
        message, timed_out, shared = f"error: {e}", False, e.shared
    except Exception as e:
        timed_out = "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower()
        # a timeout's traceback only says which wait gave up; report_missing below says what matters
        message, shared = f"{type(e).__name__}: {e}" if timed_out else traceback.format_exc(), False
    MPI, comm = mpi_world()
    several = comm is not None and comm.Get_size() > 1
    if shared and several and comm.Get_rank() != 0:
        time.sleep(2.0)  # rank 0 prints the message every rank has, and aborts the job
    else:
        print((f"rank {comm.Get_rank()}: " if several else "") + message, file=sys.stderr, flush=True)
    if several and timed_out:
        report_missing(MPI, comm)
    if several:
        # Abort kills every rank and the launcher's forwarding of their output at once: a second's wait lets the
        # message above reach the user (seen lost once in ~100 runs when every rank failed together).
        time.sleep(1.0)
        comm.Abort(1)
    sys.exit(1)
