"""Datasets and DataLoaders from the config: training (sharded by accelerate) and evaluation (sharded by rank)."""
from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from cityseg.config.schema import ConfigError
from cityseg.data.cache import CachedPairs, check_manifest, storage_size
from cityseg.data.cityscapes import CityscapesPairs, collate, collate_channels_last, find_pairs
from cityseg.data.device_augment import AugmentParamsCollate
from cityseg.data.sampler import EpochSampler
from cityseg.data.stream import EpochBatches, TrainStream
from cityseg.data.transforms import eval_transform, train_transform
from cityseg.distributed.preemption import shield_worker
from cityseg.labels import label_lut


def init_worker(worker_id: int, rank: int, preempt_signals: list[str]) -> None:
    """Distinct numpy / random / torch seeds per rank and per worker (for randomness outside albumentations);
    preemption signals are left to the main process."""
    shield_worker(preempt_signals)
    seed = (torch.initial_seed() + rank * 7919) % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


def cached_dataset(data_cfg, seed: int, split: str, pairs, transform, raw: bool = False) -> CachedPairs:
    """The split from data.cache.dir, after checking it was built from these very files at this size."""
    split_dir = Path(data_cfg.cache.dir) / split
    manifest = check_manifest(split_dir, data_cfg.root, pairs, storage_size(data_cfg), data_cfg.label_scheme)
    return CachedPairs(split_dir, manifest, transform, seed=seed, raw=raw)


def check_cache_options(data_cfg) -> None:
    """data.cache.* settings that cannot work together (training and `cityseg check` both ask)."""
    if data_cfg.cache.device_augment and not data_cfg.cache.dir:
        raise ConfigError("data.cache.device_augment: needs data.cache.dir (samples decoded from PNG are "
                          "augmented on the CPU)")
    if data_cfg.cache.device_augment and data_cfg.cat_max_ratio < 1.0:
        raise ConfigError("data.cat_max_ratio: not applied by data.cache.device_augment (its crops are drawn "
                          "without the labels); set data.cat_max_ratio=1.0 or data.cache.device_augment=false")


def train_dataset(data_cfg, seed: int, bad_sample_log: Path | None = None) -> CityscapesPairs:
    check_cache_options(data_cfg)
    pairs = find_pairs(data_cfg.root, data_cfg.train_split)
    if data_cfg.cache.dir:
        return cached_dataset(data_cfg, seed, data_cfg.train_split, pairs, train_transform(data_cfg),
                              raw=data_cfg.cache.device_augment)
    return CityscapesPairs(pairs, label_lut(data_cfg.label_scheme), train_transform(data_cfg), seed=seed,
                           on_bad_sample=data_cfg.on_bad_sample, bad_sample_log=bad_sample_log)


def eval_dataset(data_cfg, seed: int, split: str | None = None, full_resolution: bool = False) -> CityscapesPairs:
    """Evaluation samples resized to the training size (from the cache when the split is in it), or at the
    labels' own resolution (always from the files)."""
    split = split or data_cfg.val_split
    pairs = find_pairs(data_cfg.root, split)
    size = None if full_resolution else data_cfg.image_size
    if data_cfg.cache.dir and not full_resolution and (Path(data_cfg.cache.dir) / split).is_dir():
        return cached_dataset(data_cfg, seed, split, pairs, eval_transform(data_cfg, size))  # not prepared: files
    return CityscapesPairs(pairs, label_lut(data_cfg.label_scheme), eval_transform(data_cfg, size), seed=seed)


def train_loader(data_cfg, dataset, seed: int, rank: int, world: int, *, epochs: int | None,
                 preempt_signals: list[str], channels_last: bool = False) -> DataLoader:
    """This rank's batches, epoch after epoch: shuffled per epoch by EpochSampler (resumable at any sample), dealt
    to the ranks in turn as accelerate.prepare would (not to be prepared again); the samples are (epoch, index)."""
    batches = EpochBatches(EpochSampler(len(dataset), seed), data_cfg.batch_size, rank, world, epochs)
    return DataLoader(
        dataset, batch_sampler=batches, collate_fn=train_collate(data_cfg, seed, dataset, channels_last),
        worker_init_fn=functools.partial(init_worker, rank=rank, preempt_signals=preempt_signals),
        **worker_kwargs(data_cfg.num_workers),
    )


def train_stream(data_cfg, dataset, accelerator, *, seed: int, epochs: int | None,
                 preempt_signals: list[str], channels_last: bool = False) -> TrainStream:
    """The run's training batches on the device, one epoch at a time from one long-lived loader iterator."""
    loader = train_loader(data_cfg, dataset, seed, accelerator.process_index, accelerator.num_processes,
                          epochs=epochs, preempt_signals=preempt_signals, channels_last=channels_last)
    return TrainStream(loader, accelerator.device, accelerator.non_blocking)


def train_collate(data_cfg, seed: int, dataset, channels_last: bool = False):
    """With data.cache.device_augment, batches carry each sample's augmentation (drawn in the worker) instead of
    its index: the device never hands indices back to the host (and augments into a new tensor, whatever the
    layout). Otherwise, under train.channels_last, images are stacked in that layout in the worker."""
    if data_cfg.cache.dir and data_cfg.cache.device_augment:
        return AugmentParamsCollate(collate, data_cfg, seed, dataset.shared_epoch)
    return collate_channels_last if channels_last else collate


def worker_kwargs(num_workers: int) -> dict:
    """Pinned batches (copied to the GPU without blocking) and workers forked once per run, not per epoch or
    per validation: with few steps per epoch, re-forking and the first batch's decode cost more than training."""
    return {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
            "persistent_workers": num_workers > 0, "prefetch_factor": 4 if num_workers > 0 else None}


def rank_shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Every rank-th sample: disjoint across ranks, together exactly the whole set (no padding, no repeats)."""
    return list(range(rank, num_samples, world_size))


def eval_loader(data_cfg, dataset, rank: int, world_size: int, *, preempt_signals: list[str],
                batch_size: int | None = None) -> DataLoader:
    """This rank's unique share of an evaluation set; metrics are summed across ranks afterwards."""
    shard = Subset(dataset, rank_shard(len(dataset), rank, world_size))
    return DataLoader(
        shard, batch_size=batch_size or data_cfg.val_batch_size or data_cfg.batch_size, shuffle=False,
        collate_fn=collate, **worker_kwargs(data_cfg.num_workers),
        # persistent workers live through training: they must survive a preemption signal sent to the whole job
        worker_init_fn=functools.partial(init_worker, rank=rank, preempt_signals=preempt_signals),
    )
