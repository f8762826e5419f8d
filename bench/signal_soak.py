"""Job-wide SIGTERMs, many times: how many end in a checkpoint at the step reached? PBS, LSF and a job-wide `kill`
signal mpiexec and every rank at once, and mpiexec forwards its copy, so each rank gets the signal twice. Each trial
starts a tp 2 run under mpiexec, lets it train a random while, sends SIGTERM to the launcher and to both ranks in a
random order and with a random gap (or with one `kill` command listing them all, as a user would), and records the
exit code and whether a checkpoint of the last logged step was written. Run by hand; results in bench/RESULTS.md.

    python bench/signal_soak.py [--trials 20] [--preset tiny] [--root DIR] [--workdir DIR] [--seed 0]

--root runs another checkout's train.py (an older commit, to measure what a change fixed).
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ranks_of(out):
    """The pids of the ranks (not the launcher, not hydra's proxy) whose command line names `out`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "train.py" in " ".join(argv) and out in argv and "mpiexec" not in argv[0] and "hydra" not in argv[0]:
            pids.append(int(pid))
    return pids


def signal_job(launcher, ranks, rng):
    """One job-wide SIGTERM, in one of the ways a batch system or a user sends it; returns how."""
    how = rng.choice(["kill command", "launcher first", "ranks first"])
    if how == "kill command":
        subprocess.run(["kill", "-TERM", str(launcher), *map(str, ranks)])
        return how
    gap = rng.uniform(0.0, 0.5)
    first, then = ([launcher], ranks) if how == "launcher first" else (ranks, [launcher])
    for group in (first, then):
        for pid in group:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # the job has already left
                pass
        time.sleep(gap)
    return f"{how}, {gap:.2f} s apart"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--root", default=ROOT, help="the checkout whose train.py runs")
    p.add_argument("--workdir", default="/tmp/signal_soak")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng, py = random.Random(args.seed), sys.executable
    mpiexec = os.path.join(os.path.dirname(py), "mpiexec")
    data = os.path.join(args.workdir, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        os.makedirs(args.workdir, exist_ok=True)
        text = os.path.join(args.workdir, "sanguo30.txt")
        with open(os.path.join(ROOT, "corpus", "sanguo.txt"), encoding="utf-8") as f:
            open(text, "w", encoding="utf-8").writelines(f.readlines()[:30])
        tok = os.path.join(args.workdir, "tok.tiktoken")
        subprocess.run([py, os.path.join(ROOT, "data.py"), "train-tokenizer", "--input", text, "--vocab-size", "512",
                        "--out", tok], check=True, capture_output=True)
        subprocess.run([py, os.path.join(ROOT, "data.py"), "prepare", "--input", text, "--tokenizer", tok, "--out",
                        data, "--val-fraction", "0.2"], check=True, capture_output=True)
    good = 0
    print(f"{args.trials} job-wide SIGTERMs, {args.preset} preset, tp 2 under {mpiexec}, train.py of {args.root}")
    for trial in range(args.trials):
        out = os.path.join(args.workdir, f"run{trial}")
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([mpiexec, "-n", "2", py, os.path.join(args.root, "train.py"), "--preset", args.preset,
                                 "--device", "cpu", "--dtype", "fp32", "--tp", "2", "--data", data, "--out", out,
                                 "--max_steps", "100000", "--eval_interval", "100000", "--ckpt_interval", "100000"],
                                cwd=args.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        metrics = os.path.join(out, "metrics.jsonl")
        while not (os.path.exists(metrics) and os.path.getsize(metrics)) and proc.poll() is None:
            time.sleep(0.1)  # wait for the first step, then train a random while
        time.sleep(rng.uniform(0.5, 5.0))
        how = signal_job(proc.pid, ranks_of(out), rng)
        _, err = proc.communicate(timeout=300)
        with open(metrics) as f:
            last = max([0] + [row["step"] for row in map(json.loads, f) if "loss" in row])
        saved = all(os.path.exists(os.path.join(out, f"ckpt_{last:07d}.tp{r}of2.pt")) for r in (0, 1))
        ok = proc.returncode == 75 and saved
        good += ok
        verdict = "ok" if ok else "NO CHECKPOINT" if not saved else "exit not 75: a requeue script gives up"
        print(f"trial {trial + 1:2d}: {how:28s} exit {proc.returncode:3d}, step {last:4d}, "
              f"checkpoint {'yes' if saved else 'no '}  {verdict}", flush=True)
    print(f"{good} of {args.trials} ended in a checkpoint at the step reached, exit 75")


if __name__ == "__main__":
    main()
