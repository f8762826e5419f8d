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
