"""The GPU proof's sections run under one deadline: each a child process with its own log, capped by the time left;
the report rewritten atomically after every section, a crash or timeout recorded, the rest still run."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIN_START_S = 5.0  # a section is not started with less of the deadline left: it could not even import torch


@dataclass
class Section:
    """One measurement: `python argv...` in its own process, its result under report[name] (dotted: nested).

    Without `parse`, the child writes its JSON result to the path given after --result; with it, parse(log text)
    makes the result once the child exited 0 (train.py, `cityseg prepare`). skip: recorded without a child."""
    name: str
    argv: list[str]
    cap_s: float
    parse: Callable[[str], dict] | None = None
    skip: str | None = None
    env: dict = field(default_factory=dict)


def write_json_atomic(path: Path, tree: dict) -> None:
    """A reader (or a GPU lease ending mid-write) sees the previous report or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(tree, indent=2))
    os.replace(tmp, path)


def set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


class Proof:
    """The report, its path, the scratch folder and the deadline every section shares."""

    def __init__(self, report_path: Path, work: Path, deadline_s: float, min_start_s: float = MIN_START_S):
        self.path, self.work, self.deadline_s, self.min_start_s = report_path, work, deadline_s, min_start_s
        self.started = time.monotonic()
        self.report: dict = {"deadline_s": deadline_s, "order": []}
        (work / "logs").mkdir(parents=True, exist_ok=True)
        (work / "results").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)

    def record(self, name: str, result: dict) -> dict:
        set_dotted(self.report, name, result)
        self.report["elapsed_s"] = time.monotonic() - self.started
        write_json_atomic(self.path, self.report)
        return result

    def run(self, section: Section) -> dict:
        """Run one section (or record why not) and write the report; never raises for the section's failure."""
        self.report["order"].append(section.name)
        left = self.left()
        if section.skip:
            return self.record(section.name, {"skipped": section.skip})
        if left < self.min_start_s:
            return self.record(section.name, {"skipped": f"not started: {max(left, 0):.0f} s of the "
                                                         f"{self.deadline_s:.0f} s deadline left"})
        limit = min(section.cap_s, left)
        log = self.work / "logs" / f"{len(self.report['order']):02d}_{section.name}.log"
        result_path = self.work / "results" / f"{section.name}.json"
        result_path.unlink(missing_ok=True)
        argv = [*section.argv, *([] if section.parse else ["--result", str(result_path)])]
        began = time.monotonic()
        outcome = run_logged(argv, log, limit, section.env)
        text = log.read_text(errors="replace")
        if outcome == "timeout":
            why = "the section's cap" if limit == section.cap_s else "the proof's deadline"
            result = {"error": f"timed out after {limit:.0f} s ({why}); killed", "timed_out": True}
        elif outcome != 0:
            result = {"error": f"exited {outcome}: {last_line(text)}"}
        else:
            try:
                result = section.parse(text) if section.parse else json.loads(result_path.read_text())
            except Exception as err:  # noqa: BLE001 - a result that cannot be read is this section's failure
                result = {"error": f"no readable result: {type(err).__name__}: {err}"}
        result.update(section_s=time.monotonic() - began, limit_s=limit, log=str(log))
        print(f"{section.name}: {json.dumps(result)[:400]}", flush=True)
        return self.record(section.name, result)


def run_logged(argv: list[str], log: Path, timeout: float, extra_env: dict) -> int | str:
    """`python argv` with stdout and stderr in `log` as they come (a killed child keeps what it wrote), in its
    own process group: a timeout kills it and its loader workers. The exit code, or "timeout"."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               **extra_env)
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            return child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the group this Popen made: the child and its workers only
            child.wait(timeout=30)
            return "timeout"


def machine_record() -> dict:
    """Versions that explain a figure: CUDA, cuDNN, driver, torch, smp, timm, accelerate (GPU details: section cuda)."""
    import accelerate
    import segmentation_models_pytorch as smp
    import timm
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "driver": nvidia_driver(), "smp": smp.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__}


def nvidia_driver() -> str | None:
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip().splitlines()[0] if found.returncode == 0 and found.stdout.strip() else None
