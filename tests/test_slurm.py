"""Training under a real Slurm (tests/slurm.py starts one on this machine): srun and mpiexec inside an allocation
train as mpiexec does; docs/slurm.sbatch as written survives a stop signal during start-up, its own --signal
warning and scancel, requeueing itself, with no step lost or changed; a task that dies ends the job and --resume
continues; and the launches that go wrong (srun without --mpi=pmi2, another MPI's mpirun, a second run on a live
--out) are refused before anything is written."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import slurm
from conftest import ROOT, SMALL
from helpers import MPIEXEC, OPENMPI, needs_mpiexec, train_rows as rows

PY, TRAIN = sys.executable, os.path.join(ROOT, "train.py")
pytestmark = needs_mpiexec


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm.missing()
    if why:
        pytest.skip(why)
    c = slurm.Slurm(str(tmp_path_factory.mktemp("slurm")))
    yield c
    c.stop()


def resumed_at(step, text):
    return re.search(rf"resumed from \S+ at step {step}\b", text) is not None


def mpiexec(args, out, n=2):
    subprocess.run([MPIEXEC, "-n", str(n), PY, TRAIN, *map(str, args), "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    return rows(out)


def launchers():
    """docs/slurm.md's two launch lines inside an allocation, as written up to train.py: {"srun": [...],
    "mpiexec": [...]}. The tests give them their own toy-sized arguments."""
    with open(os.path.join(ROOT, "docs", "slurm.md")) as f:
        block = f.read().split("## Launching inside an allocation")[1].split("```bash")[1].split("```")[0]
    lines = [line.split() for line in block.strip().splitlines()]
    return {words[0].split("/")[-1]: words[:words.index("train.py") + 1] for words in lines}


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--tp", "1", "--zero1", "true"]], ids=["tp2", "dp2-zero1"])
def test_srun_pmi2_trains_as_mpiexec_does(cluster, prepared, tmp_path, layout):
    """docs/slurm.md's srun line: the venv's MPICH meets over Slurm's PMI-2; the same losses as under mpiexec."""
    args = [*SMALL, "--data", prepared, "--max_steps", 4, "--eval_interval", 4, *layout]
    cluster.run(*launchers()["srun"], *map(str, args), "--out", str(tmp_path / "srun"), cwd=ROOT, timeout=300)
    assert rows(tmp_path / "srun") == mpiexec(args, tmp_path / "mpiexec") and len(rows(tmp_path / "srun")) == 4


def test_mpiexec_inside_an_allocation(cluster, prepared, tmp_path):
    """docs/slurm.md's mpiexec line inside sbatch: MPICH's launcher starts its ranks through Slurm (one srun task
    per node), a world of 2 where SLURM_STEP_NUM_TASKS is 1, which the launch check must accept."""
    args = [*SMALL, "--data", prepared, "--max_steps", 3, "--eval_interval", 3, "--tp", 2]
    cmd = " ".join([*launchers()["mpiexec"], *map(str, args), "--out", str(tmp_path / "sbatch")])
    job = cluster.sbatch("-n", "2", "--chdir", ROOT, "-o", tmp_path / "log", "--wrap", cmd)
    fields = cluster.wait(job, lambda f: f["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"), timeout=240)
    assert fields["JobState"] == "COMPLETED", (tmp_path / "log").read_text()
    assert "world 2 = tp 2 x dp 1" in (tmp_path / "log").read_text()
    assert rows(tmp_path / "sbatch") == mpiexec(args, tmp_path / "mpiexec")


def test_the_docs_slurm_commands_are_the_tested_ones():
    """Every Slurm command in the README and docs/ is one of the forms the tests here run: srun with --mpi=pmi2
    (never pmix, which the venv's MPICH does not speak), sbatch of docs/slurm.sbatch, scancel of a job with or
    without --signal=USR1, scontrol requeue in the script; and the script's own srun line is the docs' form."""
    docs = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "slurm.sbatch")] + \
        [os.path.join(ROOT, "docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs"))) if n.endswith(".md")]
    seen = set()
    for path in docs:
        with open(path) as f:
            text = f.read()
        code = path.endswith(".sbatch")
        for line in text.splitlines():
            if line.startswith("```"):
                code = not code
            words = [w.strip("`") for w in line.split("#", 1)[0].split()] if code else []
            if line.startswith("|"):  # a table row names a command in its first cell
                words = line.split("|")[1].strip(" `[").split()
            for i, w in enumerate(words):
                if w in ("srun", "sbatch", "scancel", "scontrol", "salloc") and (i == 0 or words[i - 1] in
                                                                                   ("then", "&&", ";")):
                    rest = words[i + 1:]
                    seen.add(w)
                    if w == "srun":
                        assert "--mpi=pmi2" in rest, (path, line)
                    elif w == "sbatch":
                        assert any(r.endswith("docs/slurm.sbatch") for r in rest), (path, line)
                    elif w == "scancel":
                        assert [r for r in rest if r.startswith("-")] in ([], ["--signal=USR1"]), (path, line)
                    elif w == "scontrol":
                        assert rest[:1] == ["requeue"] or rest[:2] == ["show", "config"], (path, line)
                    else:
                        raise AssertionError(f"{path}: {line}: salloc is not tested")
    assert seen >= {"srun", "sbatch", "scancel", "scontrol"}, seen


