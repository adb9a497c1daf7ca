"""The Cityscapes folder layout and its cheap checks (folders, PNG headers): no torch, no OpenCV, no decoding."""
from __future__ import annotations

import os
import struct
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with (length 0, type, CRC)
CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # PNG colour type -> channels as OpenCV decodes it (palette: 3)


def png_header(path: Path, kind: str) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, after checking the file ends with its IEND
    chunk (a truncated copy does not): 41 bytes read, nothing decoded."""
    try:
        with open(path, "rb") as file:
            head = file.read(26)
            size = file.seek(0, os.SEEK_END)
            file.seek(max(size - len(PNG_END), 0))
            tail = file.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read {kind} ({err.strerror})") from None
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(f"{path}: cannot decode {kind} (not a PNG file: no PNG signature and IHDR header)")
    if tail != PNG_END:
        raise DataError(f"{path}: cannot decode {kind} (truncated PNG: it does not end with its IEND chunk)")
    width, height = struct.unpack(">II", head[16:24])
    return width, height, head[24], head[25]


def check_pair_header(image: Path, label: Path) -> None:
    """What the decoder would refuse in a pair, from the PNG headers alone: not a PNG, truncated, 16-bit
    pixels, a label of several channels, image and label of different sizes (the same lines as read_pair)."""
    image_w, image_h, image_depth, _ = png_header(image, "image")
    label_w, label_h, label_depth, label_colour = png_header(label, "label")
    if image_depth > 8:
        raise DataError(f"{image}: image has {image_depth}-bit pixels; expected 8-bit")
    if CHANNELS.get(label_colour, 0) != 1:
        raise DataError(f"{label}: label has {CHANNELS.get(label_colour, '?')} channels; expected one channel of "
                        "label ids (use *_gtFine_labelIds.png, not *_gtFine_color.png)")
    if label_depth > 8:
        raise DataError(f"{label}: label has {label_depth}-bit values; expected 8-bit label ids")
    if (image_w, image_h) != (label_w, label_h):
        raise DataError(f"{label}: label is {label_w}x{label_h} but its image {image.name} is {image_w}x{image_h}")


def header_errors(pairs) -> list[str]:
    """Every pair's header problem, in file order (empty when all are fine): ~1 s for 7,000 files."""
    errors = []
    for image, label in pairs:
        try:
            check_pair_header(image, label)
        except DataError as err:
            errors.append(str(err))
    return errors
