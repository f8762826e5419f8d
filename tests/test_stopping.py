"""What happens when a run is stopped or goes wrong (stopping.py, checkpoint.py): batch-system signals and the time
limit (a checkpoint, exit 75, an exact resume), a second signal, divergence, a full file system while a checkpoint
is written, and an unreadable newest checkpoint."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SMALL, read_metrics, run
from test_parallel import MPIEXEC, needs_mpiexec

TRAIN = os.path.join(ROOT, "train.py")


def train_rows(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out) if "loss" in r]


def start(cmd, out):
    """Launch a long run and wait until it has logged 3 training steps."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out / "metrics.jsonl") and len(train_rows(out)) >= 3:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the run did not reach step 3: " + "".join(proc.communicate()))


@pytest.mark.parametrize("ranks, sig", [(1, signal.SIGTERM), pytest.param(2, signal.SIGUSR1, marks=needs_mpiexec)],
                         ids=["sigterm", "tp2-sigusr1-mpiexec"])
def test_signal_checkpoints_exits_75_and_resumes_exactly(prepared, tmp_path, ranks, sig):
    """The signal reaches the launcher (which forwards it to every rank, as Slurm's does to every task): each rank
    finishes the step, a checkpoint of that step is written, the job exits 75; --resume then continues bit for bit
    (the losses and gradient norms of an uninterrupted run)."""
    args = [*SMALL, "--data", prepared, "--lr_decay_steps", 40, "--eval_interval", 1000, "--tp", ranks]
    cmd = [sys.executable, TRAIN, *map(str, args)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    proc = start([*cmd, "--out", str(tmp_path / "a"), "--max_steps", "100000"], tmp_path / "a")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and f"signal {sig.name}" in err and "Traceback" not in err, err
    stopped = train_rows(tmp_path / "a")[-1][0]
    suffix = "" if ranks == 1 else ".tp0of2"
    assert os.path.exists(tmp_path / "a" / f"ckpt_{stopped:07d}{suffix}.pt")
    end = stopped + 2
    subprocess.run([*cmd, "--out", str(tmp_path / "a"), "--max_steps", str(end), "--resume"], cwd=ROOT, check=True,
                   capture_output=True, timeout=180)
    subprocess.run([*cmd, "--out", str(tmp_path / "b"), "--max_steps", str(end)], cwd=ROOT, check=True,
                   capture_output=True, timeout=180)
    assert train_rows(tmp_path / "a") == train_rows(tmp_path / "b") and train_rows(tmp_path / "b")[-1][0] == end


def test_a_second_signal_exits_at_once(prepared, tmp_path):
    """The second SIGINT is sent as soon as the run has said it got the first, while the step that the first one
    lets finish still runs: steps of 64 micro-batches, a few tenths of a second here."""
    proc = start([sys.executable, TRAIN, *map(str, [*SMALL, "--data", prepared, "--out", tmp_path / "a",
                                                    "--max_steps", 100000, "--batch_tokens", 64 * 128])],
                 tmp_path / "a")
    lines, heard = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "SIGINT: finishing this step" in line:
                heard.set()
    reader = threading.Thread(target=read)
    reader.start()
    proc.send_signal(signal.SIGINT)
    assert heard.wait(30), "".join(lines)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join()
    assert proc.returncode == 128 + signal.SIGINT and "second signal" in "".join(lines), "".join(lines)


def test_time_limit_checkpoints_and_exits_75(prepared, tmp_path):
    t0 = time.time()
    proc = run("train.py", *SMALL, "--data", prepared, "--out", tmp_path / "a", "--max_steps", 100000,
               "--time_limit_min", 0.1, check=False)
    assert proc.returncode == 75 and "--time_limit_min 0.1 is near" in proc.stderr, proc.stderr
    assert time.time() - t0 < 6 + 30  # 6 s of limit, and the interpreter's start and exit
    stopped = train_rows(tmp_path / "a")[-1][0]
    assert stopped > 3 and os.path.exists(tmp_path / "a" / f"ckpt_{stopped:07d}.pt")


def test_divergence_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    """--lr 50: the weights blow up, then every step is skipped for non-finite gradients. The run stops after
    --max_skipped_steps of them, naming the last checkpoint written before, which rotation has kept."""
    proc = run("train.py", *SMALL, "--data", prepared, "--out", tmp_path / "a", "--max_steps", 200, "--lr", 50,
               "--ckpt_interval", 2, "--keep_ckpts", 1, "--max_skipped_steps", 10, check=False)
    assert proc.returncode == 1 and "training diverged at step" in proc.stderr and "Traceback" not in proc.stderr
    assert "10 steps in a row were skipped" in proc.stderr, proc.stderr
    named = proc.stderr.split("The last checkpoint written before: ")[1].split(".pt")[0] + ".pt"
    assert os.path.exists(named), proc.stderr
    rows = read_metrics(tmp_path / "a")
    first_skip = next(r["step"] for r in rows if r.get("skipped"))
    assert int(os.path.basename(named)[5:12]) < first_skip  # written before the trouble began


@pytest.fixture
def tiny_fs(tmp_path):
    """A 3 MB tmpfs (root only): room for one checkpoint of SMALL (~1.7 MB), not two."""
    path = tmp_path / "fs"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_full_disk_while_checkpointing(prepared, tiny_fs):
    proc = run("train.py", *SMALL, "--data", prepared, "--out", tiny_fs / "run", "--max_steps", 4,
               "--ckpt_interval", 2, check=False)
    assert proc.returncode == 1 and "cannot write checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert "ckpt_0000004.pt" in proc.stderr and "GB are free there" in proc.stderr, proc.stderr
    assert sorted(n for n in os.listdir(tiny_fs / "run") if n.startswith("ckpt")) == ["ckpt_0000002.pt"]


def test_unreadable_newest_checkpoint_falls_back(prepared, tmp_path):
    common = [*SMALL, "--data", prepared, "--out", tmp_path / "a", "--ckpt_interval", 3, "--lr_decay_steps", 10]
    run("train.py", *common, "--max_steps", 6)
    before = train_rows(tmp_path / "a")
    newest = tmp_path / "a" / "ckpt_0000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash or a full disk
    proc = run("train.py", *common, "--max_steps", 6, "--resume")
    assert "the newest checkpoint (step 6) cannot be read; falling back to step 3" in proc.stdout, proc.stdout
    assert "cannot read checkpoint" in proc.stderr and str(newest) in proc.stderr
    assert train_rows(tmp_path / "a") == before  # steps 4 to 6 again, the same


def rank_pids(marker, rank):
    """The pids of the processes of MPI rank `rank` whose command line contains marker (MPICH sets PMI_RANK)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if marker in cmdline and "train.py" in cmdline and f"PMI_RANK={rank}" in environ:
            pids.append(int(pid))
    return pids


@needs_mpiexec
def test_a_hung_rank_ends_the_job_and_is_named(prepared, tmp_path):
    """Rank 1 stopped (SIGSTOP: what a wedged GPU or file system looks like to the others): rank 0's collective times
    out after --collective_timeout_s, rank 0 names rank 1 and the job ends non-zero, within the timeout + 30 s."""
    out = tmp_path / "hang"
    proc = start([MPIEXEC, "-n", "2", sys.executable, TRAIN, *map(str, [*SMALL, "--data", prepared, "--out", out,
                                                                        "--max_steps", 100000,
                                                                        "--collective_timeout_s", 8])], out)
    stopped = rank_pids(str(out), 1)
    assert stopped, "rank 1's process not found"
    try:
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        _, err = proc.communicate(timeout=8 + 60)
        assert proc.returncode != 0 and time.time() - t0 < 8 + 30, err
        assert "Rank(s) [1] did not arrive" in err, err
    finally:
        proc.kill()
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@needs_mpiexec
def test_subgroup_collectives_time_out_too():
    """The tensor- and data-parallel groups get --collective_timeout_s as well (new_group does not inherit it: 30
    minutes). Before, a rank stopped while the other waited in the loss's all-reduce over dp hung the job."""
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "tests", "mpi_group_timeout.py")],
                          capture_output=True, text=True, timeout=120)
    seconds = float(proc.stdout.split("timed out after ")[1].split(" s")[0]) if "timed out after" in proc.stdout \
        else None
    assert seconds is not None and seconds < 10, proc.stdout + proc.stderr  # 3 s, not rank 1's 20 s sleep
