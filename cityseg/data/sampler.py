"""The training sample order: one shuffle per epoch for every world size, resumable at any sample of it."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Epoch e yields the permutation seeded by (seed + e), less its first `start` samples.

    The permutation is the one accelerate's seedable sampler draws (torch.randperm on a generator seeded with
    seed + epoch), so results are unchanged from runs that used it. accelerate.prepare batches what this yields
    (data.batch_size, the last incomplete batch dropped) and deals the batches to the ranks in turn (batch i to
    rank i % world), dropping a last round that would not give every rank a full batch. Because the order does
    not depend on the world size, a run resumed with other processes or another batch size continues the same
    epoch: start_at(epoch, samples consumed before the stop), and the rest is shared among the new ranks, each
    sample once. (accelerate's skip_first_batches cannot: it skips whole batches of the new shape, and 4 samples
    trained by 2 ranks x 2 are not a whole number of 3 x 2 batches.)
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
        self.resume = (0, 0)  # (epoch, samples consumed): the offset applies to that epoch only

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # accelerate's loader calls this again at every iteration's start

    def start_at(self, epoch: int, consumed: int) -> None:
        """Skip the first `consumed` samples of `epoch`'s order (trained before a resume); other epochs whole."""
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"start_at: {consumed} samples consumed is outside an epoch of {self.num_samples}")
        self.resume = (epoch, consumed)

    @property
    def start(self) -> int:
        """Samples of the current epoch's order that are skipped."""
        return self.skipped(self.epoch, self.resume)

    @staticmethod
    def skipped(epoch: int, resume: tuple[int, int]) -> int:
        """Samples of `epoch`'s order skipped under start_at's `resume` (epoch, consumed)."""
        resumed_epoch, consumed = resume
        return consumed if resumed_epoch == epoch else 0

    def order(self, epoch: int | None = None) -> list[int]:
        """The whole order of `epoch` (default: the current one), consumed samples included."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def epoch_sampler(loader) -> EpochSampler:
    """The EpochSampler of a training DataLoader or TrainStream (whose EpochBatches holds it), also after
    accelerate.prepare (whose BatchSamplerShard wraps the loader's BatchSampler and, for a sampler of its own kind
    only, exposes the sampler)."""
    batches = getattr(loader.batch_sampler, "batch_sampler", loader.batch_sampler)
    if not isinstance(batches.sampler, EpochSampler):
        raise TypeError(f"the training loader samples with {type(batches.sampler).__name__}, not EpochSampler")
    return batches.sampler
