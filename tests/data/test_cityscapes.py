"""Pair discovery, decoding errors and transforms on a real synthetic tree in the Cityscapes layout."""
import shutil

import numpy as np
import pytest
import torch

from cityseg.config.load import load_config
from cityseg.data.cityscapes import DataError, find_pairs, read_pair
from cityseg.data.loaders import eval_dataset, train_collate, train_dataset
from cityseg.labels import IGNORE_INDEX, label_lut
from cityseg.train.step import device_batch
from tests.helpers.files import copy_tree


def test_pairs_are_found_sorted_and_matched(synth_root):
    pairs = find_pairs(synth_root, "train")
    assert len(pairs) == 16 and pairs == sorted(pairs)
    for image, label in pairs:
        assert image.name.endswith("_leftImg8bit.png") and label.name.endswith("_gtFine_labelIds.png")
        assert image.name[: -len("_leftImg8bit.png")] == label.name[: -len("_gtFine_labelIds.png")]
        assert image.parent.name == label.parent.name  # same city
    assert len(find_pairs(synth_root, "val")) == 7


@pytest.mark.parametrize("breakage, message", [
    ("no_root", "directory not found; expected the Cityscapes layout"),
    ("no_gtfine", "gtFine: missing; data.root must hold the Cityscapes layout"),
    ("no_split", "split 'train' not found"),
    ("empty_split", "no images in split 'train'"),
    ("missing_label", "_gtFine_labelIds.png is missing"),
])
def test_layout_errors_name_the_path(synth_root, tmp_path, breakage, message):
    root = copy_tree(synth_root, tmp_path)
    if breakage == "no_root":
        root = tmp_path / "nowhere"
    elif breakage == "no_gtfine":
        shutil.rmtree(root / "gtFine")
    elif breakage == "no_split":
        shutil.rmtree(root / "leftImg8bit" / "train")
    elif breakage == "empty_split":
        for image in (root / "leftImg8bit" / "train").rglob("*.png"):
            image.unlink()
    elif breakage == "missing_label":
        next((root / "gtFine" / "train").rglob("*_labelIds.png")).unlink()
    with pytest.raises(DataError) as err:
        find_pairs(root, "train")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_label_ids_go_through_one_lookup_table(synth_root):
    import cv2

    image_path, label_path = find_pairs(synth_root, "val")[0]
    raw = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    image, label = read_pair(image_path, label_path, label_lut("trainid19"))
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(label, label_lut("trainid19")[raw])
    assert (label[raw == 0] == IGNORE_INDEX).all() and (label[raw == 7] == 0).all()


def plain_resize_normalize(image_path, label_path, height: int, width: int):
    """The evaluation sample computed without albumentations: cv2 resize, then ImageNet normalization."""
    import cv2

    rgb = cv2.cvtColor(cv2.imread(str(image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float64) / 255.0
    normalized = (resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    raw = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    mask = label_lut("trainid19")[cv2.resize(raw, (width, height), interpolation=cv2.INTER_NEAREST)]
    return torch.from_numpy(normalized.transpose(2, 0, 1)).float(), torch.from_numpy(mask)


def test_eval_sample_is_a_plain_resize_and_normalize_whatever_the_seed_and_epoch(synth_root):
    """Validation must not be augmented: the same tensors for any seed and epoch, those of resize + normalize."""
    configs = [load_config("configs/demo.yaml", [f"data.root={synth_root}", "data.image_size=[32,64]", f"seed={seed}"])
               for seed in (0, 1, 2)]
    datasets = [eval_dataset(cfg.data, cfg.seed) for cfg in configs]
    for index in range(len(datasets[0])):
        expected_image, expected_mask = plain_resize_normalize(*datasets[0].pairs[index], 32, 64)
        for dataset in datasets:
            for epoch in (0, 1, 5):
                dataset.set_epoch(epoch)
                image, mask, _ = dataset[index]
                assert image.shape == (3, 32, 64) and image.dtype == torch.float32
                assert torch.allclose(image, expected_image, atol=1e-4), (index, dataset.seed, epoch)
                assert torch.equal(mask.long(), expected_mask.long()), (index, dataset.seed, epoch)
    full_cfg = load_config("configs/demo.yaml", [f"data.root={synth_root}"])
    full = eval_dataset(full_cfg.data, full_cfg.seed, full_resolution=True)
    image, mask, _ = full[3]
    expected_image, expected_mask = plain_resize_normalize(*full.pairs[3], 64, 128)  # the labels' own size
    assert torch.allclose(image, expected_image, atol=1e-4) and torch.equal(mask.long(), expected_mask.long())


def test_train_flip_moves_image_and_mask_together(synth_root):
    cfg = load_config("configs/demo.yaml", [f"data.root={synth_root}", "data.image_size=[64,128]"])
    plain = eval_dataset(cfg.data, cfg.seed, split="train")
    augmented = train_dataset(cfg.data, cfg.seed)
    flipped_any = kept_any = False
    for epoch in range(6):
        augmented.set_epoch(epoch)
        image, mask, _ = augmented[0]
        ref_image, ref_mask, _ = plain[0]
        if torch.equal(mask, ref_mask):
            kept_any = True
            assert torch.allclose(image, ref_image, atol=1e-5)
        else:
            flipped_any = True
            assert torch.equal(mask, ref_mask.flip(-1))
            assert torch.allclose(image, ref_image.flip(-1), atol=1e-5)
    assert flipped_any and kept_any
    augmented.set_epoch(2)
    assert torch.equal(augmented[5][1], augmented[5][1])  # same (seed, epoch, index): same augmentation


def test_channels_last_batches_are_stacked_in_the_worker_and_the_step_copies_nothing(synth_root):
    """train.channels_last: the loader's batch is already in channels_last memory with the same values as the
    plain collate's, so device_batch hands the very same tensor to the step (no per-batch layout copy)."""
    cfg = load_config("configs/demo.yaml", [f"data.root={synth_root}", "train.channels_last=true"])
    dataset = train_dataset(cfg.data, cfg.seed, None)
    samples = [dataset[index] for index in range(3)]
    plain, _, _ = train_collate(cfg.data, cfg.seed, dataset)(samples)
    images, masks, _ = train_collate(cfg.data, cfg.seed, dataset, channels_last=True)(samples)
    assert images.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(images, plain)
    moved, _ = device_batch(images, masks, None, cfg.data, channels_last=True)
    assert moved.data_ptr() == images.data_ptr()
