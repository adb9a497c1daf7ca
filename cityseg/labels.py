"""Cityscapes label schemes: lookup tables id→train id, class names, palettes — all from torchvision's table."""
from __future__ import annotations

import numpy as np
from torchvision.datasets import Cityscapes

IGNORE_INDEX = 255
SCHEMES = ("trainid19", "seed20")
CLASSES = Cityscapes.classes  # official table: name, id, train_id, category, ..., ignore_in_eval, color
EVAL_CLASSES = [c for c in CLASSES if not c.ignore_in_eval]  # the 19, in train-id order
CATEGORIES = sorted({(c.category_id, c.category) for c in EVAL_CLASSES})  # (category_id, name), 7 of them
INSTANCE_CLASS_NAMES = [c.name for c in EVAL_CLASSES if c.has_instances]  # the 8 of the iIoU protocol


def _stored_id(class_id: int) -> int:
    # labelIds PNGs are uint8: the license plate's id -1 is stored as 255.
    return class_id % 256


def num_classes(scheme: str) -> int:
    return len(class_names(scheme))


def class_names(scheme: str) -> list[str]:
    check_scheme(scheme)
    names = [c.name for c in EVAL_CLASSES]
    return names if scheme == "trainid19" else ["unlabelled", *names]


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"data.label_scheme: unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def label_lut(scheme: str) -> np.ndarray:
    """256-entry uint8 table: Cityscapes label id (as stored in *_labelIds.png) → training index.

    trainid19: the 19 evaluation classes → 0..18, everything else → 255 (ignored in loss and metrics).
    seed20: the blog recipe's scheme, void → 0 ('unlabelled'), the 19 classes → 1..19; nothing is ignored.
    Ids not in the table map to 255 under both schemes (data.check reports them as bad labels).
    """
    check_scheme(scheme)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for c in CLASSES:
        if scheme == "trainid19":
            lut[_stored_id(c.id)] = IGNORE_INDEX if c.ignore_in_eval else c.train_id
        else:
            lut[_stored_id(c.id)] = 0 if c.ignore_in_eval else c.train_id + 1
    return lut


def known_label_ids() -> np.ndarray:
    """Boolean table over 0..255: which stored values are ids of the official table."""
    known = np.zeros(256, dtype=bool)
    known[[_stored_id(c.id) for c in CLASSES]] = True
    return known


def palette(scheme: str) -> np.ndarray:
    """(256, 3) uint8 colours indexed by training index; ignore (255) is black. Colourizing = palette[mask]."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    offset = 0 if scheme == "trainid19" else 1
    check_scheme(scheme)
    for c in EVAL_CLASSES:
        colours[c.train_id + offset] = c.color
    return colours


def colorize(mask: np.ndarray, scheme: str = "trainid19") -> np.ndarray:
    """(H, W) training indices → (H, W, 3) uint8 RGB in the official colours: one table lookup."""
    return palette(scheme)[mask]


def to_label_ids_lut(scheme: str) -> np.ndarray:
    """256-entry uint8 table: training index → official Cityscapes label id (what the benchmark server takes).

    Ignored / unlabelled indices map to 0 ('unlabeled'), which the official evaluator counts as void.
    """
    check_scheme(scheme)
    offset = 0 if scheme == "trainid19" else 1
    lut = np.zeros(256, dtype=np.uint8)
    for c in EVAL_CLASSES:
        lut[c.train_id + offset] = c.id
    return lut


def category_lut(scheme: str) -> np.ndarray:
    """Training index → index into CATEGORIES (255 where not an evaluation class)."""
    offset = 0 if scheme == "trainid19" else 1
    category_index = {cid: i for i, (cid, _) in enumerate(CATEGORIES)}
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for c in EVAL_CLASSES:
        lut[c.train_id + offset] = category_index[c.category_id]
    return lut
