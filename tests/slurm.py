"""A real one-node Slurm for the tests (tests/test_slurm.py): munged, slurmctld and slurmd started from
tests/slurm.conf, their state and logs in a temporary directory, and stopped at the end with every job they ran.
Debian's packages: apt-get install slurm-wlm munge (.ci/run installs them). Runs as root, as slurmd must."""
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])  # the daemons' home
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "scontrol", "squeue", "sinfo")


def missing():
    """Why no Slurm can be started here, or None."""
    absent = [p for p in PROGRAMS if shutil.which(p, path=PATH) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge (.ci/run does)"
    if os.geteuid() != 0:
        return "starting slurmd takes root (it runs each job as its user)"
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slurm:
    """The cluster; env: the environment its commands need (SLURM_CONF). run() runs a Slurm command."""

    def __init__(self, root):
        self.dir, self.procs = root, []
        for sub in ("ctld", "slurmd"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        with open(os.path.join(HERE, "slurm.conf")) as f:
            conf = f.read()
        self.host = socket.gethostname().split(".")[0]
        for key, value in (("DIR", root), ("HOST", self.host), ("CTLD_PORT", free_port()),
                           ("SLURMD_PORT", free_port()), ("FIRST_JOB", random.randrange(10**6, 6 * 10**7))):
            conf = conf.replace(f"@{key}@", str(value))
        self.conf = os.path.join(root, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        key = os.path.join(root, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.env = {**os.environ, "SLURM_CONF": self.conf, "PATH": PATH}
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del self.env[k]  # the suite itself may run inside a Slurm job
        try:
            self._daemon("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
                         f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                         f"--seed-file={root}/munged.seed")
            self._wait_for(lambda: os.path.exists(f"{root}/munge.socket"), "munged's socket")
            self._daemon("slurmctld", "-D", "-f", self.conf)
            self._daemon("slurmd", "-D", "-f", self.conf, "-N", self.host)
            self._wait_for(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                           "the node to be idle")
        except BaseException:
            self.stop()
            raise

    def _daemon(self, name, *args):
        log = open(os.path.join(self.dir, f"{name}.out"), "w")
        self.procs.append(subprocess.Popen([shutil.which(name, path=PATH), *args], env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_for(self, ready, what, timeout=60):
        deadline = time.time() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"Slurm did not start ({what}; {', '.join(dead) or 'none'} exited): see {self.dir}")
            time.sleep(0.2)

    def run(self, *cmd, check=True, timeout=120, **kwargs):
        proc = subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args, **kwargs):
        """Submit; the job's id."""
        return self.run("sbatch", "--parsable", *map(str, args), **kwargs).stdout.strip().split(";")[0]

    def job(self, job):
        """scontrol's fields of a job: JobState, Restarts, ExitCode, ..."""
        out = self.run("scontrol", "-o", "show", "job", job).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job, until, timeout=120, every=0.2):
        """Wait until until(job's fields) holds; the fields then."""
        deadline = time.time() + timeout
        while True:
            fields = self.job(job)
            if until(fields):
                return fields
            if time.time() > deadline:
                raise AssertionError(f"job {job} timed out waiting: {fields}")
            time.sleep(every)

    def steps(self, job):
        """The ids of the job's running steps (0, 1, ... for sruns; not the batch step)."""
        out = self.run("squeue", "-h", "-s", "-j", job, "-o", "%i", check=False).stdout.split()
        return [s for s in out if re.fullmatch(r"\d+\.\d+", s)]

    def pids(self, job):
        """{global task id: pid} of the job's running srun tasks."""
        out = self.run("scontrol", "listpids", job, check=False).stdout.splitlines()[1:]
        return {int(f[4]): int(f[0]) for f in (line.split() for line in out)  # not the batch step's (its own ids)
                if len(f) >= 5 and f[2].isdigit() and f[4].isdigit()}

    def stop(self):
        """Cancel every job, stop the daemons, and check that nothing of theirs is left running."""
        if self.procs and self.procs[0].poll() is None and len(self.procs) == 3:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", "--signal=KILL", *jobs, check=False)
                deadline = time.time() + 30
                while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.2)
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
