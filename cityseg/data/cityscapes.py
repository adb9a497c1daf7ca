"""Cityscapes on disk: find image/label pairs, decode them, map label ids with one lookup table."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from cityseg.data.layout import (
    IMAGE_SUFFIX,
    LABEL_SUFFIX,
    LAYOUT,
    DataError,
    check_split_dir,
)
from cityseg.data.transforms import sample_seed
from cityseg.labels import known_label_ids

cv2.setNumThreads(1)  # loader workers are the parallelism; OpenCV threads inside them only contend


def find_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """All (image, label) pairs of a split, sorted by path; every image must have its label."""
    image_dir, label_dir = check_split_dir(root, split), Path(root) / "gtFine" / split
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise DataError(f"{image_dir}: no images in split '{split}'; expected {LAYOUT}")
    pairs = []
    for image in images:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = label_dir / image.parent.name / f"{stem}{LABEL_SUFFIX}"
        if not label.is_file():
            raise DataError(f"{image}: its label {label} is missing")
        pairs.append((image, label))
    return pairs


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Grayscale and RGBA images are converted (a note on stderr), anything else refused."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DataError(f"{path}: cannot decode image (corrupt, truncated or not an image)")
    if raw.dtype != np.uint8:
        raise DataError(f"{path}: image has {raw.dtype} pixels; expected 8-bit")
    if raw.ndim == 2 or raw.shape[2] == 1:
        print(f"note: {path}: grayscale image, converted to RGB", file=sys.stderr)
        return cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
    if raw.shape[2] == 4:
        print(f"note: {path}: RGBA image, alpha dropped", file=sys.stderr)
        return cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)


_KNOWN_IDS = known_label_ids()


def read_label(path: Path, label_lut: np.ndarray) -> np.ndarray:
    """(H, W) uint8 training indices: the stored label ids through the scheme's lookup table."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DataError(f"{path}: cannot decode label (corrupt, truncated or not an image)")
    if raw.ndim != 2:
        raise DataError(f"{path}: label has {raw.shape[2]} channels; expected one channel of label ids "
                        "(use *_gtFine_labelIds.png, not *_gtFine_color.png)")
    if raw.dtype != np.uint8:
        raise DataError(f"{path}: label has {raw.dtype} values; expected 8-bit label ids")
    unknown = ~_KNOWN_IDS[raw]
    if unknown.any():
        bad = np.unique(raw[unknown])[:5].tolist()
        raise DataError(f"{path}: label ids {bad} are not in the Cityscapes table")
    return label_lut[raw]


def read_pair(image_path: Path, label_path: Path, label_lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image, label = read_image(image_path), read_label(label_path, label_lut)
    if image.shape[:2] != label.shape:
        raise DataError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image "
                        f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
    return image, label


class CityscapesPairs(Dataset):
    """Decoded, label-mapped, transformed samples: (float image [3, H, W], uint8 mask [H, W], index)."""

    def __init__(self, pairs, label_lut, transform, seed: int = 0, on_bad_sample: str = "error",
                 bad_sample_log: Path | None = None):
        self.pairs, self.label_lut, self.transform = pairs, label_lut, transform
        self.seed = seed
        # in shared memory: persistent loader workers (forked once) see each set_epoch of the main process
        self.shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.on_bad_sample, self.bad_sample_log = on_bad_sample, bad_sample_log

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.fill_(epoch)  # before the epoch's iterator starts: workers then fetch its samples

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return read_pair(*self.pairs[index], self.label_lut)

    def epoch_and_index(self, key) -> tuple[int, int]:
        """A training stream's key (epoch, index) carries its epoch; a plain index is of the set_epoch epoch."""
        return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (self.epoch, int(key))

    def __getitem__(self, key):
        epoch, index = self.epoch_and_index(key)
        for offset in range(len(self)):  # a bad sample's next neighbour stands in, so batch shapes stay fixed
            try:
                image, mask = self.load((index + offset) % len(self))
                break
            except DataError as err:
                if self.on_bad_sample == "error":
                    raise
                self.record_bad_sample(err)
        else:
            raise DataError(f"{self.pairs[index][0].parent.parent}: every sample is bad (data.on_bad_sample=skip)")
        self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"], index

    def record_bad_sample(self, err: DataError) -> None:
        print(f"warning: skipped sample: {err}", file=sys.stderr)
        if self.bad_sample_log is not None:
            with open(self.bad_sample_log, "a") as log:  # one short append per line: safe across workers
                log.write(f"{err}\n")


def skipped_samples(bad_sample_log: Path) -> list[str]:
    """The end-of-run summary of data.on_bad_sample=skip: each bad file once, in the order first met."""
    if not bad_sample_log.is_file():
        return []
    unique = list(dict.fromkeys(bad_sample_log.read_text().splitlines()))
    return [f"warning: {len(unique)} bad sample(s) skipped (listed in {bad_sample_log}):", *unique]


def collate(batch):
    images, masks, indices = zip(*(sample[:3] for sample in batch))  # raw cached samples also carry their epoch
    return torch.stack(images), torch.stack(masks), torch.tensor(indices)


def collate_channels_last(batch):
    """collate for train.channels_last: the images stacked straight into channels_last memory in the worker, so
    the device gets the layout the model runs in and makes no copy of each batch to change it."""
    images, masks, indices = zip(*(sample[:3] for sample in batch))
    stacked = torch.stack([image.permute(1, 2, 0) for image in images])  # [N, H, W, C]: one copy, as stack makes
    return stacked.permute(0, 3, 1, 2), torch.stack(masks), torch.tensor(indices)
