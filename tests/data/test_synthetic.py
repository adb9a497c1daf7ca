"""Tests for the synthetic Cityscapes-layout dataset writer, on real PNG files."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import Cityscapes

from cityseg.data.synthetic import write_synthetic

H, W = 64, 128
VALID_IDS = {c.id for c in Cityscapes.classes if c.id >= 0}
EVAL_IDS = {c.id for c in Cityscapes.classes if not c.ignore_in_eval}
COLOR_BY_ID = {c.id: c.color for c in Cityscapes.classes if c.id >= 0}
IMAGE_NAME = re.compile(r"^([a-z]+)_(\d{6})_(\d{6})_leftImg8bit\.png$")
GT_SUFFIXES = ("gtFine_labelIds.png", "gtFine_color.png", "gtFine_instanceIds.png", "gtFine_polygons.json")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, write_synthetic(root, n_train=6, n_val=3, n_test=2, height=H, width=W, seed=0)


def _label_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("gtFine/*/*/*_labelIds.png"))}


def test_counts_and_layout(dataset):
    root, counts = dataset
    assert counts == {"train": 6, "val": 3, "test": 2}
    for split, n_images in counts.items():
        images = sorted((root / "leftImg8bit" / split).glob("*/*"))
        assert len(images) == n_images
        assert len({p.parent.name for p in images}) > 1  # spread over several cities
        for image_path in images:
            match = IMAGE_NAME.match(image_path.name)
            assert match and match.group(1) == image_path.parent.name
            stem = image_path.name[: -len("leftImg8bit.png")]
            gt_dir = root / "gtFine" / split / image_path.parent.name
            for suffix in GT_SUFFIXES:
                assert (gt_dir / f"{stem}{suffix}").is_file()
        # Nothing else lives in the gtFine split folder.
        assert len(list((root / "gtFine" / split).glob("*/*"))) == n_images * len(GT_SUFFIXES)


def test_label_files_are_consistent(dataset):
    root, _ = dataset
    label_paths = sorted(root.glob("gtFine/*/*/*_gtFine_labelIds.png"))
    assert label_paths
    for label_path in label_paths:
        stem = label_path.name[: -len("gtFine_labelIds.png")]
        split, city = label_path.parent.parent.name, label_path.parent.name
        image = Image.open(root / "leftImg8bit" / split / city / f"{stem}leftImg8bit.png")
        assert image.mode == "RGB" and image.size == (W, H)

        label_image = Image.open(label_path)
        assert label_image.mode == "L" and label_image.size == (W, H)
        label = np.array(label_image)
        assert label.dtype == np.uint8 and set(np.unique(label).tolist()) <= VALID_IDS

        instance_image = Image.open(label_path.with_name(f"{stem}gtFine_instanceIds.png"))
        assert instance_image.mode == "I;16"
        instance = np.array(instance_image).astype(np.int64)
        decoded = np.where(instance >= 1000, instance // 1000, instance)
        np.testing.assert_array_equal(decoded, label)

        color = np.array(Image.open(label_path.with_name(f"{stem}gtFine_color.png")))[..., :3]
        expected = np.zeros((H, W, 3), np.uint8)
        for class_id in np.unique(label):
            expected[label == class_id] = COLOR_BY_ID[int(class_id)]
        np.testing.assert_array_equal(color, expected)

        polygons = json.loads(label_path.with_name(f"{stem}gtFine_polygons.json").read_text())
        assert (polygons["imgHeight"], polygons["imgWidth"]) == (H, W)
        names = {c.name for c in Cityscapes.classes}
        assert polygons["objects"] and all(o["label"] in names and len(o["polygon"]) >= 3
                                           for o in polygons["objects"])


def test_class_coverage(dataset):
    root, _ = dataset
    train_ids = set()
    for label_path in root.glob("gtFine/train/*/*_labelIds.png"):
        train_ids |= set(np.unique(np.array(Image.open(label_path))).tolist())
    assert EVAL_IDS <= train_ids
    assert train_ids - EVAL_IDS  # some void / ignored pixels exist too
    for label_path in root.glob("gtFine/val/*/*_labelIds.png"):
        assert len(set(np.unique(np.array(Image.open(label_path))).tolist()) & EVAL_IDS) >= 5


def test_determinism(dataset, tmp_path):
    root, _ = dataset
    write_synthetic(tmp_path / "same", n_train=6, n_val=3, n_test=2, height=H, width=W, seed=0)
    write_synthetic(tmp_path / "other", n_train=6, n_val=3, n_test=2, height=H, width=W, seed=1)
    reference = _label_bytes(root)
    assert _label_bytes(tmp_path / "same") == reference
    other = _label_bytes(tmp_path / "other")
    assert other.keys() == reference.keys()
    assert all(other[name] != reference[name] for name in reference)


def test_splits_differ(dataset):
    root, _ = dataset
    train = np.array(Image.open(next(root.glob("gtFine/train/aachen/aachen_000000_*_labelIds.png"))))
    val = np.array(Image.open(next(root.glob("gtFine/val/frankfurt/frankfurt_000000_*_labelIds.png"))))
    assert not np.array_equal(train, val)
