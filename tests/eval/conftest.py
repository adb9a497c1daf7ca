"""The official Cityscapes evaluator in its own venv (it calls np.in1d, gone in numpy 2.4), and a helper to run it."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

VENV = REPO / ".venv-cseval"
# cityscapesscripts' pixel-level script imports only numpy, Pillow and (through helpers.annotation) pyquaternion;
# --no-deps keeps matplotlib, requests, coloredlogs, tqdm... of its full requirements out.
PACKAGES = ["cityscapesscripts==2.3.0", "numpy<2.4", "pillow", "pyquaternion"]
COMMAND = VENV / "bin" / "csEvalPixelLevelSemanticLabeling"


def _create_venv() -> None:
    complete = VENV / ".complete"
    with open(REPO / ".venv-cseval.lock", "w") as lock:  # two test sessions at once: one builds, one waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete.is_file() and complete.read_text() == " ".join(PACKAGES):
            return
        subprocess.run(["python3", "-m", "venv", "--clear",
                        str(VENV)], check=True, capture_output=True)
        install = subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--no-deps", *PACKAGES],
                                 capture_output=True, text=True)
        assert install.returncode == 0, f"cannot install the official evaluator: {install.stderr[-2000:]}"
        complete.write_text(" ".join(PACKAGES))


@pytest.fixture(scope="session")
def official_evaluator():
    """run(dataset_root, results_dir, export_dir) → the official JSON export (classScores, averageScoreClasses...)."""
    _create_venv()

    def run(dataset_root: Path, results_dir: Path, export_dir: Path) -> dict:
        export_dir.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), "CITYSCAPES_DATASET": str(dataset_root),
               "CITYSCAPES_RESULTS": str(results_dir), "CITYSCAPES_EXPORT_DIR": str(export_dir)}
        result = subprocess.run([str(COMMAND)], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return json.loads((export_dir / "resultPixelLevelSemanticLabeling.json").read_text())

    return run
