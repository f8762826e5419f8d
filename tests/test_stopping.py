"""What happens when a run is stopped or goes wrong (runtime/stopping.py, run/checkpoint.py): batch-system signals and the time
limit (a checkpoint, exit 75, an exact resume), copies of a signal (a job-wide SIGTERM that each rank also gets from
mpiexec), a deliberate second signal and SIGQUIT, divergence, a full file system while a checkpoint is written, and
an unreadable newest checkpoint."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SMALL, read_metrics, run
from runtime.stopping import NOW, judge
from helpers import MPIEXEC, needs_mpiexec, train_rows

TRAIN = os.path.join(ROOT, "train.py")


def start(cmd, out, rows=3):
    """Launch a long run and wait until metrics.jsonl holds `rows` training steps."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out / "metrics.jsonl") and len(train_rows(out)) >= rows:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the run did not reach step {rows}: " + "".join(proc.communicate()))


class Lines:
    """A process's stderr, read as it comes: wait(text) until a line holds it."""

    def __init__(self, stream):
        self.lines, self.changed = [], threading.Condition()
        self.reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.reader.start()

    def _read(self, stream):
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait(self, text, timeout=30):
        with self.changed:
            return self.changed.wait_for(lambda: text in "".join(self.lines), timeout)

    def __str__(self):
        return "".join(self.lines)

    __repr__ = __str__  # what an assertion prints


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


def test_judge_copies_and_deliberate_second_signals():
    """stopping.judge by hand: the first stop signal stops, the same request within the grace period is a copy (any
    of SIGTERM, SIGUSR1, SIGINT), one at or after it exits now, and SIGQUIT exits now whenever it comes."""
    term, usr1, sigint = signal.SIGTERM, signal.SIGUSR1, signal.SIGINT
    assert judge(term, now=100.0, first=0, first_at=0.0, grace_s=5) == "stop"
    assert judge(term, now=100.03, first=term, first_at=100.0, grace_s=5) == "copy"  # mpiexec's forwarded copy
    assert judge(usr1, now=104.99, first=term, first_at=100.0, grace_s=5) == "copy"
    assert judge(sigint, now=105.0, first=term, first_at=100.0, grace_s=5) == "now"  # a deliberate second
    assert judge(term, now=100.001, first=term, first_at=100.0, grace_s=0) == "now"  # --signal_grace_s 0: as before
    assert judge(NOW, now=100.0, first=0, first_at=0.0, grace_s=5) == "now"
    assert judge(NOW, now=100.01, first=term, first_at=100.0, grace_s=5) == "now"


def test_a_second_signal_exits_at_once_without_grace(prepared, tmp_path):
    """--signal_grace_s 0: every second signal is deliberate. It is sent as soon as the run has said it got the
    first, while the step that the first one lets finish still runs: steps of 64 micro-batches, a few tenths of a
    second here."""
    proc = start([sys.executable, TRAIN, *map(str, [*SMALL, "--data", prepared, "--out", tmp_path / "a",
                                                    "--max_steps", 100000, "--batch_tokens", 64 * 128,
                                                    "--signal_grace_s", 0])], tmp_path / "a")
    err = Lines(proc.stderr)
    proc.send_signal(signal.SIGINT)
    assert err.wait("SIGINT: finishing this step"), err
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err.reader.join()
    assert proc.returncode == 128 + signal.SIGINT and "second signal" in str(err), err


