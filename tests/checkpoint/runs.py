"""Helpers that run real trainings (1 or 2 processes) and interrupt them: shared by checkpoint and fault tests."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from tests.conftest import PYTHON, REPO, child_env, launch_cmd, read_jsonl, tiny_overrides

STEP_GLOB = "checkpoints/step_*/trainer_state.json"


def resume_config(root: Path, out: Path, **extra) -> list[str]:
    """16 images, batch 2 (8 steps per epoch per process), 3 epochs, a checkpoint every 3 steps (mid-epoch)."""
    values = dict(data__batch_size=2, train__epochs=3, checkpoint__every_steps=3, checkpoint__keep_last=3,
                  optim__warmup_steps=2)
    values.update(extra)
    return tiny_overrides(root, out, **values)


def train_cmd(overrides: list[str], processes: int = 1) -> list[str]:
    target = ["train.py", "--config", "configs/demo.yaml", *overrides]
    return [PYTHON, *target] if processes == 1 else launch_cmd(processes, *target)


def run_training(overrides: list[str], processes: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(overrides, processes), cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def start_training(overrides: list[str], processes: int = 1) -> subprocess.Popen:
    """A training in its own process group (like a job step), output captured."""
    return subprocess.Popen(train_cmd(overrides, processes), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rank_pids(launcher: subprocess.Popen, processes: int) -> dict[int, int]:
    """{rank: pid} of the training processes under a launcher (the launcher itself when it is one process)."""
    if processes == 1:
        return {0: launcher.pid}
    deadline = time.time() + 120
    while time.time() < deadline:
        found = {}
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                environ = child.environ()
                if "RANK" in environ and "train.py" in " ".join(child.cmdline()):
                    found[int(environ["RANK"])] = child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if len(found) == processes:
            return found
        time.sleep(0.1)
    raise AssertionError("training processes did not start")


def wait_for(predicate, timeout: float = 240, what: str = "condition", proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def complete_checkpoints(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob(STEP_GLOB))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_weight_difference(a: Path, b: Path) -> float:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first)


def losses_by_step(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "train_log.jsonl")}


def send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def interrupt_after_first_checkpoint(overrides: list[str], processes: int = 1, sig=signal.SIGUSR1,
                                     ranks: list[int] | None = None, whole_group: bool = False) -> str:
    """Start a training, signal it once its first checkpoint is complete, return its output (it must stop)."""
    proc = start_training(overrides, processes)
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
    pids = rank_pids(proc, processes)
    wait_for(lambda: complete_checkpoints(out), what="the first checkpoint", proc=proc)
    if whole_group:
        os.killpg(proc.pid, sig)  # every process of the job, loader workers included, like `scancel --signal`
    else:
        for rank in ranks if ranks is not None else sorted(pids):
            send(pids[rank], sig)
    output, _ = proc.communicate(timeout=300)
    return output if processes > 1 else f"{output}\nexit code {proc.returncode}"
