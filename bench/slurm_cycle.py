"""The batch-system life cycle on a real one-node Slurm (tests/slurm.py; Debian's slurm-wlm and munge, as root):
docs/slurm.sbatch as written, at toy size on the CPU, with a one-minute time limit.

    .venv/bin/python bench/slurm_cycle.py [--data out/demo/data]     # about 3 minutes

1. --signal: the script's SIGUSR1 (300 s before a 1-minute limit: at slurmctld's next 30-s check) stops the run;
   it checkpoints, exits 75 and requeues itself; the requeued run resumes. Measured: the time from the signal's
   line in the log to the checkpoint file on disk, and the steps lost (the last step trained before the stop minus
   the step the requeued run resumed from: the goal is 0).
2. The time limit alone (the script without its --signal line, as a team that left it out would run it): Slurm
   sends SIGTERM to every task, then SIGKILL KillWait (30 s) later. Measured: SIGTERM to the checkpoint on disk,
   the steps lost, and the job's end state (TIMEOUT: Slurm does not requeue it; submitting again resumes).
Prints one line per figure, for bench/RESULTS.md."""
import argparse
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import slurm  # noqa: E402

TOY = ["--preset", "tiny", "--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--seq_len", "32", "--micro_batch",
       "4", "--batch_tokens", "256", "--dtype", "fp32", "--device", "cpu", "--tp", "2", "--max_steps", "1000000",
       "--eval_interval", "1000000", "--ckpt_interval", "1000000"]


def steps(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if '"loss"' in line]


def watch(log, pattern, timeout):
    """Poll the job's log until a line matches; (the time it was first seen, the match)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, open(log).read()) if os.path.exists(log) else None
        if m:
            return time.time(), m
        time.sleep(0.02)
    raise SystemExit(f"{pattern!r} did not appear in {log} within {timeout} s")


def cycle(cluster, data, tmp, name, script):
    out, log = os.path.join(tmp, name), os.path.join(tmp, name + ".log")
    job = cluster.sbatch("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=1", "--chdir", ROOT,
                         "--output", log, script, *TOY, "--data", data, "--out", out)
    seen, m = watch(log, r"rank 0: (SIGUSR1|SIGTERM): finishing this step", 200)
    _, stop = watch(log, r"stopped at step (\d+) \(signal (\w+)\)", 120)
    step = int(stop[1])
    ckpt = os.path.join(out, f"ckpt_{step:07d}.tp0of2.pt")
    to_disk = os.path.getmtime(ckpt) - seen
    trained = max(steps(out))  # before a resume rewinds anything, the rows of the stopped run
    print(f"{name}: {m[1]} reached rank 0 at step ~{trained}; checkpoint of step {step} on disk {to_disk:.2f} s "
          f"after the signal's line")
    return job, out, log, step, trained


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "out", "demo", "data"))
    data = ap.parse_args().data
    if not os.path.exists(os.path.join(data, "meta.json")):
        raise SystemExit(f"no prepared data in {data}.\nHINT: make out/demo/data/meta.json, or --data DIR")
    why = slurm.missing()
    if why:
        raise SystemExit(why)
    tmp = tempfile.mkdtemp(prefix="slurm_cycle_")
    cluster = slurm.Slurm(os.path.join(tmp, "slurm"))
    try:
        print(f"{cluster.run('sinfo', '-V').stdout.strip()}, KillWait "
              f"{cluster.run('scontrol', 'show', 'config').stdout.split('KillWait')[1].split()[1]}")
        script = os.path.join(ROOT, "docs", "slurm.sbatch")
        job, out, log, step, trained = cycle(cluster, data, tmp, "signal", script)
        cluster.wait(job, lambda f: int(f["Restarts"]) >= 1, timeout=60)
        _, resumed = watch(log, r"resumed from \S+ at step (\d+)", 120)
        print(f"signal: requeued (Restarts 1), resumed at step {resumed[1]}: steps lost {trained - int(resumed[1])}")
        cluster.run("scancel", job)
        cluster.wait(job, lambda f: f["JobState"] not in ("RUNNING", "COMPLETING", "PENDING"), timeout=120)
        with open(script) as f:
            lines = [line for line in f if not line.startswith("#SBATCH --signal")]
        script = os.path.join(tmp, "no-signal.sbatch")
        with open(script, "w") as f:
            f.writelines(lines)
        job, out, log, step, trained = cycle(cluster, data, tmp, "time-limit", script)
        fields = cluster.wait(job, lambda f: f["JobState"] not in ("RUNNING", "COMPLETING"), timeout=120)
        print(f"time-limit: job {fields['JobState']}, exit {fields['ExitCode']}; checkpoint at step {step}, last "
              f"step trained {trained}: steps lost {trained - step}")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
