"""Run many of the project's command lines, each in a fork of this one process, which has imported torch and the
project's modules once: a case then costs its own work, not the second or two that every fresh interpreter spends
importing torch. Each case runs its script as `python SCRIPT ARGS` would (runpy as __main__, sys.argv set, stdout and
stderr into files) and ends as the interpreter ends: SystemExit's code (a message is printed to stderr, exit 1),
an uncaught exception's traceback on stderr and exit 1, or 0. Used by tests/test_bad_inputs.py.

    python tests/forked.py < cases.json     # [[script, [args...], stdout_path, stderr_path], ...] -> exit codes
"""
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402,F401  what every case would import again
import train  # noqa: E402,F401  and with it data, model, parallel, runtime/ (none of them starts MPI)


def case(script, args, out, err):
    """In the child: run script with args, stdout and stderr into the files out and err; never returns."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv, sys.path[0] = [os.path.join(ROOT, script), *args], os.path.dirname(os.path.join(ROOT, script))
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(cases, parallel=2):
    codes, running = [None] * len(cases), {}
    for i, (script, args, out, err) in enumerate(cases):
        if len(running) == parallel:
            pid, status = os.wait()
            codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
        pid = os.fork()
        if pid == 0:
            os.chdir(ROOT)
            case(script, args, out, err)
        running[pid] = i
    while running:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return codes


if __name__ == "__main__":
    print(json.dumps(main(json.load(sys.stdin))))
