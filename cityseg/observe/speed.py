"""Throughput of the training steps: data wait, images/s, step time, MFU, memory, and each epoch's verdict."""
from __future__ import annotations

import time

import torch

DATA_BOUND_SHARE = 0.10  # above this share of wall time waiting for the loader, an epoch is data-bound


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
