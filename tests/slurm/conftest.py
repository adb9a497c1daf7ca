"""A real two-node SLURM cluster on this host (Debian's slurmctld/slurmd/munge), started once per test session."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "munged"]
NODES = {"node1": 17001, "node2": 17002}
CTLD_PORT = 16817
HOSTS_LINE = "127.0.0.1 node1 node2  # cityseg SLURM test cluster\n"

# The fake nodes look like a small GPU cluster (4 GPUs, 32 CPUs each) so that slurm/train.sh's
# #SBATCH header is accepted as written; tests run training on the CPU with ACCELERATE_USE_CPU=1.
# The GPUs are character devices made by mknod: SLURM only checks that the gres File= exists.
SLURM_CONF = """\
ClusterName=citysegtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job restarts after a few seconds instead of ~150 s.
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
# No systemd and no cgroups here: track processes by parent pid, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Look at pending jobs every 2 s (default 60): a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=600
GresTypes=gpu
NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port_node1} CPUs=32 Gres=gpu:4 State=UNKNOWN
NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port_node2} CPUs=32 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""


def _install_reason() -> str | None:
    """Install SLURM if missing; return why it cannot be, or None when it is there."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # a fresh machine may have empty package lists
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}"
    return None


class Cluster:
    """Daemons started by this session (by PID) plus helpers to submit and inspect jobs."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.added_hosts_line = False
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    # -- bring-up ---------------------------------------------------------------------------
    def start(self) -> None:
        host = socket.gethostname().split(".")[0]
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o700)
        shutil.chown(munge_dir, "munge", "munge")
        for sub in ["state", "spool", "dev"]:
            (self.root / sub).mkdir()
        for i in range(4):
            os.mknod(self.root / "dev" / f"gpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        conf = SLURM_CONF.format(host=host, ctld_port=CTLD_PORT, root=self.root,
                                 munge_socket=munge_dir / "munge.socket",
                                 port_node1=NODES["node1"], port_node2=NODES["node2"])
        (self.root / "slurm.conf").write_text(conf)
        (self.root / "gres.conf").write_text(f"NodeName=node[1-2] Name=gpu File={self.root}/dev/gpu[0-3]\n")
        self._add_hosts_line()
        # Our own munged on a private socket, so a munged already running here is left alone.
        self._spawn(["munged", "--foreground", "--force", f"--socket={munge_dir}/munge.socket",
                     f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                     f"--seed-file={munge_dir}/munged.seed"], user="munge")
        self._wait_for(lambda: (munge_dir / "munge.socket").exists(), "munged socket")
        conf_path = str(self.root / "slurm.conf")
        self._spawn(["slurmctld", "-D", "-i", "-f", conf_path])
        for node in NODES:
            self._spawn(["slurmd", "-D", "-N", node, "-f", conf_path])
        self._wait_for(self._nodes_idle, "both nodes idle")

    def _spawn(self, cmd: list[str], user: str | None = None) -> None:
        with open(self.root / f"{Path(cmd[0]).name}-{len(self.procs)}.stdout", "wb") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               user=user, start_new_session=True))

    def _nodes_idle(self) -> bool:
        out = self.scontrol("show", "nodes", "-o", check=False)
        return len(re.findall(r"State=IDLE\b", out)) == len(NODES)

    def _wait_for(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster: no {what} (exited: {dead}); see logs in {self.root}")
            time.sleep(0.2)

    def _add_hosts_line(self) -> None:
        try:
            socket.gethostbyname("node2")
        except OSError:
            with open("/etc/hosts", "a") as hosts:
                hosts.write(HOSTS_LINE)
            self.added_hosts_line = True

    # -- tear-down --------------------------------------------------------------------------
    def stop(self) -> None:
        if any(p.poll() is None for p in self.procs[1:]):
            subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env, capture_output=True)
            time.sleep(1)
        for proc in reversed(self.procs):  # slurmds, then slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.added_hosts_line:
            hosts = Path("/etc/hosts").read_text()
            Path("/etc/hosts").write_text(hosts.replace(HOSTS_LINE, ""))

    # -- helpers for tests ------------------------------------------------------------------
    def scontrol(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (works without slurmdbd, unlike sacct)."""
        out = self.scontrol("show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout: float = 180) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {self.job(job_id)}")


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _install_reason()
    if reason:
        pytest.skip(f"SLURM test cluster unavailable: {reason}")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster runs slurmd as root, so it needs root")
    # 0755 so that the munge user can reach its socket dir inside.
    root = Path(tempfile.mkdtemp(prefix="cityseg-slurm-"))
    root.chmod(0o755)
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
