"""The exceptions that every command-line entry point prints without a traceback."""

EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: stopped by a signal or --time_limit_min after a checkpoint; run again


class UserError(Exception):
    """A mistake the user can fix; the message says what was wrong and how to fix it. shared=True: every rank
    raises the same one (it was decided collectively), so rank 0 alone prints it."""

    def __init__(self, message, shared=False):
        super().__init__(message)
        self.shared = shared


class Requeue(Exception):
    """Every rank stopped together on purpose (a signal, the time limit) after writing a checkpoint: the job exits
    with EXIT_REQUEUE so that a batch script can tell it apart from a failure and submit it again with --resume."""


def require(*modules):
    """Stop with a hint, before any traceback, when a command runs outside the project's venv (python3 train.py
    where .venv/bin/python train.py was meant): the packages the command imports first are then missing."""
    import importlib.util
    import os
    import sys
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed for "
                 f"{sys.executable}.\nHINT: run `make .venv/.installed` once in the repository, then "
                 f".venv/bin/python {os.path.basename(sys.argv[0])} ...")


def launcher_rank():
    """This process's rank as its launcher numbered it (hydra's and Slurm's PMI, Open MPI, srun), read from the
    environment: known before MPI starts, and when MPI cannot start at all."""
    import os
    return int(next((os.environ[k] for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
                     if os.environ.get(k, "").isdigit()), "0"))


def stop_during_start_up():
    """A stop signal before a run has anything to save (importing torch, MPI and process-group start-up, opening the
    data, loading a checkpoint) ends this process at once with EXIT_REQUEUE, like one in the loop: a batch script
    that requeues on 75 (docs/slurm.md) then runs the job again; nothing was trained, so nothing is lost. SIGTERM is
    Slurm's at the time limit and scancel's, SIGUSR1 its `--signal=USR1@N` warning (whose default action kills the
    process, and the job with it), SIGINT Ctrl-C. One line from rank 0, instead of a KeyboardInterrupt traceback
    from every rank, or a crash in an interrupted import's clean-up that mpiexec reports as a segmentation fault.
    runtime/stopping.py takes the signals over once the loop can checkpoint."""
    import os
    import signal

    def handler(signum, frame):
        if launcher_rank() == 0:
            os.write(2, f"{signal.Signals(signum).name} during start-up, before the first step: nothing to save, "
                        f"nothing lost; exit {EXIT_REQUEUE}: run the same command again (with --resume)\n".encode())
        os._exit(EXIT_REQUEUE)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # runtime/stopping.py's SIGNALS
        signal.signal(sig, handler)
