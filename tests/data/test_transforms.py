"""mmsegmentation's crop and pad on the CPU path (cat_max_ratio, padding after normalization at the bottom / right)
and the per-encoder normalization recorded for evaluate / predict / the API."""
import numpy as np
import pytest
import torch

from cityseg.config.load import load_config
from cityseg.config.schema import IMAGENET_MEAN, IMAGENET_STD, DataConfig, ModelConfig
from cityseg.data.cityscapes import collate
from cityseg.data.loaders import train_dataset
from cityseg.data.normalization import encoder_normalization, resolve_normalization
from cityseg.data.transforms import CatMaxRatioCrop, eval_transform, train_transform


def share_of_top_class(mask: np.ndarray) -> float:
    labels, counts = np.unique(mask, return_counts=True)
    counts = counts[labels != 255]
    return 1.0 if len(counts) < 2 else counts.max() / counts.sum()


def test_crop_is_redrawn_while_one_class_dominates():
    """Class 1 in a 32-pixel stripe of a 64x128 label: most 32x32 windows hold 75 % or more of one class."""
    mask = np.zeros((64, 128), np.uint8)
    mask[:, 40:72] = 1
    image = np.zeros((64, 128, 3), np.uint8)
    shares = {}
    for ratio in (1.0, 0.75):
        crop = CatMaxRatioCrop(32, 32, cat_max_ratio=ratio)
        shares[ratio] = []
        for seed in range(100):
            crop.set_random_seed(seed)
            out = crop(image=image, mask=mask)["mask"]
            assert out.shape == (32, 32)
            shares[ratio].append(share_of_top_class(out))
    assert np.mean(np.array(shares[1.0]) < 0.75) < 0.5  # plain random crops: about a quarter qualify
    assert np.mean(np.array(shares[0.75]) < 0.75) > 0.95  # up to 10 redraws find one that does


def test_pad_after_normalization_at_bottom_right_with_ignore():
    """A 24x40 image cropped to 32x64 (mmseg: crop = min(crop, image), pad later): the image at the top left, the
    rest 0 after normalization (not black normalized) and 255 in the label."""
    cfg = DataConfig(image_size=[24, 40], crop_size=[32, 64], hflip=True, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    transform = train_transform(cfg)
    for seed in range(4):  # flipped or not, the padding stays at the bottom / right
        transform.set_random_seed(seed)
        out = transform(image=np.full((24, 40, 3), 255, np.uint8), mask=np.full((24, 40), 3, np.uint8))
        image, mask = out["image"], out["mask"]
        assert image.shape == (3, 32, 64) and mask.shape == (32, 64)
        assert torch.all(image[:, :24, :40] == 1.0) and torch.all(mask[:24, :40] == 3)  # (1 - 0.5) / 0.5
        assert torch.all(image[:, 24:] == 0) and torch.all(image[:, :, 40:] == 0)
        assert torch.all(mask[24:] == 255) and torch.all(mask[:, 40:] == 255)


def test_crop_size_null_with_a_random_scale_stacks_into_a_batch(synth_root):
    """data.crop_size null: a random scale would give every sample its own size (no batch could be stacked, and
    most models need multiples of 32): the samples are cropped / padded back to data.image_size, as the device
    augmentation does, and a scale of 1 leaves the pipeline as it was (no crop)."""
    cfg = DataConfig(root=str(synth_root), image_size=[64, 128], scale_range=[0.5, 2.0], crop_size=None,
                     num_workers=0)
    dataset = train_dataset(cfg, seed=0)
    images, masks, _ = collate([dataset[index] for index in range(8)])
    assert images.shape == (8, 3, 64, 128) and masks.shape == (8, 64, 128)
    assert not any(isinstance(step, CatMaxRatioCrop) for step in train_transform(DataConfig(crop_size=None)))


def test_normalization_comes_from_the_encoders_pretrained_config():
    assert encoder_normalization(ModelConfig(encoder="tu-tf_mobilenetv3_small_minimal_100"))[:2] == (
        [0.5] * 3, [0.5] * 3)  # timm's pretrained_cfg of the tf_ weights (Inception normalization)
    assert encoder_normalization(ModelConfig(encoder="tu-resnet50c"))[:2] == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert encoder_normalization(ModelConfig(encoder="mit_b0"))[:2] == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    cfg = load_config("configs/unet_mobilenetv3_512x1024_320k.yaml")
    assert cfg.data.mean is None and resolve_normalization(cfg.data, cfg.model) is not None
    assert cfg.data.mean == [0.5] * 3 and cfg.data.std == [0.5] * 3
    own = load_config(None, ["data.mean=[0.4,0.4,0.4]", "data.std=[0.2,0.2,0.2]"])
    assert resolve_normalization(own.data, own.model) is None and own.data.mean == [0.4] * 3  # set by hand: kept
    image = np.full((8, 8, 3), 255, np.uint8)
    assert torch.allclose(eval_transform(cfg.data)(image=image)["image"], torch.ones(3, 8, 8))


def test_a_recorded_config_without_normalization_is_an_older_runs_imagenet(tmp_path):
    """Runs before data.mean existed trained with ImageNet's: evaluate / predict / the API read them so, whatever
    the encoder; their retired train.reference_world_size is dropped, not an error."""
    text = load_config("configs/unet_mobilenetv3_512x1024_320k.yaml")
    path = tmp_path / "config.yaml"
    from cityseg.config.load import dump_config

    old = dump_config(text).replace("  mean: null\n", "").replace("  std: null\n", "")
    old = old.replace("  reference_global_batch: 16\n", "  reference_world_size: 4\n")
    path.write_text(old)
    cfg = load_config(path, recorded=True)
    assert cfg.data.mean == list(IMAGENET_MEAN) and cfg.data.std == list(IMAGENET_STD)
    with pytest.raises(ValueError, match="train.reference_world_size' was replaced by train.reference_global_batch"):
        load_config(path)