def test_srun_without_pmi_is_refused(cluster, prepared, tmp_path):
    """Slurm's default MpiDefault=none: two processes that each see a world of 1. Refused on every task, with the
    fix, before --out is touched."""
    proc = cluster.run("srun", "-n", "2", "--mpi=none", PY, TRAIN, *map(str, SMALL), "--data", prepared,
                       "--max_steps", 3, "--out", str(tmp_path / "run"), cwd=ROOT, check=False, timeout=300)
    assert proc.returncode != 0 and proc.stderr.count("error: srun started 2 processes") == 1, proc.stderr
    assert "srun --mpi=pmi2" in proc.stderr and re.search(r"tasks 0-1: Exited with exit code 1|task 1: Exited "
                                                          r"with exit code 1", proc.stderr), proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not os.path.exists(os.path.join(OPENMPI, "bin", "mpirun")), reason="no Open MPI in .venv")
def test_another_mpis_mpirun_is_refused(prepared, tmp_path):
    """Open MPI's mpirun over mpi4py built with MPICH: MPICH's MPI_Init would abort with a message naming neither;
    refused before MPI starts, with the fix."""
    proc = subprocess.run([os.path.join(OPENMPI, "bin", "mpirun"), "--allow-run-as-root", "--oversubscribe", "-n",
                           "2", PY, TRAIN, *map(str, SMALL), "--data", prepared, "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0 and err.count("error: Open MPI's mpirun") == 1 and ".venv/bin/mpiexec" in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_second_run_on_a_live_out_is_refused(prepared, tmp_path):
    """One run per --out: the second is refused while the first lives, and the first's files are untouched; once
    it is killed (no clean-up), its lock is gone."""
    args = [PY, TRAIN, *map(str, SMALL), "--data", prepared, "--out", str(tmp_path / "run")]
    first = subprocess.Popen([*args, "--max_steps", "100000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run([*args, "--max_steps", "3", "--resume"], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 1 and "is in use by a run that is still live" in second.stderr, second.stderr
        assert f"pid {first.pid}" in second.stderr and first.poll() is None
    finally:
        first.kill()
        first.wait()
    steps = rows(tmp_path / "run")[-1][0]
    subprocess.run([*args, "--max_steps", str(steps + 2), "--resume"], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)


def started(cluster, job, timeout=120):
    """Wait until both tasks of the job's step run train.py's first lines: they catch SIGUSR1 (runtime/errors.py
    stop_during_start_up), so a signal now no longer kills them outright; importing torch takes a second or more."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = cluster.pids(job)
        try:
            caught = [int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("SigCgt")),
                          16) for pid in pids.values()]
        except (OSError, StopIteration):
            caught = []
        if len(caught) == 2 and all(mask >> (signal.SIGUSR1 - 1) & 1 for mask in caught):
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job}'s tasks did not start within {timeout} s")


def test_sbatch_script_requeues_and_resumes_exactly(cluster, prepared, tmp_path):
    """docs/slurm.sbatch as written (a one-node, CPU-sized layout and a one-minute limit on sbatch's command line; a
    toy model after the script's own arguments). Its life: (1) a SIGUSR1 while the tasks import torch ends them
    with 75, nothing written; the script requeues the job; (2) the script's --signal=USR1@300 arrives (Slurm's
    check runs every 30 s): a checkpoint at the step reached, 75, requeued; (3) the next run resumes from it, and
    `scancel` (SIGTERM to every task at once) makes a last checkpoint. The losses and gradient norms of every step
    equal an uninterrupted run's, which runs beside the job meanwhile."""
    out, log = tmp_path / "run", tmp_path / "job.log"
    args = [*SMALL, "--data", prepared, "--tp", 2, "--max_steps", 100000, "--eval_interval", 100000,
            "--ckpt_interval", 100000]
    script = ["--sequence_parallel", "true", "--zero1", "true"]  # the script's own, which the reference needs too
    reference = subprocess.Popen([MPIEXEC, "-n", "2", PY, TRAIN, *map(str, args + script), "--out", str(tmp_path / "ref")],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        job = cluster.sbatch("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=1", "--chdir", ROOT,
                             "--output", log, os.path.join(ROOT, "docs", "slurm.sbatch"), *args, "--out", out)
        # (1) a stop signal during start-up
        started(cluster, job)
        cluster.run("scancel", "--signal=USR1", job)
        cluster.wait(job, lambda f: int(f["Restarts"]) >= 1, timeout=60)
        assert "SIGUSR1 during start-up" in log.read_text() and not os.path.exists(out / "metrics.jsonl")
        # (2) Slurm's own warning, in a later run (one that it caught during start-up requeues again)
        cluster.wait(job, lambda f: "signal SIGUSR1" in log.read_text(), timeout=150, every=0.5)
        stopped = rows(out)[-1][0]
        # (3) resumed; scancel stops it at once, with a checkpoint
        cluster.wait(job, lambda f: resumed_at(stopped, log.read_text()) and
                     len(rows(out)) >= stopped + 3, timeout=120, every=0.5)
        cluster.run("scancel", job)
        fields = cluster.wait(job, lambda f: f["JobState"] not in ("RUNNING", "COMPLETING", "PENDING"), timeout=60)
    finally:
        reference.send_signal(signal.SIGTERM)
        reference.wait(120)
    text = log.read_text()
    assert fields["JobState"] == "CANCELLED" and "signal SIGTERM" in text and "Traceback" not in text, text
    last = rows(out)[-1][0]
    assert os.path.exists(out / f"ckpt_{last:07d}.tp0of2.pt") and os.path.exists(out / f"ckpt_{stopped:07d}.tp0of2.pt")
    ref = rows(tmp_path / "ref")
    if len(ref) < last:  # the job ran ahead of it: continue the reference (its own resume is exact: test_stopping)
        ref = mpiexec([*args, *script, "--max_steps", last, "--resume"], tmp_path / "ref")
    assert rows(out) == ref[:last] and [r[0] for r in rows(out)] == list(range(1, last + 1))


def test_a_dead_task_ends_the_job_and_resume_continues(cluster, prepared, tmp_path):
    """A node failure's stand-in: one task killed (SIGKILL) while training. The job ends (it does not hang),
    naming the rank that is gone; --resume continues from the last checkpoint."""
    out = tmp_path / "run"
    cmd = ["srun", "-n", "2", "--mpi=pmi2", PY, TRAIN, *map(str, SMALL), "--data", prepared, "--tp", "2",
           "--ckpt_interval", "5", "--collective_timeout_s", "10", "--out", str(out)]
    job_proc = subprocess.Popen([*cmd, "--max_steps", "100000"], cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(out / "ckpt_0000010.tp1of2.pt"):
        time.sleep(0.1)
    job = cluster.run("squeue", "-h", "-o", "%i").stdout.split()[0]
    os.kill(cluster.pids(job)[1], signal.SIGKILL)
    _, err = job_proc.communicate(timeout=120)
    assert job_proc.returncode != 0 and "Rank(s) [1] did not answer" in err and "--resume" in err, err
    saved = max(int(n[5:12]) for n in os.listdir(out) if n.endswith(".tp1of2.pt"))
    proc = subprocess.run([*cmd, "--max_steps", str(saved + 2), "--resume"], cwd=ROOT, env=cluster.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and resumed_at(saved, proc.stdout), proc.stdout + proc.stderr
    assert rows(out)[-1][0] == saved + 2


def test_the_launch_check_reads_the_innermost_launcher():
    """launch_refusal's rules on the environments a cluster gives, without launching: only what is known to fail
    is refused, and the innermost launcher's word counts."""
    from runtime.mpi import launch_refusal
    mpich, ompi5, ompi4 = "MPICH Version:      5.0.2\nMPICH configure: --with-pm=hydra", "Open MPI v5.0.11, x", \
        "Open MPI v4.1.6, x"
    hydra = {"PMI_FD": "5", "PMI_RANK": "1", "PMI_SIZE": "2"}
    assert launch_refusal(mpich, None, {**hydra, "PMIX_RANK": "0"}) is None  # mpiexec in an salloc shell of a PMIx site
    assert "Open MPI's mpirun" in launch_refusal(mpich, None, {"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert launch_refusal("Intel(R) MPI Library 2021.10", None, {"PMIX_RANK": "1"}) is None  # may speak PMIx
    assert launch_refusal(ompi4, None, hydra) is None and "PMI-1/PMI-2 launcher" in launch_refusal(ompi5, None, hydra)
    assert launch_refusal(mpich, 2, {**hydra, "SLURM_STEP_NUM_TASKS": "1"}) is None  # mpiexec inside sbatch
    assert launch_refusal(ompi5, 2, {"PMI_SIZE": "8", "OMPI_COMM_WORLD_SIZE": "2"}) is None  # a stale PMI_SIZE
    assert "srun started 2 processes" in launch_refusal(mpich, 1, {"SLURM_STEP_NUM_TASKS": "2"})
    assert launch_refusal(mpich, 1, {"SLURM_STEP_NUM_TASKS": "2", "NANOYUAN_LAUNCH_CHECK": "off"}) is None
    assert launch_refusal(mpich, 1, {"SLURM_STEP_NUM_TASKS": "1"}) is None and launch_refusal(mpich, 1, {}) is None
