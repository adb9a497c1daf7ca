"""What training checks before its first step: the PNG header of every file (named in one line before the model is
built, ~1 s for 7,000 files), samples the model can divide, a crop larger than the image said in one line."""
import time

import cv2
import numpy as np
import pytest

from cityseg.cli import main as cityseg_main
from cityseg.config.schema import DataConfig
from cityseg.data.cityscapes import DataError, find_pairs
from cityseg.data.layout import IMAGE_SUFFIX, LABEL_SUFFIX
from cityseg.train.preflight import check_data_files
from tests.helpers.files import copy_tree
from tests.helpers.runs import tiny_overrides


def train(*args) -> int:
    return cityseg_main(["train", "--config", "configs/demo.yaml", *map(str, args)])


def test_a_truncated_file_is_named_before_anything_is_built(synth_root, tmp_path, capsys):
    root = copy_tree(synth_root, tmp_path)
    image = find_pairs(root, "train")[9][0]
    image.write_bytes(image.read_bytes()[:-40])  # a partial copy: header intact, the end missing
    out = tmp_path / "run"
    assert train(*tiny_overrides(root, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: {image}: cannot decode image (truncated PNG: it does not end with its IEND "
                    "chunk)")], err
    assert not out.exists()  # stopped before output_dir was made, so before the model was built


def test_with_on_bad_sample_skip_a_bad_training_file_is_a_warning(synth_root, tmp_path):
    root = copy_tree(synth_root, tmp_path)
    label = find_pairs(root, "train")[3][1]
    label.write_bytes(b"not a png")
    warnings = []
    check_data_files(DataConfig(root=str(root), on_bad_sample="skip"), warnings.append)
    assert warnings == [(f"warning: 1 bad pair(s) in split train will be skipped (data.on_bad_sample=skip); first: "
                         f"{label}: cannot decode label (not a PNG file: no PNG signature and IHDR header)")]
    with pytest.raises(DataError, match="not a PNG file"):
        check_data_files(DataConfig(root=str(root)), warnings.append)


def test_headers_of_3000_files_are_read_within_2_seconds(tmp_path):
    """1,500 pairs = 3,000 files (Cityscapes train + val is 6,950): the pairs found and every header read."""
    _, png = cv2.imencode(".png", np.zeros((4, 8), np.uint8))
    for split, count in (("train", 1400), ("val", 100)):
        for city in range(5):
            images, labels = tmp_path / "leftImg8bit" / split / f"c{city}", tmp_path / "gtFine" / split / f"c{city}"
            images.mkdir(parents=True)
            labels.mkdir(parents=True)
            for index in range(count // 5):
                (images / f"c{city}_{index:06d}{IMAGE_SUFFIX}").write_bytes(png.tobytes())
                (labels / f"c{city}_{index:06d}{LABEL_SUFFIX}").write_bytes(png.tobytes())
    start = time.perf_counter()
    check_data_files(DataConfig(root=str(tmp_path)), warn=print)
    seconds = time.perf_counter() - start
    print(f"{seconds:.2f} s for 3,000 files")
    assert seconds <= 2.0, f"{seconds:.2f} s for 3,000 files"


def test_samples_the_model_cannot_divide_are_refused_in_one_line(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = train(*tiny_overrides(synth_root, out), "model.arch=Segformer", "model.encoder=mit_b0",
                 "data.image_size=[72,136]")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("error: data.image_size: training samples of 72x136 are not divisible by 32, which Segformer / "
                    "mit_b0 needs (its encoder downsamples 32x); e.g. data.image_size=[64,128]")], err


def test_a_crop_larger_than_the_image_is_said_at_start(synth_root, tmp_path, capsys):
    """Said before anything is built: here the run is then refused (batch share), so no step is paid for."""
    code = train(*tiny_overrides(synth_root, tmp_path / "run"), "data.crop_size=[96,160]",
                 "data.scale_range=[0.5,2.0]", "data.batch_size=17")
    assert code == 2
    assert capsys.readouterr().out.splitlines() == [
        ("note: data.crop_size 96x160 is larger than data.image_size 64x128: every sample is padded to 96x160, 1.9x "
         "its pixels at scale 1 (data.scale_range [0.5, 2.0]), and the network computes on the padding; a crop of "
         "at most data.image_size avoids it")]
