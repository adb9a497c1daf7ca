"""Evaluation helpers: the official Cityscapes evaluator's own venv (it calls np.in1d, gone in numpy 2.4), an
inference config without a Config, and the comparison of a score with the official one."""
from __future__ import annotations

import fcntl
import math
import subprocess
import types

from tests.helpers.process import REPO

VENV = REPO / ".venv-cseval"
# cityscapesscripts' pixel-level script imports only numpy, Pillow and (through helpers.annotation) pyquaternion;
# --no-deps keeps matplotlib, requests, coloredlogs, tqdm... of its full requirements out.
PACKAGES = ["cityscapesscripts==2.3.0", "numpy<2.4", "pillow", "pyquaternion"]
COMMAND = VENV / "bin" / "csEvalPixelLevelSemanticLabeling"


def create_venv() -> None:
    complete = VENV / ".complete"
    with open(REPO / ".venv-cseval.lock", "w") as lock:  # two test sessions at once: one builds, one waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete.is_file() and complete.read_text() == " ".join(PACKAGES):
            return
        subprocess.run(["python3", "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True, timeout=300)
        install = subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--no-deps", *PACKAGES],
                                 capture_output=True, text=True, timeout=600)
        assert install.returncode == 0, f"cannot install the official evaluator: {install.stderr[-2000:]}"
        complete.write_text(" ".join(PACKAGES))


def eval_cfg(**values):
    """The eval section as segment_logits reads it: whole image, no flip, one scale unless values say otherwise."""
    base = {"sliding": False, "crop_size": [512, 1024], "stride": [341, 683], "flip": False, "scales": [1.0]}
    return types.SimpleNamespace(**{**base, **values})


def close(ours, official, tol):
    """Our score equals the official one within tol; a class the official evaluator leaves out (None/NaN) we too."""
    if official is None or (isinstance(official, float) and math.isnan(official)):
        return ours is None
    return ours is not None and abs(ours - official) <= tol
