"""What a run shows: a rich console (bars on a terminal, plain lines in logs) and the run's JSONL files."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

DATA_BOUND_SHARE = 0.10  # above this share of wall time waiting for the loader, an epoch is data-bound


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


class DataWait:
    """Seconds spent inside next() of a loader: the share of step time the model waits for data."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, iterable):
        start = time.perf_counter()
        iterator = iter(iterable)  # an epoch's start (workers forked or woken, first batches fetched) is data wait
        self.seconds += time.perf_counter() - start
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            yield item


class Speedometer:
    """Throughput of the steps since the last read: images/s, step time (CUDA events on a GPU), the share of wall
    time spent waiting for the loader, MFU against the GPU's peak, and peak memory. Read at the logging cadence,
    after the step statistics were read (which waited for the device), so wall time is device time too."""

    def __init__(self, device, world: int, flops_per_image: float | None, peak_flops: float | None):
        self.cuda = device.type == "cuda"
        self.world, self.flops_per_image, self.peak_flops = world, flops_per_image, peak_flops
        self.epoch_wait = self.epoch_wall = 0.0
        self.epoch_images = 0
        self.restart(0.0)

    def restart(self, waited_s: float) -> None:
        """A new window from now: after each read, and after validation or a save, so that time spent there
        counts in no window, epoch img/s or data-wait share (the window is empty then: a read came just before)."""
        self.images, self.steps, self.waited_at, self.started = 0, 0, waited_s, time.perf_counter()
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()

    def add(self, images: int, step_done: bool) -> None:
        self.images, self.steps = self.images + images, self.steps + int(step_done)

    def read(self, waited_s: float) -> dict:
        """The window's figures (waited_s: DataWait.seconds so far); starts the next window."""
        wall = max(time.perf_counter() - self.started, 1e-9)
        busy = wall
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()  # already reached: the statistics read just before waited for the device
            busy = self.start_event.elapsed_time(end) / 1000
        waited = waited_s - self.waited_at
        self.epoch_wait, self.epoch_wall = self.epoch_wait + waited, self.epoch_wall + wall
        self.epoch_images += self.images * self.world
        images_per_s = self.images * self.world / wall
        record = {"images_per_s": images_per_s, "step_time_s": busy / max(self.steps, 1),
                  "data_wait": waited / wall}  # fraction of this rank's wall time
        if self.peak_flops and self.flops_per_image:
            record["mfu"] = self.flops_per_image * images_per_s / (self.peak_flops * self.world)
        if self.cuda:
            record["mem_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            record["mem_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        self.restart(waited_s)
        return record

    def epoch_verdict(self, epoch: int) -> str:
        """One line: was this epoch data-bound or compute-bound, and the number behind it."""
        share = self.epoch_wait / max(self.epoch_wall, 1e-9)
        numbers = (f"{100 * share:.1f}% of {self.epoch_wall:.1f} s waiting for data ({self.epoch_wait:.1f} s), "
                   f"{self.epoch_images / max(self.epoch_wall, 1e-9):.1f} img/s over the epoch")
        self.epoch_wait = self.epoch_wall = 0.0
        self.epoch_images = 0
        if share > DATA_BOUND_SHARE:
            return (f"epoch {epoch}: data-bound: {numbers}; more data.num_workers, data.cache.dir or "
                    "data.cache.device_augment would feed the model faster")
        return f"epoch {epoch}: compute-bound: {numbers}"


def drop_records_after(path: Path, step: int) -> None:
    """Remove records past `step` (and a line torn by a kill): a resumed run writes them again from there."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("".join(f"{line}\n" for line in kept))
    staging.replace(path)


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
