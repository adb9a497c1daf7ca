"""TensorBoard beside W&B (tracking.tensorboard): the same scalars through accelerate's tracker, main process only."""
from __future__ import annotations

import math
from pathlib import Path

LOG_DIR = "tensorboard"  # <output_dir>/tensorboard/: `tensorboard --logdir <output_dir>/tensorboard`


class TensorBoardRun:
    """Event files under <output_dir>/tensorboard/. A resumed run drops the events a killed attempt wrote from its
    first logged step on (SummaryWriter's purge_step), as the JSONL logs are rewound."""

    def __init__(self, enabled: bool, is_main: bool, output_dir: Path, config_yaml: str = ""):
        self.active, self.output_dir, self.config_yaml = enabled and is_main, Path(output_dir), config_yaml
        self.tracker = None

    def _start(self, first_step: int) -> None:
        from accelerate.tracking import TensorBoardTracker

        self.tracker = TensorBoardTracker(LOG_DIR, self.output_dir, purge_step=first_step)
        self.tracker.start()
        if self.config_yaml:
            self.tracker.log({"config": f"```\n{self.config_yaml}```"}, step=first_step)

    def log(self, scalars: dict, step: int) -> None:
        if not self.active:
            return
        if self.tracker is None:
            self._start(step)
        self.tracker.log({key: float(value) for key, value in scalars.items()
                          if value is not None and not math.isnan(float(value))}, step=step)

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
