"""Every bad input of a run, on real broken files: one line naming the file or key, a non-zero exit, nothing lost.

(Config file errors — YAML syntax, unknown key, type, range — are in tests/config/test_config.py.)
"""
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cityseg.checkpoint import CheckpointError, load_weights
from cityseg.cli import main as cityseg_main
from cityseg.config.load import load_config
from cityseg.data.cityscapes import DataError, find_pairs, read_image, read_pair
from cityseg.labels import label_lut
from cityseg.model.build import ModelError, build_model
from tests.helpers.files import copy_tree
from tests.helpers.process import child_env, cityseg
from tests.helpers.runs import read_jsonl, tiny_overrides


def one_error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# --- damage done to real PNG files of a Cityscapes-layout tree --------------------------------------------------

def corrupt(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def resize_label(path: Path) -> None:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), label[: label.shape[0] // 2])


def unknown_ids(path: Path) -> None:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    label[:4, :4] = 200  # Cityscapes ids stop at 33 (and -1 stored as 255 for license plates)
    cv2.imwrite(str(path), label)


def rgb_label(path: Path) -> None:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), np.dstack([label, label, label]))


@pytest.mark.parametrize("damage, target, message", [
    (corrupt, "image", "cannot decode image (corrupt, truncated or not an image)"),
    (truncate, "image", "cannot decode image (corrupt, truncated or not an image)"),
    (corrupt, "label", "cannot decode label (corrupt, truncated or not an image)"),
    (truncate, "label", "cannot decode label (corrupt, truncated or not an image)"),
    (resize_label, "label", "label is 128x32 but its image"),
    (unknown_ids, "label", "label ids [200] are not in the Cityscapes table"),
    (rgb_label, "label", "label has 3 channels; expected one channel of label ids"),
])
def test_a_broken_file_is_named_with_what_is_wrong(synth_root, tmp_path, damage, target, message):
    root = copy_tree(synth_root, tmp_path)
    image, label = find_pairs(root, "train")[3]
    broken = image if target == "image" else label
    damage(broken)
    with pytest.raises(DataError) as err:
        read_pair(image, label, label_lut("trainid19"))
    assert str(err.value).startswith(f"{broken}: ") and message in str(err.value), err.value
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("convert, note", [(lambda bgr: cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), "grayscale image"),
                                           (lambda bgr: np.dstack([bgr, np.full_like(bgr[..., 0], 255)]), "RGBA image")])
def test_grayscale_and_rgba_images_are_converted_with_a_note(synth_root, tmp_path, capsys, convert, note):
    root = copy_tree(synth_root, tmp_path)
    image_path, _ = find_pairs(root, "train")[0]
    bgr = cv2.imread(str(image_path))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    cv2.imwrite(str(image_path), convert(bgr))
    image = read_image(image_path)
    assert image.shape == rgb.shape and image.dtype == np.uint8
    if note == "RGBA image":  # opaque alpha dropped: the colours are the original ones
        np.testing.assert_array_equal(image, rgb)
    assert f"note: {image_path}: {note}" in capsys.readouterr().err


# --- through the command line: one line, non-zero exit, no traceback ---------------------------------------------

