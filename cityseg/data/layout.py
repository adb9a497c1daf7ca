"""The Cityscapes folder layout and its cheap checks: no torch, no OpenCV, so a wrong data.root answers at once."""
from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
LAYOUT = "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png with <root>/gtFine/<split>/<city>/*_gtFine_labelIds.png"


class DataError(ValueError):
    """A one-line, user-facing problem with the dataset on disk (names the file)."""


def check_split_dir(root: str | Path, split: str) -> Path:
    """The split's image folder, after checking data.root holds leftImg8bit/ and gtFine/ and the split."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root}: directory not found; expected the Cityscapes layout {LAYOUT}")
    for needed in (root / "leftImg8bit", root / "gtFine"):
        if not needed.is_dir():
            raise DataError(f"{needed}: missing; data.root must hold the Cityscapes layout {LAYOUT}")
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: split '{split}' not found; expected {LAYOUT}")
    return image_dir
