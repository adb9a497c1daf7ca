"""Start and await real processes of the real CLI: the child environment, `accelerate launch` of N CPU ranks, a
training run to its end or in the background, and the pids of its ranks and loader workers."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.runs import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CONFIG = ["--config", "configs/demo.yaml"]


def child_env(**extra: str) -> dict:
    """Environment for child processes: this checkout first on the path, CPU gloo, no W&B network, 1 thread."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="1", WANDB_MODE="offline", WANDB_SILENT="true",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def run(args: list[str], timeout: float = 600, env: dict | None = None, cwd: Path = REPO,
        **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def cityseg(*args, **kwargs) -> subprocess.CompletedProcess:
    """`python -m cityseg ...` in a child process."""
    return run([PYTHON, "-m", "cityseg", *args], **kwargs)


def free_port() -> int:
    """A port free now, for a command that must be told one in advance (two launchers meeting on it). It can be
    taken before the command binds it: where one launcher binds alone, pass port 0 instead (see launch_cmd)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_cmd(num_processes: int, *target: str, port: int = 0) -> list[str]:
    """`accelerate launch` of N CPU processes over gloo (needs ACCELERATE_USE_CPU=1, set by child_env). Port 0: the
    launcher picks a free port itself, just before it binds it (not seconds earlier, in this process)."""
    return [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *target]


def rank_reports(stdout: str) -> list[dict]:
    """The {"rank": ...} objects that processes sharing one stdout printed: two ranks' lines may interleave
    (one rank's newline after the other's object), so objects are decoded where they start, not per line."""
    decoder, found, start = json.JSONDecoder(), [], stdout.find('{"rank"')
    while start != -1:
        report, end = decoder.raw_decode(stdout, start)
        found.append(report)
        start = stdout.find('{"rank"', end)
    return found


def train_command(root: Path, out: Path, processes: int = 1, script: str = "train.py", **overrides) -> list[str]:
    """`python train.py ...` for one process (its exit code is ours), `accelerate launch` for more; `script` may be
    a test wrapper that runs train.py (e.g. tests/checkpoint/record_samples.py)."""
    args = [script, *CONFIG, *tiny_overrides(root, out, **overrides)]
    return [PYTHON, *args] if processes == 1 else launch_cmd(processes, *args)


def train(root: Path, out: Path, processes: int = 1, env: dict | None = None, timeout: float = 600,
          script: str = "train.py", **overrides) -> subprocess.CompletedProcess:
    """Run a training to its end (or failure) and return the finished process."""
    return subprocess.run(train_command(root, out, processes, script, **overrides), cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


def start(root: Path, out: Path, processes: int = 1, env: dict | None = None, **overrides) -> subprocess.Popen:
    """Start a training in its own session. For 1 process its process group is the whole job (the trainer and its
    loader workers); for more, torch elastic puts each rank in a session of its own: reach them with rank_pids()."""
    return subprocess.Popen(train_command(root, out, processes, **overrides), cwd=REPO, env=env or child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.01):
    """Poll until condition() is truthy; fail (with the process's output) if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            result = finish(proc)
            raise AssertionError(f"training ended (exit {proc.returncode}) before the awaited state\n"
                                 f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        time.sleep(poll)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out after {timeout}s waiting for the training")


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat fields after the command name: state, ppid, pgrp, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _live_pids(field: int, value: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat(int(entry.name))
            except OSError:
                continue
            if int(fields[field]) == value and fields[0] != "Z":
                pids.append(int(entry.name))
    return sorted(pids)


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (a training started by start(): the process and its loader workers)."""
    return _live_pids(2, pgid)


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes `accelerate launch` started: its children (torch elastic puts each in
    a session of its own, so they are not in the launcher's process group), RANK read from their environment."""
    ranks = {}
    for pid in _live_pids(1, launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [item[5:] for item in environ if item.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0])] = pid
    return ranks