def test_sigquit_exits_at_once(prepared, tmp_path):
    """SIGQUIT (Ctrl-\\) means "now": exit 131 without a checkpoint (not the default core dump, which for a large
    model can fill a disk)."""
    proc = start([sys.executable, TRAIN, *map(str, [*SMALL, "--data", prepared, "--out", tmp_path / "a",
                                                    "--max_steps", 100000])], tmp_path / "a")
    proc.send_signal(signal.SIGQUIT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGQUIT and "SIGQUIT: exiting now, without a checkpoint" in err, err
    assert not [n for n in os.listdir(tmp_path / "a") if n.startswith("ckpt_")]


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


def alive(pid):
    """Running, not a zombie that its parent has yet to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(pids, sig=signal.SIGTERM):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # already gone: nothing left to signal
            pass


# How a job-wide SIGTERM reaches a tp 2 job (PBS, LSF, a job-wide kill): the launcher and the ranks are signalled,
# and mpiexec forwards its copy to every rank. (first, seconds between, then)
JOB_WIDE = [("launcher and ranks", 0.0, "nobody"),
            ("ranks", 0.05, "launcher"),  # the forwarded copy 50 ms behind the direct one
            ("launcher", 0.05, "ranks"),  # the direct copy 50 ms behind the forwarded one
            ("ranks", 0.5, "launcher"),  # the forwarded copy arrives while the ranks leave
            ("launcher", 0.0, "rank 1")]  # rank 0 gets the forwarded copy only


@needs_mpiexec
def test_job_wide_sigterm_each_rank_gets_twice_checkpoints_every_time(prepared, tmp_path):
    """Five job-wide SIGTERMs in a row at tp 2, one per pattern of JOB_WIDE, each in a run resumed from the last
    stop: every one exits 75 with a checkpoint at the step reached, and the whole stopped-and-resumed run then
    equals an uninterrupted one, loss for loss. Before runtime/stopping.py took the copies as one request, a copy
    50 ms or more behind exited at once: 143 and no checkpoint, or exit 15 from mpiexec."""
    cmd = [MPIEXEC, "-n", "2", sys.executable, TRAIN, *map(str, [*SMALL, "--data", prepared, "--lr_decay_steps", 40,
                                                                 "--eval_interval", 1000, "--tp", 2])]
    out, stops = tmp_path / "a", []
    for i, (first, gap, then) in enumerate(JOB_WIDE):
        proc = start([*cmd, "--out", str(out), "--max_steps", "100000", *(["--resume"] if i else [])], out,
                     rows=(stops[-1] if stops else 0) + 3)
        ranks = rank_pids(str(out), 0) + rank_pids(str(out), 1)
        who = {"launcher and ranks": [proc.pid, *ranks], "launcher": [proc.pid], "ranks": ranks,
               "rank 1": rank_pids(str(out), 1), "nobody": []}
        assert len(ranks) == 2
        kill(who[first])
        time.sleep(gap)
        kill(who[then])
        _, err = proc.communicate(timeout=120)
        pattern = f"{first}, then {then} {gap} s later"
        assert proc.returncode == 75 and "signal SIGTERM" in err and "Traceback" not in err, f"{pattern}:\n{err}"
        stops.append(train_rows(out)[-1][0])
        for tp_rank in (0, 1):
            assert os.path.exists(out / f"ckpt_{stops[-1]:07d}.tp{tp_rank}of2.pt"), f"{pattern}: {stops}"
    end = stops[-1] + 2
    subprocess.run([*cmd, "--out", str(out), "--max_steps", str(end), "--resume"], cwd=ROOT, check=True,
                   capture_output=True, timeout=180)
    subprocess.run([*cmd, "--out", str(tmp_path / "b"), "--max_steps", str(end)], cwd=ROOT, check=True,
                   capture_output=True, timeout=180)
    assert train_rows(out) == train_rows(tmp_path / "b") and [r[0] for r in train_rows(out)] == [*range(1, end + 1)]


@needs_mpiexec
def test_a_deliberate_second_signal_exits_even_from_a_hung_collective(prepared, tmp_path):
    """Rank 1 stopped, so rank 0 waits in a collective (inside C++, where Python runs no signal handler). Rank 0
    still hears a SIGTERM, takes a copy 10 ms behind it as a copy, and a second one after --signal_grace_s 1 exits
    at once, long before --collective_timeout_s 60 would end the wait."""
    out = tmp_path / "hung"
    proc = start([MPIEXEC, "-n", "2", sys.executable, TRAIN, *map(str, [*SMALL, "--data", prepared, "--out", out,
                                                                        "--max_steps", 100000, "--signal_grace_s", 1,
                                                                        "--collective_timeout_s", 60])], out)
    err = Lines(proc.stderr)
    rank0, rank1 = rank_pids(str(out), 0), rank_pids(str(out), 1)
    try:
        kill(rank1, signal.SIGSTOP)
        time.sleep(1.0)  # rank 0 reaches the next collective and waits there
        kill(rank0)
        assert err.wait("rank 0: SIGTERM: finishing this step"), err
        time.sleep(0.01)
        kill(rank0)
        assert err.wait("a copy (within --signal_grace_s 1), ignored"), err
        time.sleep(1.2)
        t0 = time.time()
        kill(rank0)
        assert err.wait("a second signal: exiting now, without a checkpoint"), err
        while time.time() - t0 < 20 and any(map(alive, rank0)):
            time.sleep(0.05)
        assert time.time() - t0 < 10, f"rank 0 still there after {time.time() - t0:.1f} s"
    finally:
        kill(rank1, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=60)


def test_time_limit_checkpoints_and_exits_75(prepared, tmp_path):
    """--time_limit_min 0.1: the run stops by itself, at whatever step 6 s allow on this machine (on a loaded one,
    the first), with a checkpoint of that step and exit 75; --resume continues from it, step after step. Nothing
    here counts the steps a machine manages in 6 s."""
    common = [*SMALL, "--data", prepared, "--out", tmp_path / "a"]
    proc = run("train.py", *common, "--max_steps", 100000, "--time_limit_min", 0.1, check=False)
    assert proc.returncode == 75 and "--time_limit_min 0.1 is near" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    rows = [r for r in read_metrics(tmp_path / "a") if "loss" in r]
    stopped = rows[-1]["step"]
    assert [r["step"] for r in rows] == [*range(1, stopped + 1)]
    # the run's own clock (the interpreter's start not in it): 10 times the limit, so only a limit read in the
    # wrong unit fails here, not a slow machine
    assert rows[-1]["elapsed_s"] < 10 * 6, rows[-1]
    ckpts = sorted(n for n in os.listdir(tmp_path / "a") if n.startswith("ckpt_"))
    assert ckpts[-1] == f"ckpt_{stopped:07d}.pt", ckpts  # the newest checkpoint is of the step reached
    proc = run("train.py", *common, "--max_steps", stopped + 2, "--resume")
    assert "resumed from" in proc.stdout and f"at step {stopped}" in proc.stdout, proc.stdout
    assert [r[0] for r in train_rows(tmp_path / "a")] == [*range(1, stopped + 3)]  # no step repeated or missing


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
        kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        _, err = proc.communicate(timeout=8 + 60)
        assert proc.returncode != 0 and time.time() - t0 < 8 + 30, err
        assert "Rank(s) [1] did not arrive" in err, err
    finally:
        proc.kill()
        kill(stopped, signal.SIGKILL)


@needs_mpiexec
def test_subgroup_collectives_time_out_too():
    """The tensor- and data-parallel groups get --collective_timeout_s as well (new_group does not inherit it: 30
    minutes). Before, a rank stopped while the other waited in the loss's all-reduce over dp hung the job."""
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "tests", "mpi_group_timeout.py")],
                          capture_output=True, text=True, timeout=120)
    seconds = float(proc.stdout.split("timed out after ")[1].split(" s")[0]) if "timed out after" in proc.stdout \
        else None
    assert seconds is not None and seconds < 10, proc.stdout + proc.stderr  # 3 s, not rank 1's 20 s sleep


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_during_start_up_exits_75(prepared, tmp_path, sig):
    """Ctrl-C, Slurm's SIGTERM (time limit, scancel) or its --signal=USR1 warning while train.py still imports
    torch (issues 28, 29): no KeyboardInterrupt traceback, no death by the signal (which a batch script cannot tell
    from a crash), but one line and exit 75, so the script requeues the job; nothing written."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *SMALL, "--data", prepared, "--out",
                             tmp_path / "run"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the handler is in place within ~0.1 s; importing torch takes seconds
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, out + err
    assert "Traceback" not in err and f"{sig.name} during start-up" in err
    assert not (tmp_path / "run").exists()
