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


def quiet_interrupt():
    """Ctrl-C before a run has anything to save (importing torch, MPI and process-group start-up, opening the data,
    loading a checkpoint) ends this process at once with 130 (128 + SIGINT) and one line from rank 0, instead of a
    KeyboardInterrupt traceback from every rank, or a crash in an interrupted import's clean-up that mpiexec reports
    as a segmentation fault. runtime/stopping.py takes SIGINT over once the loop can checkpoint."""
    import os
    import signal

    def handler(signum, frame):
        rank = next((os.environ[k] for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID") if k in os.environ),
                    "0")
        if rank == "0":
            os.write(2, b"interrupted during start-up, before the first step: nothing to save, nothing lost\n")
        os._exit(130)
    signal.signal(signal.SIGINT, handler)
