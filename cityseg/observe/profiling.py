"""train.profile_steps: a torch.profiler Chrome trace of chosen training steps, written to <output_dir>/profile/."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """Records steps [first, last] (optimizer steps, 0-based as they start) of this rank, then writes one trace."""

    def __init__(self, steps: list[int] | None, output_dir: Path, rank: int, device: torch.device):
        self.first, self.last = steps if steps else (None, None)
        self.path = Path(output_dir) / "profile" / f"trace_rank{rank}_steps{self.first}-{self.last}.json"
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.active = None

    def before_step(self, step: int) -> None:
        if self.first is not None and self.active is None and self.first <= step <= self.last:
            self.active = profile(activities=self.activities, record_shapes=True, with_stack=False)
            self.active.__enter__()

    def after_step(self, step: int) -> Path | None:
        """Ends the trace after the last profiled step; returns the file it wrote."""
        if self.active is None or step < self.last:
            return None
        self.active.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.active.export_chrome_trace(str(self.path))
        self.active, self.first = None, None  # once per run
        return self.path
