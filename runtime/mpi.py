"""MPI without torch: the world when there is one (mpi_world), and how every command ends (run_or_abort): a clean
message, every rank leaving together or, on an error, the whole job aborted. data.py and dataprep/prepare.py use it
without paying torch's import; distributed.py starts torch.distributed on top of it."""
import os
import sys
import time
import traceback

from runtime.errors import EXIT_REQUEUE, Requeue, UserError, launcher_rank


# What a launcher tells the processes it starts about how many it started, most specific first: an MPI launcher's
# word counts over Slurm's, since `mpiexec` inside an sbatch allocation starts its ranks from one Slurm task
# (SLURM_STEP_NUM_TASKS=1 while PMI_SIZE=N). Only srun steps set SLURM_STEP_NUM_TASKS (not the batch script).
LAUNCHED = (("PMI_SIZE", "the launcher"), ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
            ("SLURM_STEP_NUM_TASKS", "srun"))
FOREIGN = ("HINT: launch with the MPI that mpi4py was built with: .venv/bin/mpiexec -n N (MPICH, what `make` "
           "installs), srun --mpi=pmi2 under Slurm (docs/slurm.md); or rebuild mpi4py against the cluster's MPI "
           "(README, \"The launcher is the venv's\").")
CHECK = "NANOYUAN_LAUNCH_CHECK"  # =off: no launch check (N independent runs on purpose, each with its own --out)
# What gloo and NCCL say when a peer's process is gone (killed, out of memory, its node down)
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "remote process exited")
_refused = False  # this process's launch was refused: MPI is not to be started (again) by anyone


def _name(library):
    """'MPICH 5.0.2' of 'MPICH Version:      5.0.2\\n...', 'Open MPI v5.0.11' of 'Open MPI v5.0.11, package: ...'."""
    return " ".join(library.splitlines()[0].split(",")[0].replace("Version:", "").split())


def launch_refusal(library, world, env):
    """The message for a launch that went wrong, or None. library: MPI.Get_library_version() (read before MPI starts);
    world: COMM_WORLD's size, or None before MPI starts. Two mistakes: a launcher of another MPI (MPICH's MPI_Init
    aborts under Open MPI's mpirun, and Open MPI 5's under a PMI-1/2 launcher, with a message that names neither),
    and a launcher that started N processes which each see a world of 1 (srun without --mpi=pmi2, where Slurm's
    MpiDefault is none): N independent trainings into the same --out. Only what is known to fail is refused: MPICH
    itself (not Intel MPI or MVAPICH) built without PMIx, Open MPI 5 and later; the innermost launcher's variables
    count (MPICH's mpiexec inside a PMIx step sets PMI_FD, and PMIX_RANK is left over from outside)."""
    if env.get(CHECK, "").lower() in ("off", "0", "false", "no"):
        return None
    open_mpi, mpich = library.startswith("Open MPI"), library.startswith("MPICH")
    pmi = any(k in env for k in ("PMI_FD", "PMI_PORT", "PMI_RANK"))  # MPICH's mpiexec, srun --mpi=pmi2
    pmix = "OMPI_COMM_WORLD_SIZE" in env or "PMIX_RANK" in env  # Open MPI's mpirun, srun --mpi=pmix
    if world is None:
        if mpich and pmix and not pmi and "pmix" not in library.lower():  # PyPI's MPICH has no PMIx
            who, n = "Open MPI's mpirun (or srun --mpi=pmix)", env.get("OMPI_COMM_WORLD_SIZE", "N")
        elif open_mpi and not library.startswith(("Open MPI v1", "Open MPI v2", "Open MPI v3", "Open MPI v4")) \
                and pmi and not pmix:  # Open MPI 5 starts only under PMIx
            who, n = "a PMI-1/PMI-2 launcher (MPICH's mpiexec, srun --mpi=pmi2)", env.get("PMI_SIZE", "N")
        else:
            return None
        return (f"{who} started this process, one of {n}, but mpi4py is built against {_name(library)}, "
                f"which cannot join that launcher's job (its MPI_Init would abort).\n{FOREIGN}")
    order = (LAUNCHED[1], LAUNCHED[0], LAUNCHED[2]) if open_mpi else LAUNCHED  # the library's own launcher first
    for var, who in order:
        if env.get(var, "").isdigit():
            n = int(env[var])
            if n == world:
                return None
            alone = " each: every process would train alone, a separate run into the same --out" if world == 1 else ""
            hint = ("HINT: srun --mpi=pmi2 (the PMI that the venv's MPICH speaks; where Slurm's MpiDefault is none, "
                    "a plain srun starts processes that never meet), or .venv/bin/mpiexec inside the sbatch "
                    f"allocation (docs/slurm.md). Independent runs on purpose, each with its own --out: {CHECK}=off."
                    if var == "SLURM_STEP_NUM_TASKS" else FOREIGN)
            return f"{who} started {n} processes ({var}={n}), but MPI sees a world of {world}{alone}.\n{hint}"
    return None


