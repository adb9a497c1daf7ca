"""The decode-once cache: same samples as the PNG path, stale or foreign caches refused, memmap sharing, batch augment."""
import dataclasses
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from cityseg.config.load import load_config
from cityseg.data.cache import CachedPairs, prepare
from cityseg.data.cityscapes import DataError, collate
from cityseg.data.device_augment import augment_batch
from cityseg.data.loaders import eval_dataset, train_dataset
from tests.helpers.process import PYTHON, cityseg, launch_cmd, run
from tests.helpers.runs import read_jsonl, tiny_overrides


def config(root, cache_dir=None, *extra):
    overrides = [f"data.root={root}", "data.image_size=[32,64]", *extra]
    if cache_dir is not None:
        overrides.append(f"data.cache.dir={cache_dir}")
    return load_config("configs/demo.yaml", overrides)


def train_set(cfg):
    """The training dataset as train.py builds it from cfg."""
    return train_dataset(cfg.data, cfg.seed)


def eval_set(cfg, split=None):
    """The evaluation dataset as train.py builds it from cfg (split None: data.val_split)."""
    return eval_dataset(cfg.data, cfg.seed, split)


@pytest.fixture(scope="module")
def cli_cache(synth_root, tmp_path_factory):
    """A cache of train and val at the training size, written by the real `cityseg prepare` command."""
    cache_dir = tmp_path_factory.mktemp("cache")
    result = cityseg("prepare", "--config", "configs/demo.yaml", f"data.root={synth_root}", "data.image_size=[32,64]",
                     f"data.cache.dir={cache_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout and (cache_dir / "train" / "manifest.json").is_file()
    assert (cache_dir / "val" / "manifest.json").is_file()
    return cache_dir


@pytest.mark.slow
def test_cached_equals_uncached_at_the_training_size(synth_root, cli_cache):
    plain, cached = train_set(config(synth_root)), train_set(config(synth_root, cli_cache))
    assert isinstance(cached, CachedPairs) and len(cached) == len(plain) == 16
    for epoch in (0, 3):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in range(len(plain)):
            image, mask, i = plain[index]
            cached_image, cached_mask, j = cached[index]
            assert i == j == index
            assert torch.equal(mask, cached_mask)  # same label ids and the same flip
            assert torch.equal(image, cached_image)  # stored at the training size: the same resize, bit for bit
    val_plain, val_cached = eval_set(config(synth_root)), eval_set(config(synth_root, cli_cache))
    assert isinstance(val_cached, CachedPairs)
    assert all(torch.equal(val_plain[k][0], val_cached[k][0]) for k in range(len(val_plain)))


def test_cache_stored_larger_than_training_size_differs_only_by_interpolation(tmp_path):
    from cityseg.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "cs", n_train=6, n_val=0, height=128, width=256)
    augment = ["data.scale_range=[0.75,1.25]", "data.crop_size=[24,48]"]
    cfg = config(tmp_path / "cs", tmp_path / "c", "data.cache.size=[64,128]", *augment)
    prepare(cfg.data, ["train"], workers=2)
    plain, cached = train_set(config(tmp_path / "cs", None, *augment)), train_set(cfg)
    for index in range(len(plain)):
        image, mask, _ = plain[index]
        cached_image, cached_mask, _ = cached[index]
        # same random scale, crop and flip; labels resize nearest by 4 in one step or by 2 twice: the same pixels
        assert torch.equal(mask, cached_mask)
        # bilinear once vs twice: close, not equal (normalized units, where 1 is ~58 grey levels)
        difference = (image - cached_image).abs().mean()
        assert 0 < difference < 0.15


