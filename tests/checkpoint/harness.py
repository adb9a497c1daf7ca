"""Reusable helpers for checkpoint / fault tests: start real trainings, signal them, read their weights and logs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import PYTHON, REPO, child_env, launch_cmd, read_jsonl, tiny_overrides

CONFIG = ["--config", "configs/demo.yaml"]


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


def sealed_steps(out: Path) -> list[int]:
    """Steps of complete checkpoints (what resume may pick), oldest first."""
    from cityseg.checkpoint import complete_checkpoints

    return [int(path.name.split("_")[1]) for path in complete_checkpoints(out)]


def unsealed_dirs(out: Path) -> list[Path]:
    """Checkpoint directories still being written (or left by a killed save)."""
    root = out / "checkpoints"
    return sorted(root.glob(".tmp_step_*")) if root.is_dir() else []


def trainer_state(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / "trainer_state.json").read_text())


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


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def logged_steps(out: Path) -> list[tuple[int, int, float, float]]:
    """(step, epoch, loss, lr) of every train_log.jsonl record."""
    return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in read_jsonl(out / "train_log.jsonl")]


def assert_exit(result: subprocess.CompletedProcess, code: int) -> None:
    assert result.returncode == code, f"exit {result.returncode}, expected {code}\n{result.stdout[-2000:]}\n" \
                                      f"{result.stderr[-4000:]}"
