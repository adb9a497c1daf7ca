"""What a run shows: a rich console (bars on a terminal, plain lines in logs) and the run's JSONL files."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def rewind_jsonl(path: Path, last_step: int) -> None:
    """After a resume from `last_step`, drop records a killed run wrote past it: they will be written again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def iou_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in metrics["iou"].items():
        table.add_row(name, "n/a" if math.isnan(value) else f"{value:.4f}")
    table.add_row("[bold]mIoU", f"[bold]{metrics['mIoU']:.4f}")
    table.add_row("pixel acc", f"{metrics['pixel_acc']:.4f}")
    return table


def _score(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def benchmark_tables(metrics: dict) -> list[Table]:
    """`cityseg evaluate`'s tables: classes (IoU, iIoU where measured), then categories, each with its mean."""
    tables = []
    for level, iou_key, iiou_key, mean_key, imean_key in (("class", "iou", "iiou", "mIoU", "iIoU"),
                                                         ("category", "category_iou", "category_iiou",
                                                          "category_mIoU", "category_iIoU")):
        table = Table()
        table.add_column(level)
        table.add_column("IoU", justify="right")
        instance = metrics.get(iiou_key)
        if instance is not None:
            table.add_column("iIoU", justify="right")
        for name, value in metrics[iou_key].items():
            table.add_row(name, _score(value), *([_score(instance.get(name))] if instance is not None else []))
        table.add_row(f"[bold]{'mIoU' if level == 'class' else 'mean'}", f"[bold]{_score(metrics[mean_key])}",
                      *([f"[bold]{_score(metrics[imean_key])}"] if instance is not None else []))
        if level == "class":
            table.add_row("pixel acc", _score(metrics["pixel_acc"]), *([""] if instance is not None else []))
        tables.append(table)
    return tables


class RunConsole:
    """Main-process output. Other ranks get a silent instance (is_main=False)."""

    def __init__(self, is_main: bool, total_steps: int, log_every: int):
        self.is_main, self.total_steps, self.log_every = is_main, total_steps, log_every
        self.console = Console(stderr=False)
        self.interactive = is_main and sys.stdout.isatty()
        self.progress = None
        self.started = time.time()

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

    def step(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
        if not self.is_main:
            return
        status = f"epoch {epoch} loss {loss:.4f} lr {lr:.2e} {images_per_s:.1f} img/s"
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