def test_changed_source_file_makes_the_cache_stale(synth_root, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(synth_root, root)
    cfg = config(root, tmp_path / "cache")
    prepare(cfg.data, ["train"], workers=1)
    assert len(train_set(cfg)) == 16
    image = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[3]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # re-saved (same size, new mtime)
    with pytest.raises(DataError, match=f"stale cache: {image} changed since it was cached") as err:
        train_set(cfg)
    assert "cityseg prepare" in str(err.value) and "\n" not in str(err.value)
    prepare(cfg.data, ["train"], workers=1)  # rebuilding makes it current again
    assert len(train_set(cfg)) == 16
    label = sorted((root / "gtFine" / "train").rglob("*_labelIds.png"))[0]
    label.unlink()
    image_of_label = root / "leftImg8bit" / "train" / label.parent.name / label.name.replace(
        "_gtFine_labelIds.png", "_leftImg8bit.png")
    image_of_label.unlink()
    with pytest.raises(DataError, match="is gone from data.root"):
        train_set(cfg)


def test_changed_storage_size_or_scheme_or_missing_manifest_is_refused(synth_root, tmp_path):
    cfg = config(synth_root, tmp_path / "cache")
    prepare(cfg.data, ["train"], workers=1)
    with pytest.raises(DataError, match=r"cache stores 32x64 \(HxW\) but the config asks for 64x128"):
        train_set(config(synth_root, tmp_path / "cache", "data.cache.size=[64,128]"))
    with pytest.raises(DataError, match="cache holds data.label_scheme trainid19 but the config asks for seed20"):
        train_set(config(synth_root, tmp_path / "cache", "data.label_scheme=seed20"))
    (tmp_path / "cache" / "train" / "manifest.json").unlink()  # e.g. a prepare killed half-way
    with pytest.raises(DataError, match="no cache here"):
        train_set(cfg)


def test_prepare_interrupted_half_way_leaves_a_cache_that_is_refused(synth_root, tmp_path):
    """A prepare that dies after writing some samples (here: the 9th source image is unreadable) leaves shards but
    no manifest, so training refuses the half cache in one line instead of training on its unwritten zeros."""
    root = tmp_path / "cs"
    shutil.copytree(synth_root, root)
    broken = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[8]
    broken.write_bytes(b"not a png")
    cfg = config(root, tmp_path / "cache")
    with pytest.raises(DataError, match=str(broken)):
        prepare(cfg.data, ["train"], workers=1)
    split_dir = tmp_path / "cache" / "train"
    first_shard = np.load(split_dir / "images_000.npy", mmap_mode="r")
    assert first_shard[0].any() and not first_shard[8:].any()  # stopped half-way: samples 0-7 written, the rest not
    with pytest.raises(DataError, match="no cache here") as err:
        train_set(cfg)
    assert "\n" not in str(err.value) and "cityseg prepare" in str(err.value)


@pytest.mark.slow
def test_dataset_sent_to_workers_holds_paths_not_data(synth_root, cli_cache):
    cached = train_set(config(synth_root, cli_cache))
    cached[0]
    assert all(isinstance(images, np.memmap) for images, _ in cached.shards)  # pages, not copies
    # what each worker receives: the transform plus paths and offsets, nothing that grows with the data (128 KiB here)
    assert len(pickle.dumps(cached)) - len(pickle.dumps(cached.transform)) < 2_000
    loader = torch.utils.data.DataLoader(cached, batch_size=4, num_workers=2, collate_fn=collate)
    assert sum(len(batch[0]) for batch in loader) == 16


@pytest.mark.slow
def test_batch_augment_flips_normalizes_and_pads_like_the_cpu_path(synth_root, cli_cache):
    cfg = config(synth_root, cli_cache, "data.cache.device_augment=true")
    raw = train_set(cfg)
    reference = eval_set(config(synth_root, cli_cache), split="train")  # resize + normalize, no flip
    images, masks, indices = collate([raw[i] for i in range(16)])
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 64)
    out_images, out_masks = augment_batch(images, masks, indices, cfg.data, cfg.seed, epoch=0)
    flipped = 0
    for k in range(16):
        ref_image, ref_mask, _ = reference[k]
        is_flipped = not torch.equal(out_masks[k], ref_mask.long())
        flipped += is_flipped
        if is_flipped:
            ref_image, ref_mask = ref_image.flip(-1), ref_mask.flip(-1)
        assert torch.equal(out_masks[k], ref_mask.long())
        assert torch.allclose(out_images[k], ref_image, atol=1e-3)
    assert 0 < flipped < 16
    again = augment_batch(images, masks, indices, cfg.data, cfg.seed, epoch=0)
    assert torch.equal(again[1], out_masks)  # a pure function of (seed, epoch, index)
    small = config(synth_root, cli_cache, "data.scale_range=[0.5,0.5]", "data.crop_size=[24,48]")
    padded_images, padded_masks = augment_batch(images, masks, indices, small.data, 0, 0)
    assert padded_masks.shape == (16, 24, 48)
    # 16x32 at the top left of 24x48, padded at the bottom / right after normalization (0) as mmsegmentation,
    # flipped or not; the CPU path pads the same
    pad = torch.zeros(24, 48, dtype=torch.bool)
    pad[16:], pad[:, 32:] = True, True
    assert (padded_masks[:, pad] == 255).all() and (padded_masks[:, ~pad] != 255).any(-1).all()
    assert (padded_images[:, :, pad] == 0).all() and (padded_images[:, :, ~pad] != 0).any(-1).all()
    cpu = train_set(dataclasses.replace(small, data=dataclasses.replace(small.data, hflip=True)))
    cpu_image, cpu_mask, _ = cpu[0]
    assert (cpu_mask[pad] == 255).all() and (cpu_image[:, pad] == 0).all() and (cpu_mask[~pad] != 255).any()


