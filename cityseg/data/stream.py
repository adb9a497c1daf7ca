"""The training batches as one stream over epochs: loader workers prefetch the next epoch while this one ends."""
from __future__ import annotations

import itertools

from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from accelerate.utils import send_to_device
from torch.utils.data import Sampler

from cityseg.data.sampler import EpochSampler


def rank_batches(order: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of an epoch's order, dealt as accelerate.prepare deals them: batches of batch_size (the
    last incomplete one dropped), batch i to rank i % world, a last round that would not give every rank one dropped."""
    rounds = len(order) // batch_size // world
    return [order[(r * world + rank) * batch_size:(r * world + rank + 1) * batch_size] for r in range(rounds)]


class EpochBatches(Sampler[list]):
    """The training DataLoader's batch_sampler: this rank's batches of epoch after epoch, from `first_epoch` until
    `epochs` (None: without end). Each sample is (epoch, index): a worker augments it for its own epoch, also while
    the main process still trains the previous one. The resume point (EpochSampler.start_at) applies to its
    epoch only."""

    def __init__(self, sampler: EpochSampler, batch_size: int, rank: int, world: int, epochs: int | None = None):
        self.sampler, self.batch_size, self.rank, self.world, self.epochs = sampler, batch_size, rank, world, epochs
        self.first_epoch = 0
        self.resume: tuple[int, int] | None = None  # fixed when TrainStream starts; until then the sampler's

    def batches(self, epoch: int) -> list[list[int]]:
        """Sample indices of this rank's batches of `epoch`, less the samples trained before a resume."""
        skipped = EpochSampler.skipped(epoch, self.resume or self.sampler.resume)
        return rank_batches(self.sampler.order(epoch)[skipped:], self.batch_size, self.rank, self.world)

    def count(self, epoch: int) -> int:
        """len(self.batches(epoch)), without drawing the epoch's order (the loop asks every step)."""
        skipped = EpochSampler.skipped(epoch, self.resume or self.sampler.resume)
        return (self.sampler.num_samples - skipped) // self.batch_size // self.world

    def __iter__(self):
        epochs = itertools.count(self.first_epoch) if self.epochs is None else range(self.first_epoch, self.epochs)
        for epoch in epochs:
            for batch in self.batches(epoch):
                yield [(epoch, index) for index in batch]


class TrainStream(DataLoaderStateMixin):
    """What the training loop iterates: one epoch's batches at a time, taken from one loader iterator that lives
    for the run, so the workers keep decoding across the epoch's end, validation and the save. Like accelerate's
    prepared loader it moves batches to the device, reports its length per epoch, and flags an epoch's last batch
    (gradient_state.end_of_dataloader): accelerate also steps on an epoch's last, shorter accumulation window."""

    def __init__(self, loader, device, non_blocking: bool = False):
        self.loader, self.batch_sampler = loader, loader.batch_sampler
        self.device, self.non_blocking = device, non_blocking
        self.gradient_state = GradientState()
        self._drop_last = True  # accelerate's begin(): no remainder to account for
        self.iterator, self.epoch, self.taken = None, None, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields: the first one, or the next after the current one is used up."""
        if self.iterator is None:
            self.batch_sampler.first_epoch, self.epoch = epoch, epoch
            return
        if epoch != self.epoch and (epoch != self.epoch + 1 or self.taken != len(self)):
            raise RuntimeError(f"TrainStream: epoch {epoch} asked for while epoch {self.epoch} has "
                               f"{len(self) - self.taken} of {len(self)} batches unread; the stream runs in order")
        if epoch != self.epoch:
            self.epoch, self.taken = epoch, 0

    def __len__(self) -> int:
        return self.batch_sampler.count(self.batch_sampler.first_epoch if self.epoch is None else self.epoch)

    def __iter__(self):
        if self.iterator is None:
            self.set_epoch(self.batch_sampler.first_epoch if self.epoch is None else self.epoch)
            self.batch_sampler.resume = self.batch_sampler.sampler.resume  # fixed: later epochs start whole
            self.iterator = iter(self.loader)
        if self.batch_sampler.resume != self.batch_sampler.sampler.resume and self.batch_sampler.sampler.skipped(
                self.epoch, self.batch_sampler.sampler.resume):
            raise RuntimeError(f"TrainStream: start_at {self.batch_sampler.sampler.resume} after the stream started "
                               f"at {self.batch_sampler.resume}; a resume point is set before the first epoch")
        count = len(self)
        self.begin()
        while self.taken < count:
            batch = next(self.iterator)
            self.taken += 1
            self.end_of_dataloader = self.taken == count  # accelerate's accumulate() steps on it
            yield send_to_device(batch, self.device, non_blocking=self.non_blocking)
        self.end()  # as accelerate's loader: a pass left early (the schedule's last step) stays registered
