"""What a run shows on the main process: progress bars on a terminal, plain greppable lines in logs."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from cityseg.observe.tables import iou_table


class RunConsole:
    """Main-process output. Other ranks get a silent instance (is_main=False)."""

    def __init__(self, is_main: bool, total_steps: int, log_every: int):
        self.is_main, self.total_steps, self.log_every = is_main, total_steps, log_every
        self.console = Console(stderr=False)
        self.interactive = is_main and sys.stdout.isatty()
        self.progress = None
        self.started = time.time()
        self.speed_note = ""  # set with the logging cadence: step time, data wait, MFU, memory

    def note_speed(self, record: dict) -> None:
        parts = [f"{1000 * record['step_time_s']:.0f} ms/step", f"data wait {100 * record['data_wait']:.0f}%"]
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        if "mem_allocated_gb" in record:
            parts.append(f"mem {record['mem_allocated_gb']:.1f}/{record['mem_reserved_gb']:.1f} GiB")
        self.speed_note = " " + " ".join(parts)

    def print(self, *args) -> None:
        if self.is_main:
            self.console.print(*args, highlight=False, soft_wrap=True)  # log lines stay whole (greppable)

    def start(self, first_step: int) -> None:
        if self.interactive:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                     console=self.console)
            self.task = self.progress.add_task("train", total=self.total_steps, completed=first_step, status="")
            self.progress.start()

    def step(self, step: int, epoch: int, loss: float | None, lr: float, images_per_s: float | None) -> None:
        """loss / images_per_s are None until the first logged step measured them: shown as "—", not as 0."""
        if not self.is_main:
            return
        status = (f"epoch {epoch} loss {'—' if loss is None else f'{loss:.4f}'} lr {lr:.2e} "
                  f"{'—' if images_per_s is None else f'{images_per_s:.1f}'} img/s{self.speed_note}")
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
        elif step % self.log_every == 0 or step == self.total_steps:
            print(f"step {step}/{self.total_steps} {status}", flush=True)

    def evaluation(self, metrics: dict, step: int, epoch: int) -> None:
        if self.is_main:
            title = f"validation after epoch {epoch} (step {step})"
            if self.progress is not None:
                self.progress.console.print(iou_table(metrics, title))
            elif sys.stdout.isatty():
                self.console.print(iou_table(metrics, title))
            else:
                print(f"eval step {step} epoch {epoch} mIoU {metrics['mIoU']:.4f} "
                      f"pixel_acc {metrics['pixel_acc']:.4f}", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