@pytest.mark.slow
def test_training_from_the_cache_with_device_augment(synth_root, cli_cache, tmp_path):
    out = tmp_path / "run"
    result = run([PYTHON, "train.py", "--config", "configs/demo.yaml",
                  *tiny_overrides(synth_root, out, data__image_size="[32,64]", train__max_steps=3),
                  f"data.cache.dir={cli_cache}", "data.cache.device_augment=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [1, 2, 3]
    assert read_jsonl(out / "metrics.jsonl")[-1]["step"] == 3


@pytest.mark.slow
def test_two_ranks_prepare_one_cache(synth_root, tmp_path):
    """Shards of 3 samples: 6 shards for 16 images, 3 written by each rank; every sample's stored content equals
    a single-process prepare's, and no sample is written twice or by the wrong rank."""
    reference_cfg = config(synth_root, tmp_path / "single")
    prepare(reference_cfg.data, ["train"], workers=1)
    cache_dir = tmp_path / "cache"
    result = run(launch_cmd(2, "tests/data/prepare_small_shards.py", tmp_path / "written", 3, 32, 64, "--",
                            "--config", "configs/demo.yaml", f"data.root={synth_root}", "data.image_size=[32,64]",
                            f"data.cache.dir={cache_dir}", "--splits", "train"))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((cache_dir / "train" / "manifest.json").read_text())
    assert [shard["count"] for shard in manifest["shards"]] == [3, 3, 3, 3, 3, 1]
    written = {rank: json.loads((tmp_path / "written" / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    for rank, slots in written.items():  # shard i belongs to rank i % 2
        assert sorted({name for name, _ in slots}) == [f"images_{i:03d}.npy" for i in range(rank, 6, 2)], slots
    assert sum(len(slots) for slots in written.values()) == 16
    assert len({tuple(slot) for slots in written.values() for slot in slots}) == 16  # none written twice

    cached, single = train_set(config(synth_root, cache_dir)), train_set(reference_cfg)
    assert len(cached) == len(single) == 16
    for index in range(16):
        image, mask = cached.load(index)
        reference_image, reference_mask = single.load(index)
        assert image.shape == (32, 64, 3) and image.any(), index  # written, not the zeros of a fresh shard
        np.testing.assert_array_equal(image, reference_image, err_msg=str(index))
        np.testing.assert_array_equal(mask, reference_mask, err_msg=str(index))


@pytest.mark.slow
def test_bad_cache_config_is_one_line(synth_root, tmp_path):
    result = cityseg("train", "--config", "configs/demo.yaml", f"data.root={synth_root}",
                     "data.cache.device_augment=true")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "data.cache.device_augment: needs data.cache.dir" in result.stderr
