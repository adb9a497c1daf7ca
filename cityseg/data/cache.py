"""Decode-once cache: resized images and mapped labels in memory-mapped .npy shards, with a manifest that refuses stale data."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from cityseg.data.cityscapes import CityscapesPairs, DataError, read_pair

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30  # under 1 GiB per images shard: easy to copy, rsync and page in


def storage_size(data_cfg) -> list[int]:
    """[H, W] stored in the cache: data.cache.size, or the training size when unset."""
    return list(data_cfg.cache.size or data_cfg.image_size)


def source_records(root: Path, pairs) -> list[list]:
    """[relative path, size, mtime_ns] of every image and label: a stat per file, no reading."""
    records = []
    for pair in pairs:
        for path in pair:
            info = os.stat(path)
            records.append([str(Path(path).relative_to(root)), info.st_size, info.st_mtime_ns])
    return records


def fingerprint(records: list[list]) -> str:
    # size + mtime per file: stat-only, so checking 5950 files costs milliseconds where hashing 11 GB of PNGs
    # would cost minutes at every start; it misses only an edit that keeps both size and mtime (touch -r).
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()


def shard_plan(num_samples: int, size: list[int]) -> list[tuple[int, int]]:
    """(first sample, count) of each shard, so that no images shard exceeds SHARD_BYTES."""
    per_shard = max(1, SHARD_BYTES // (size[0] * size[1] * 3))
    return [(start, min(per_shard, num_samples - start)) for start in range(0, num_samples, per_shard)]


def _shard_paths(split_dir: Path, shard: int) -> tuple[Path, Path]:
    return split_dir / f"images_{shard:03d}.npy", split_dir / f"labels_{shard:03d}.npy"


def _write_sample(job) -> int:
    """In a worker: decode one pair, resize, write it into its slot of the (pre-allocated) shard files."""
    image_path, label_path, lut, size, images_file, labels_file, slot = job
    image, label = read_pair(Path(image_path), Path(label_path), lut)
    height, width = size
    if image.shape[:2] != (height, width):  # the same calls as the train transform's Resize (albumentations)
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    images = np.load(images_file, mmap_mode="r+")
    labels = np.load(labels_file, mmap_mode="r+")
    images[slot], labels[slot] = image, label
    images.flush()
    labels.flush()
    return 1


def write_cache(pairs, root, split_dir, size, scheme: str, lut: np.ndarray, rank: int = 0, world_size: int = 1,
                workers: int = 1, progress=None) -> list[tuple[int, int]]:
    """Write this rank's shards (shard i belongs to rank i % world_size) of one split; returns the shard plan.

    Each rank creates only its own shard files and each sample is written by exactly one worker, so nothing is
    written twice. The manifest is written afterwards by `write_manifest` (on one rank), last, so a crashed
    prepare leaves a cache without manifest, which is refused.
    """
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    plan = shard_plan(len(pairs), size)
    jobs = []
    for shard, (start, count) in enumerate(plan):
        if shard % world_size != rank:
            continue
        images_file, labels_file = _shard_paths(split_dir, shard)
        np.lib.format.open_memmap(images_file, mode="w+", dtype=np.uint8, shape=(count, *size, 3)).flush()
        np.lib.format.open_memmap(labels_file, mode="w+", dtype=np.uint8, shape=(count, *size)).flush()
        jobs += [(str(pairs[start + slot][0]), str(pairs[start + slot][1]), lut, tuple(size), str(images_file),
                  str(labels_file), slot) for slot in range(count)]
    if workers <= 1:
        for job in jobs:
            _write_sample(job)
            if progress:
                progress()
    else:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_write_sample, jobs, chunksize=4):
                if progress:
                    progress()
    return plan


def write_manifest(split_dir, root, pairs, size, scheme: str, plan) -> Path:
    split_dir, root = Path(split_dir), Path(root)
    records = source_records(root, pairs)
    manifest = {
        "format": FORMAT_VERSION, "root": str(root.resolve()), "scheme": scheme, "size": list(size),
        "num_samples": len(pairs), "fingerprint": fingerprint(records), "sources": records,
        "shards": [{"images": _shard_paths(split_dir, i)[0].name, "labels": _shard_paths(split_dir, i)[1].name,
                    "count": count} for i, (_, count) in enumerate(plan)],
    }
    tmp = split_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest))
    tmp.replace(split_dir / MANIFEST)
    return split_dir / MANIFEST


def clear_split(split_dir: Path) -> None:
    """Remove an old cache of a split before rewriting it (the manifest first: a half-written cache is refused)."""
    (split_dir / MANIFEST).unlink(missing_ok=True)
    if split_dir.is_dir():
        shutil.rmtree(split_dir)


def check_manifest(split_dir, root, pairs, size, scheme: str) -> dict:
    """The manifest of a cached split if it matches the sources and the config; else a one-line DataError."""
    split_dir, root = Path(split_dir), Path(root)
    path = split_dir / MANIFEST
    rerun = "rerun `cityseg prepare --config <your config>`"
    if not path.is_file():
        raise DataError(f"{split_dir}: no cache here (or an interrupted prepare); {rerun}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable cache manifest ({err}); {rerun}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: cache format {manifest.get('format')} is not {FORMAT_VERSION}; {rerun}")
    if manifest["scheme"] != scheme:
        raise DataError(f"{path}: cache holds data.label_scheme {manifest['scheme']} but the config asks for "
                        f"{scheme}; {rerun}")
    if list(manifest["size"]) != list(size):
        raise DataError(f"{path}: cache stores {manifest['size'][0]}x{manifest['size'][1]} (HxW) but the config "
                        f"asks for {size[0]}x{size[1]} (data.cache.size or data.image_size); stale cache, {rerun}")
    records = source_records(root, pairs)
    if fingerprint(records) != manifest["fingerprint"]:
        cached = {rel: (size_, mtime) for rel, size_, mtime in manifest["sources"]}
        now = {rel: (size_, mtime) for rel, size_, mtime in records}
        changed = sorted(rel for rel in now if rel in cached and now[rel] != cached[rel])
        added, removed = sorted(set(now) - set(cached)), sorted(set(cached) - set(now))
        reason = (f"{root / changed[0]} changed since it was cached" if changed else
                  f"{root / added[0]} is not in the cache" if added else f"{root / removed[0]} is gone from data.root")
        raise DataError(f"{path}: stale cache: {reason} ({len(changed)} changed, {len(added)} new, "
                        f"{len(removed)} removed); {rerun}")
    for shard in manifest["shards"]:
        for key in ("images", "labels"):
            if not (split_dir / shard[key]).is_file():
                raise DataError(f"{split_dir / shard[key]}: cache shard missing; {rerun}")
    return manifest


class CachedPairs(CityscapesPairs):
    """CityscapesPairs whose decoded, label-mapped pairs come from the memory-mapped shards (no PNG decode).

    The shards are opened lazily in each process: a pickled dataset (what each loader worker receives) holds
    only paths, and all workers read the same page-cache pages, so worker memory does not grow with the dataset.
    With device_augment the transform is skipped: samples leave as uint8 and `device_augment.augment_batch`
    flips, scales, crops and normalizes the whole batch on the device.
    """

    def __init__(self, split_dir, manifest: dict, transform, seed: int = 0, raw: bool = False):
        super().__init__(pairs=[], label_lut=None, transform=transform, seed=seed)
        self.split_dir, self.raw = Path(split_dir), raw
        self.shard_files = [(shard["images"], shard["labels"]) for shard in manifest["shards"]]
        counts = [shard["count"] for shard in manifest["shards"]]
        self.shard_starts = np.cumsum([0, *counts])
        self.shards = None  # opened on first use in each process

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "shards": None}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.shards is None:
            self.shards = [(np.load(self.split_dir / images, mmap_mode="r"),
                            np.load(self.split_dir / labels, mmap_mode="r")) for images, labels in self.shard_files]
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.shard_starts, index, side="right")) - 1
        images, labels = self.shards[shard]
        slot = index - int(self.shard_starts[shard])
        return np.array(images[slot]), np.array(labels[slot])  # one copy out of the page cache

    def __getitem__(self, key):
        if not self.raw:
            return super().__getitem__(key)
        epoch, index = self.epoch_and_index(key)
        image, mask = self.load(index)
        # the epoch rides along: the collate draws this epoch's augmentation even when the next one is training
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask), index, epoch


def prepare(data_cfg, splits: list[str], workers: int | None = None) -> list[Path]:
    """`cityseg prepare`: build the cache of each split; under a launcher the ranks split the shards."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from rich.progress import Progress

    from cityseg.data.cityscapes import find_pairs
    from cityseg.labels import label_lut

    if not data_cfg.cache.dir:
        raise DataError("data.cache.dir: not set; say where the cache goes, e.g. data.cache.dir=/scratch/cityscapes_cache")
    # like Accelerator(), honour ACCELERATE_USE_CPU: without it a CPU launch gives N lone processes that each
    # clear and write the whole split
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    workers = workers or max(1, (os.cpu_count() or 1) // state.num_processes)
    size, scheme, lut = storage_size(data_cfg), data_cfg.label_scheme, label_lut(data_cfg.label_scheme)
    written = []
    for split in splits:
        pairs = find_pairs(data_cfg.root, split)
        split_dir = Path(data_cfg.cache.dir) / split
        if state.is_main_process:
            clear_split(split_dir)
        state.wait_for_everyone()
        mine = sum(count for shard, (_, count) in enumerate(shard_plan(len(pairs), size))
                   if shard % state.num_processes == state.process_index)
        with Progress(disable=not state.is_main_process, transient=True) as bar:
            task = bar.add_task(f"{split}: {len(pairs)} pairs -> {size[0]}x{size[1]}", total=mine)
            plan = write_cache(pairs, data_cfg.root, split_dir, size, scheme, lut, state.process_index,
                               state.num_processes, workers, progress=lambda: bar.advance(task))
        state.wait_for_everyone()
        if state.is_main_process:
            written.append(write_manifest(split_dir, data_cfg.root, pairs, size, scheme, plan))
    state.wait_for_everyone()
    return written
