"""The namespace SLURM cluster of tests/cluster (netcluster.sh): the Cluster that drives it, its jobs and hosts;
a tiny run's arguments; and the assertions shared by the cluster tests (weights equal to the reference run, steps
named in the job log). Its fixtures are in tests/cluster/conftest.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.process import REPO

NETCLUSTER = REPO / "tests" / "cluster" / "netcluster.sh"  # also usable by hand: see docs/development.md
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "iproute2", "util-linux"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged", "ip", "nsenter", "setsid"]
HOSTS = ["h1", "h2"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def unavailable(reason: str):
    """Under CI a cluster that cannot run is a failure; on a laptop without root the suite may skip."""
    if os.environ.get("CI"):
        pytest.fail(f"namespace SLURM cluster unavailable under CI: {reason}")
    pytest.skip(f"namespace SLURM cluster unavailable: {reason}")


def install_reason() -> str | None:
    """Install SLURM/munge/iproute2 if missing; return why they cannot be, or None when they are there."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"missing {[b for b in BINARIES if not shutil.which(b)]} and no root apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}"
    return None


class Cluster:
    """The hosts <prefix>-h1, -h2 and a controller; clients run on the controller host (its namespace)."""

    def __init__(self, root: Path, prefix: str):
        self.root, self.prefix = root, prefix
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "CITYSEG_NETCLUSTER_PREFIX": prefix}

    def host(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def script(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(["bash", str(NETCLUSTER), *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"netcluster.sh {' '.join(args)}: {result.stderr.strip()[-2000:]}")
        return result.stdout

    def client(self, *cmd: str, env: dict | None = None, check: bool = True, timeout: float = 30,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, scontrol, ...) on the controller host."""
        full = ["nsenter", f"--net=/run/netns/{self.prefix}-ctl", *cmd]
        result = subprocess.run(full, env={**(env or self.env), "SLURM_CONF": self.env["SLURM_CONF"]},
                                capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")
        return result

    # -- jobs -------------------------------------------------------------------------------------
    def job_env(self, log_dir: Path, **extra: str) -> dict:
        """The submitting shell's environment (sbatch exports it): this Python first, CPU ranks, our log dir."""
        env = {**self.env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CITYSEG_LOG_DIR": str(log_dir),
               "COLUMNS": "300", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix  # so slurm/env.sh does not activate another environment
        env.update(extra)
        return env

    def sbatch(self, log_dir: Path, options: list[str], script: str, args: list[str], env: dict | None = None,
               cwd: Path = REPO, logs: bool = True) -> str:
        out = [f"--output={log_dir}/%x-%j.out", f"--error={log_dir}/%x-%j.err"] if logs else []
        result = self.client("sbatch", "--parsable", *out, *options, script, *args,
                             env=env or self.job_env(log_dir), cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (works without slurmdbd, unlike sacct)."""
        out = self.client("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def fail(self, job_id: str, log_dir: Path, why: str):
        self.client("scancel", job_id, check=False)
        pytest.fail(f"job {job_id}: {why}\n--- job state: {self.job(job_id)}\n--- log tail:\n"
                    f"{job_log(log_dir, job_id)[-4000:]}")

    def wait_until(self, ready, what: str, job_id: str, log_dir: Path, timeout: float):
        """Poll ready() (returns a truthy value) until timeout; a timeout fails with the job's log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(0.3)
        self.fail(job_id, log_dir, f"no {what} after {timeout:.0f} s")

    def wait_job(self, job_id: str, log_dir: Path, timeout: float = 240) -> dict[str, str]:
        """The job's final state (requeues included: a requeued job is PENDING again, not final)."""
        def final():
            info = self.job(job_id)
            return info if info["JobState"] in FINAL_STATES else None
        return self.wait_until(final, "end of the job", job_id, log_dir, timeout)

    def wait_step(self, log_dir: Path, job_id: str, step: int, restart: int = 0, timeout: float = 180) -> int:
        """Wait until the run has finished `step` steps (CITYSEG_STEP_FILE of slurm/train.sh); returns it."""
        step_file = log_dir / f".cityseg-{job_id}-{restart}.step"

        def reached():
            try:
                done = int(step_file.read_text() or 0)
            except (OSError, ValueError):
                return None
            return done if done >= step else None
        return self.wait_until(reached, f"step {step} (restart {restart})", job_id, log_dir, timeout)

    # -- hosts --------------------------------------------------------------------------------------
    def host_pids(self, short: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.host(short)], capture_output=True, text=True, timeout=10)
        return [int(p) for p in out.stdout.split()]

    def rank_pids(self, short: str) -> dict[int, int]:
        """{rank: pid} of the training processes living in the host's network namespace."""
        ranks = {}
        for pid in self.host_pids(short):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            rank = [e for e in environ if e.startswith(b"RANK=")]
            if rank and b"train.py" in cmdline:
                ranks[int(rank[0][5:])] = pid
        return ranks

    def nodes_idle(self) -> bool:
        out = self.client("sinfo", "-h", "-N", "-p", "debug", "-o", "%t", check=False).stdout.split()
        return out == ["idle"] * len(HOSTS)

    def restore(self) -> None:
        """After a test: no jobs, every cable in, every slurmd running, every host idle again."""
        self.client("scancel", "--full", "--partition=debug,high", check=False)
        for short in HOSTS:
            self.script("heal-host", short, str(self.root))
            if not any(b"slurmd" in Path(f"/proc/{p}/cmdline").read_bytes() for p in self.host_pids(short)
                       if Path(f"/proc/{p}/cmdline").exists()):
                self.script("start-slurmd", short, str(self.root))
        deadline = time.monotonic() + 90
        while not self.nodes_idle():
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not idle after a test: {self.client('sinfo', '-N', check=False).stdout}")
            for short in HOSTS:  # a host declared DOWN stays down until told otherwise
                state = self.client("sinfo", "-h", "-n", self.host(short), "-o", "%t", check=False).stdout
                if "down" in state or "drain" in state:
                    self.client("scontrol", "update", f"NodeName={self.host(short)}", "State=RESUME", check=False)
            time.sleep(1)


def job_log(log_dir: Path, job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(Path(log_dir).glob(f"*-{job_id}.*")))


def tiny(data: Path, output_dir: Path, max_steps: int = 12, **extra) -> list[str]:
    """A CPU-sized run of the demo config: 12 steps = 1.5 epochs, a checkpoint every 2 steps."""
    values = {"data.root": data, "data.image_size": "[32,64]", "data.batch_size": 2, "data.num_workers": 0,
              "output_dir": output_dir, "train.max_steps": max_steps, "train.epochs": "null", "train.log_every": 1,
              "checkpoint.every_steps": 2, "checkpoint.keep_last": 2, "tracking.wandb.mode": "disabled",
              "dist.timeout_minutes": 1}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return ["--config", "configs/demo.yaml", *[f"{k}={v}" for k, v in values.items()]]


def tcp_peers(pid: int) -> set[tuple[str, str]]:
    """(local address, remote address) of the process's own established TCP connections."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    pairs = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[9] in sockets:  # ESTABLISHED, and this process's
            local, remote = (".".join(str(b) for b in reversed(bytes.fromhex(f.split(":")[0]))) for f in fields[1:3])
            pairs.add((local, remote))
    return pairs


def environ_of(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def assert_same_weights(out: Path, reference: Path) -> None:
    """Bit-exact: every tensor of model.safetensors equals the uninterrupted run's."""
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def final_step(out: Path) -> int:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def preempted_step(log: str) -> tuple[str, int]:
    saved = re.search(r"preempted: checkpoint\s+(\S+)\s+written at step\s+(\d+)", log)
    assert saved, log[-4000:]
    return saved.group(1), int(saved.group(2))
