"""The training stream: dealt like accelerate, prefetched across epoch ends, accumulation flags as accelerate's."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader, Dataset

from cityseg.data.cityscapes import collate
from cityseg.data.loaders import worker_kwargs
from cityseg.data.sampler import EpochSampler
from cityseg.data.stream import EpochBatches, TrainStream, rank_batches

LOAD_S = 0.4  # one sample's load time in SlowSamples


class SlowSamples(Dataset):
    """Each load takes LOAD_S and appends "<epoch> <index>" to a log when done: what the workers did, and when."""

    def __init__(self, size: int, log: Path):
        self.size, self.log = size, str(log)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        epoch, index = key
        time.sleep(LOAD_S)
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{epoch} {index}\n".encode())  # one short append: whole lines across workers
        os.close(fd)
        return torch.tensor([float(epoch)]), torch.zeros(1, dtype=torch.uint8), index


class Keys(Dataset):
    """Sample (epoch, index) as (epoch, nothing, index): what a batch was made of."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        epoch, index = key
        return torch.tensor([float(epoch)]), torch.zeros(1), index


def loaded(log: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []


def stream_of(dataset, batch_size: int, world: int = 1, rank: int = 0, epochs=None, workers: int = 0,
              sampler: EpochSampler | None = None) -> TrainStream:
    batches = EpochBatches(sampler or EpochSampler(len(dataset), seed=0), batch_size, rank, world, epochs)
    return TrainStream(DataLoader(dataset, batch_sampler=batches, collate_fn=collate, **worker_kwargs(workers)),
                       torch.device("cpu"))


@pytest.mark.parametrize("samples,batch_size,world", [(16, 4, 1), (16, 3, 2), (17, 2, 3), (10, 4, 3), (5, 2, 4)])
def test_batches_are_dealt_as_accelerate_deals_them(samples, batch_size, world):
    order = EpochSampler(samples, seed=1).order(2)
    for rank in range(world):
        theirs = BatchSamplerShard(BatchSampler(order, batch_size, drop_last=True), num_processes=world,
                                   process_index=rank, split_batches=False, even_batches=True)
        assert rank_batches(order, batch_size, rank, world) == list(theirs)


def test_workers_prefetch_the_next_epoch_before_it_is_asked_for(tmp_path):
    """Epoch 0 is read, then the main process does other work (validation, a save): meanwhile the workers
    already load epoch 1's first batch, so its first next() does not wait for a load."""
    log = tmp_path / "loads.txt"
    stream = stream_of(SlowSamples(8, log), batch_size=2, epochs=3, workers=2)
    stream.set_epoch(0)
    first = [batch for batch in stream]
    assert [batch[0].flatten().tolist() for batch in first] == [[0.0, 0.0]] * 4 and len(stream) == 4
    epoch1 = EpochSampler(8, seed=0).order(1)
    deadline = time.monotonic() + 30 * LOAD_S
    while not {(1, i) for i in epoch1[:2]} <= set(loaded(log)):  # by events: the loads that finished
        assert time.monotonic() < deadline, f"epoch 1's first batch not loaded while epoch 0 ended: {loaded(log)}"
        time.sleep(0.05)
    stream.set_epoch(1)
    batches = iter(stream)
    start = time.perf_counter()
    images, _, indices = next(batches)
    waited = time.perf_counter() - start
    assert indices.tolist() == epoch1[:2] and images.flatten().tolist() == [1.0, 1.0]  # the sample knew its epoch
    assert waited < LOAD_S / 4, f"epoch 1's first batch took {waited:.3f} s: not prefetched"
    assert [loaded(log).count((1, index)) for index in epoch1[:2]] == [1, 1]  # the prefetched loads were used
    assert [index for batch in batches for index in batch[2].tolist()] == epoch1[2:]


def test_one_iterator_serves_every_epoch_and_the_resume_point_applies_once():
    sampler = EpochSampler(10, seed=4)
    sampler.start_at(1, 5)
    stream = stream_of(Keys(10), batch_size=2, epochs=3, sampler=sampler)
    seen = {}
    for epoch in (1, 2):
        stream.set_epoch(epoch)
        seen[epoch] = [index for batch in stream for index in batch[2].tolist()]
        iterator = stream.iterator
    assert seen[1] == EpochSampler(10, seed=4).order(1)[5:9]  # 5 left, pairs: the fifth dropped
    assert seen[2] == EpochSampler(10, seed=4).order(2) and stream.iterator is iterator


def test_an_epoch_is_not_skipped_or_left_half_read():
    stream = stream_of(Keys(8), batch_size=2)
    stream.set_epoch(0)
    next(iter(stream))
    with pytest.raises(RuntimeError, match="epoch 1 asked for while epoch 0 has 3 of 4 batches unread"):
        stream.set_epoch(1)


def test_the_last_window_of_an_epoch_steps_as_with_accelerates_loader():
    """5 batches per epoch with 3 accumulated: accelerate steps after batches 3 and 5 (the shorter window)."""
    def sync_pattern(loader, accelerator, model, epochs=2):
        pattern = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                with accelerator.accumulate(model):
                    pattern.append(accelerator.sync_gradients)
        return pattern

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = accelerator.prepare(torch.nn.Linear(1, 1))
    data = list(range(10))
    theirs = sync_pattern(accelerator.prepare(DataLoader(data, batch_size=2, drop_last=True)), accelerator, model)
    ours = sync_pattern(stream_of(Keys(10), batch_size=2), accelerator, model)
    assert theirs == [False, False, True, False, True] * 2 and ours == theirs
