"""Test helper: kill -9 a single-process training run at random moments, restart it, and record what was on disk.

The parent imports cityseg once and forks each run (a restart costs no import time); a child is a real
`cityseg train` process, killed with SIGKILL. Every other kill waits for a save in progress;
the others come at a random time within the first few steps after the restart. Prints one JSON
object per kill and a final one for the uninterrupted completion. Each run may train HEADROOM steps past the
checkpoint it starts from (train.max_steps grows from run to run, as a resume allows; it may never shrink).
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from cityseg import checkpoint
from cityseg.cli import main as cityseg_main
from cityseg.train.resume import find_resume

HEADROOM = 10  # steps a run may take past its checkpoint: more than a kill ever lets it run, few to finish


def start_run(args: list[str], log: Path) -> int:
    log.write_text("")
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os._exit(cityseg_main(["train", *args]))
    return pid


def wait_for(condition, pid: int, timeout: float = 120.0) -> bool:
    """Poll until condition() holds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
        time.sleep(0.005)
    raise TimeoutError("the run made no progress")


def saving(out: Path, step: int, started: float) -> bool:
    partial = out / "checkpoints" / f".tmp_step_{step:08d}"
    try:
        return partial.stat().st_mtime >= started
    except FileNotFoundError:  # not begun yet, or already sealed (renamed)
        return False


def killed_mid_save(out: Path, started: float) -> bool:
    """A temporary checkpoint directory written by this run is left behind: the kill came inside a save (a save
    clears the leftover of a killed one only when it saves that step again, so an older leftover is not this run's)."""
    partials = (out / "checkpoints").glob(".tmp_step_*") if (out / "checkpoints").is_dir() else []
    return any(partial.stat().st_mtime >= started for partial in partials)


def on_disk(out: Path) -> dict:
    """Every sealed checkpoint must verify and its weights load with safetensors."""
    corrupt, steps = [], []
    for path in checkpoint.complete_checkpoints(out):
        try:
            state = checkpoint.verify(path)
            load_file(str(path / checkpoint.MODEL_FILE))
            steps.append(state["step"])
        except Exception as err:  # noqa: BLE001 - recorded and asserted on by the test
            corrupt.append(f"{path}: {err}")
    resume = find_resume(out, warn=lambda _: None)
    return {"steps": steps, "corrupt": corrupt, "resume": str(resume) if resume else None,
            "unsealed": sorted(p.name for p in (out / "checkpoints").glob(".*")) if (out / "checkpoints").exists() else []}


def main() -> int:
    out, kills, seed, args = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    rng = random.Random(seed)
    for index in range(kills):
        expected = find_resume(out, warn=lambda _: None)
        log = out.parent / f"{out.name}_run{index}.log"
        started = time.time()
        first = (checkpoint.read_trainer_state(expected)["step"] if expected else 0) + 1
        pid = start_run([*args, f"train.max_steps={first - 1 + HEADROOM}"], log)
        if index % 2 == 1:  # during a save: the second one of this run (the first seals, so the run moves on)
            alive = wait_for(lambda: saving(out, first + 1, started), pid)
            time.sleep(rng.uniform(0.0, 0.05))
        else:  # any moment within the next few steps (each step is followed by its save)
            target = f"step {first + rng.randint(0, 2)}/"
            alive = wait_for(lambda: target in log.read_text(), pid)
            time.sleep(rng.uniform(0.0, 1.0))
        if not alive:
            print(json.dumps({"kill": index, "finished_early": True, "log": log.read_text()[-2000:]}), flush=True)
            return 1
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_save = killed_mid_save(out, started)  # judged after the kill: what the kill actually interrupted
        text = log.read_text()
        resumed_line = next((line for line in text.splitlines() if line.startswith("resume:")), None)
        print(json.dumps({"kill": index, "expected_resume": str(expected) if expected else None,
                          "resume_line": resumed_line, "killed_mid_save": mid_save, **on_disk(out)}), flush=True)
    log = out.parent / f"{out.name}_final.log"
    newest = max(on_disk(out)["steps"], default=0)
    pid = start_run([*args, f"train.max_steps={newest + HEADROOM}"], log)  # to its end: the point is that it can
    _, status = os.waitpid(pid, 0)
    text = log.read_text()
    resumed_line = next((line for line in text.splitlines() if line.startswith("resume:")), None)
    print(json.dumps({"final": True, "exit": os.waitstatus_to_exitcode(status), "resume_line": resumed_line,
                      "log": text[-3000:], **on_disk(out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