def mpi_world():
    """mpi4py's COMM_WORLD, or None when there is no MPI (a plain `python train.py` is a world of one, even where
    libmpi is missing or broken). The first call starts MPI, after checking the launch (launch_refusal): on a launch
    that went wrong, the launcher's rank 0 raises a UserError that says what happened, and every other process
    exits 1 without a word."""
    global _refused
    if _refused:
        return None, None
    try:
        import mpi4py
        mpi4py.rc.initialize, mpi4py.rc.finalize = False, True  # started below, after the launch is checked
        from mpi4py import MPI
    except Exception:  # ImportError, or RuntimeError from a missing libmpi
        return None, None
    if not MPI.Is_initialized():
        refusal = launch_refusal(MPI.Get_library_version(), None, os.environ)
        if refusal is None:
            try:
                MPI.Init_thread(MPI.THREAD_MULTIPLE)  # mpi4py's own default
            except Exception:  # a broken libmpi: a world of one, as before
                return None, None
            refusal = launch_refusal("", MPI.COMM_WORLD.Get_size(), os.environ)
        if refusal is not None:
            _refused = True
            if launcher_rank() == 0:
                raise UserError(refusal)
            time.sleep(2.0)  # a launcher ends the job when a process exits 1: let rank 0 say why first
            sys.exit(1)
    return MPI, MPI.COMM_WORLD


def wait_for_every_rank(flag=True, note="", note_every_s=300.0, give_up=None):
    """Whether flag holds on every rank, waited for over MPI rather than through a torch collective: every rank
    calls it. For waits of unknown length (a checkpoint written to a slow file system, one read and resharded), which
    a torch collective would race: gloo's deadline and NCCL's watchdog (--collective_timeout_s) end a collective
    that waits longer, and the job with it. Polled, so a waiting rank uses no CPU; rank 0 prints `note` with the
    time waited every note_every_s seconds. give_up(): polled while waiting; once it holds (and the wait has not
    ended), None is returned at once. A world of one, or no MPI: flag."""
    MPI, comm = mpi_world()
    if comm is None or comm.Get_size() == 1:
        return flag
    import numpy as np  # here: data.py imports this file without paying for numpy's import

    mine, every = np.array([int(flag)], dtype=np.int32), np.zeros(1, dtype=np.int32)
    request, start, told = comm.Iallreduce(mine, every, op=MPI.MIN), time.time(), 0
    while not request.Test():
        if give_up is not None and give_up() and not request.Test():
            return None
        time.sleep(0.01)
        waited = time.time() - start
        if note and comm.Get_rank() == 0 and waited > (told + 1) * note_every_s:
            told += 1
            print(f"{note}: waited {waited:.0f} s so far", file=sys.stderr, flush=True)
    return bool(every[0])


def report_missing(MPI, comm, lost=False, wait_s=10.0):
    """After a collective timed out (or, lost, broke: a peer's process ended): every rank that can still run tells
    rank 0 so over MPI (not through the collective that is stuck), and rank 0 names the ranks it did not hear from
    within wait_s: the ones to look at (stopped, swapping, on a wedged GPU or file system). Rank 0 then ends the job;
    if rank 0 is the stuck one, each other rank ends it after waiting."""
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
    if lost:
        print(f"error: a rank's connection to another broke: its process ended. Rank(s) {missing or 'none'} did "
              f"not answer: killed, out of memory, or their node failed.\nHINT: look at those ranks' hosts and "
              f"logs; then run the same command with --resume: it continues from the last checkpoint.",
              file=sys.stderr, flush=True)
        return
    print(f"error: a collective timed out (--collective_timeout_s). Rank(s) {missing or 'none'} did not arrive: "
          f"{'stopped or hanging' if missing else 'every rank is alive, so one is far behind'}.\nHINT: look at "
          f"those ranks' hosts; if a long compile or a checkpoint on a slow file system is all it is, raise "
          f"--collective_timeout_s.", file=sys.stderr, flush=True)


def run_or_abort(main):
    """Run main(). A UserError prints its message, anything else its traceback; then, if this is one rank of
    several, abort the whole MPI world so that no other rank waits forever in a collective: the job ends promptly
    with a non-zero exit. Requeue (every rank at once, after a checkpoint) leaves together with EXIT_REQUEUE."""
    code, said = 0, ""
    try:
        try:
            main()
        except Requeue as e:  # raised by every rank at the same step: they still leave together
            code, said = EXIT_REQUEUE, str(e)
        tdist = sys.modules.get("torch.distributed")  # never imported (data.py): nothing to leave
        if code and (tdist is None or not tdist.is_initialized() or tdist.get_rank() == 0):
            print(said, file=sys.stderr, flush=True)  # once: every rank has the same message
        if tdist is not None and tdist.is_initialized():  # leave together: a rank that exits early can break its
            tdist.barrier()  # peers' connections
            tdist.destroy_process_group()
        if code:
            sys.exit(code)
        return
    except UserError as e:
        message, timed_out, lost, shared = f"error: {e}", False, False, e.shared
    except Exception as e:
        timed_out = "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower()
        lost = any(s in str(e) for s in PEER_GONE)
        # a timeout's traceback only says which wait gave up; report_missing below says what matters
        first = (str(e).splitlines() or [""])[0]
        message = f"{type(e).__name__}: {first}" if timed_out or lost else traceback.format_exc()
        shared = False
    try:  # an error before MPI started: start it now, so that one rank prints a shared error and all leave together
        MPI, comm = mpi_world()
    except (UserError, SystemExit):  # ... unless the launch itself is wrong (said by rank 0): the error above stands
        MPI, comm = None, None
    several = comm is not None and comm.Get_size() > 1
    if shared and several and comm.Get_rank() != 0:
        time.sleep(2.0)  # rank 0 prints the message every rank has, and aborts the job
    else:
        print((f"rank {comm.Get_rank()}: " if several else "") + message, file=sys.stderr, flush=True)
    if several and (timed_out or lost):
        report_missing(MPI, comm, lost)
    if several:
        # Abort kills every rank and the launcher's forwarding of their output at once: a second's wait lets the
        # message above reach the user (seen lost once in ~100 runs when every rank failed together).
        time.sleep(1.0)
        comm.Abort(1)
    sys.exit(1)