@pytest.mark.slow
def test_a_bad_sample_mid_training_stops_with_one_line_and_no_traceback(synth_root, tmp_path):
    """A fault only decoding finds (a not-PNG or truncated file is named at start: tests/train/test_start_checks.py)."""
    root = copy_tree(synth_root, tmp_path)
    _, label = find_pairs(root, "train")[5]
    unknown_ids(label)
    result = cityseg("train", "--config", "configs/demo.yaml", *tiny_overrides(root, tmp_path / "run"))
    assert result.returncode == 1
    assert one_error_line(result.stderr) == f"error: {label}: label ids [200] are not in the Cityscapes table"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_on_bad_sample_skip_trains_on_and_lists_every_bad_file_at_the_end(synth_root, tmp_path):
    root = copy_tree(synth_root, tmp_path)
    pairs = find_pairs(root, "train")
    corrupt(pairs[1][0])
    truncate(pairs[6][1])
    unknown_ids(pairs[11][1])
    out = tmp_path / "run"
    result = cityseg("train", "--config", "configs/demo.yaml",
                     *tiny_overrides(root, out, data__on_bad_sample="skip", train__epochs=2, model__sync_bn="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("done:"):]
    assert "3 bad sample(s) skipped" in summary and str(out / "skipped_samples.txt") in summary
    for bad in (pairs[1][0], pairs[6][1], pairs[11][1]):
        assert summary.count(str(bad)) == 1, summary  # each once, though met in both epochs
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    assert "warning: model.sync_bn needs more than one CUDA device" in result.stderr


@pytest.mark.parametrize("breakage, message", [
    ("no_root", "directory not found; expected the Cityscapes layout <root>/leftImg8bit/<split>/<city>/"),
    ("not_cityscapes", "leftImg8bit: missing; data.root must hold the Cityscapes layout"),
    ("empty_split", "no images in split 'train'"),
    ("missing_label", "_gtFine_labelIds.png is missing"),
])
def test_layout_errors_stop_before_anything_is_written(synth_root, tmp_path, capsys, breakage, message):
    root = copy_tree(synth_root, tmp_path)
    if breakage == "no_root":
        root = tmp_path / "nowhere"
    elif breakage == "not_cityscapes":
        shutil.rmtree(root / "leftImg8bit")
    elif breakage == "empty_split":
        for image in (root / "leftImg8bit" / "train").rglob("*.png"):
            image.unlink()
    elif breakage == "missing_label":
        next((root / "gtFine" / "train").rglob("*_labelIds.png")).unlink()
    out = tmp_path / "previous_run"
    out.mkdir()
    (out / "config.yaml").write_text("the previous run's config\n")
    code = cityseg_main(["train", "--config", "configs/demo.yaml", *tiny_overrides(root, out)])
    assert code == 1
    assert message in one_error_line(capsys.readouterr().err)
    assert (out / "config.yaml").read_text() == "the previous run's config\n"  # nothing overwritten


@pytest.mark.parametrize("override, message", [
    ("train.mixed_precision=fp16", "error: train.mixed_precision: fp16 needs a CUDA GPU"),
    ("data.batch_size=17", "error: data.batch_size: 17 is larger than each process's share of the training set "
                           "(16 samples / 1 processes = 16)"),
])
def test_invalid_combinations_exit_2(synth_root, tmp_path, capsys, override, message):
    code = cityseg_main(["train", "--config", "configs/demo.yaml", *tiny_overrides(synth_root, tmp_path / "run"),
                         override])
    assert code == 2
    assert one_error_line(capsys.readouterr().err).startswith(message)
    assert not (tmp_path / "run").exists()


def test_output_dir_not_writable_exits_2(synth_root, tmp_path, capsys):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("not a directory\n")
    code = cityseg_main(["train", "--config", "configs/demo.yaml",
                         *tiny_overrides(synth_root, in_the_way / "run")])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: output_dir {in_the_way / 'run'}: not writable: {in_the_way} is not a directory", line


# --- checkpoints and weights -------------------------------------------------------------------------------------

def test_weights_of_another_class_count_name_the_mismatched_tensor(tmp_path):
    cfg = load_config("configs/demo.yaml")
    saved = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(cfg.model, 20).state_dict().items()}, str(saved))
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model(cfg.model, 19), saved)
    assert re.fullmatch(rf"{re.escape(str(saved))}: segmentation_head\.0\.(weight|bias) has shape \(20,.*\) but the "
                        r"model \(model\.\* and data\.label_scheme of the config\) expects \(19,.*\)", str(err.value)), err.value


def test_weights_of_another_architecture_are_refused(tmp_path):
    cfg = load_config("configs/demo.yaml")
    saved = tmp_path / "model.safetensors"
    save_file({"encoder.conv.weight": torch.zeros(3, 3)}, str(saved))
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model(cfg.model, 19), saved)
    assert "does not match model Unet of the config" in str(err.value)


def test_missing_and_partial_checkpoints_are_named(tmp_path):
    cfg = load_config("configs/demo.yaml")
    model = build_model(cfg.model, 19)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_weights(model, tmp_path / "nothing_here")
    partial = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial))
    truncate(partial)
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_weights(model, partial)


@pytest.mark.slow
def test_encoder_weights_missing_offline_say_how_to_get_them(synth_root, tmp_path):
    result = cityseg("check", "--config", "configs/demo.yaml", *tiny_overrides(synth_root, tmp_path / "run"),
                     "model.encoder_weights=imagenet", timeout=300,
                     env=child_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home")))
    assert result.returncode == 1
    weights_line = next(line for line in result.stdout.splitlines() if line.startswith("✗ "))
    assert weights_line.startswith("✗ pretrained weights: model.encoder_weights: timm/tf_mobilenetv3_small_minimal_"
                                   "100.in1k/model.safetensors is not in the Hugging Face cache "), weights_line
    assert "offline (HF_HUB_OFFLINE is set): on a login node run `cityseg weights fetch" in weights_line
    missing_file = build_model_error(load_config("configs/demo.yaml", ["model.encoder_weights=/no/such.safetensors"]))
    assert missing_file == "model.encoder_weights: file /no/such.safetensors not found"


def build_model_error(cfg) -> str:
    with pytest.raises(ModelError) as err:
        build_model(cfg.model, 19)
    return str(err.value)
