"""Files a batch script reads (it cannot see our exit code through `accelerate launch`): requeue marker, step."""
from __future__ import annotations

import os
from pathlib import Path

REQUEUE_FILE_ENV = "CITYSEG_REQUEUE_FILE"
STEP_FILE_ENV = "CITYSEG_STEP_FILE"


def write_requeue_marker(checkpoint: Path) -> None:
    """Tell a batch script (which cannot see our exit code through `accelerate launch`) to requeue."""
    marker = os.environ.get(REQUEUE_FILE_ENV)
    if marker:
        marker = Path(marker)
        marker.parent.mkdir(parents=True, exist_ok=True)
        staging = marker.with_name(f".{marker.name}.tmp")
        staging.write_text(f"{checkpoint}\n")
        staging.replace(marker)  # appears whole: the script may read the checkpoint path from it


def mark_step(step: int) -> None:
    """Write the number of the last finished step to $CITYSEG_STEP_FILE (main process, every step): slurm/train.sh
    restarts only an attempt that got past its first step, and tests send signals when step k is reached."""
    path = os.environ.get(STEP_FILE_ENV)
    if path:
        staging = f"{path}.tmp"
        with open(staging, "w") as out:
            out.write(f"{step}\n")
        os.replace(staging, path)  # whole or absent: a reader never sees a half-written number
