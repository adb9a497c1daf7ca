"""`cityseg predict --input`: any folder of PNG / JPEG images at any size, subfolders kept; bad input is one line."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cityseg.cli import main
from tests.helpers.process import cityseg


@pytest.mark.slow
def test_predict_on_a_folder_of_images_of_any_size(trained_run, tmp_path):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "photos"
    (inputs / "trip" / "day1").mkdir(parents=True)
    cv2.imwrite(str(inputs / "trip" / "day1" / "street.jpg"), rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    cv2.imwrite(str(inputs / "berlin_000000_000019_leftImg8bit.png"),
                rng.integers(0, 256, (100, 200, 3), dtype=np.uint8))
    cv2.imwrite(str(inputs / "gray.PNG"), rng.integers(0, 256, (33, 47), dtype=np.uint8))
    (inputs / "notes.txt").write_text("not an image")
    out = inputs / "predictions"  # inside the input folder, as after an earlier run: never taken as input
    (out / "color").mkdir(parents=True)
    cv2.imwrite(str(out / "color" / "old_pred_color.png"), np.zeros((8, 8, 3), np.uint8))
    result = cityseg("predict", "--config", trained_run / "config.yaml", "--checkpoint", trained_run,
                     "--input", inputs, "--output", out, "data.num_workers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote predictions of 3 images" in result.stdout
    expected = {"trip/day1/street": (50, 90), "berlin_000000_000019": (100, 200), "gray": (33, 47)}
    for stem, size in expected.items():
        label_ids = cv2.imread(str(out / "labelIds" / f"{stem}_pred_labelIds.png"), cv2.IMREAD_UNCHANGED)
        color = cv2.imread(str(out / "color" / f"{stem}_pred_color.png"))
        overlay = cv2.imread(str(out / "overlay" / f"{stem}_pred_overlay.jpg"))
        assert label_ids.shape == size and color.shape == overlay.shape == (*size, 3), stem
    assert len(list(out.rglob("*.*"))) == 9 + 1


@pytest.mark.slow
def test_predict_on_one_image_file(trained_run, tmp_path, capsys):
    """--input names one image: its three files go straight under the output's kind folders."""
    image = tmp_path / "photos" / "street.jpg"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    out = tmp_path / "preds"
    code = main(["predict", "--config", str(trained_run / "config.yaml"), "--checkpoint", str(trained_run),
                 "--input", str(image), "--output", str(out), "data.num_workers=0"])
    assert code == 0, capsys.readouterr().err
    assert "wrote predictions of 1 images" in capsys.readouterr().out
    assert cv2.imread(str(out / "labelIds" / "street_pred_labelIds.png"), cv2.IMREAD_UNCHANGED).shape == (40, 70)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == [
        "color/street_pred_color.png", "labelIds/street_pred_labelIds.png", "overlay/street_pred_overlay.jpg"]


@pytest.mark.slow
def test_predict_bad_input_is_one_line(trained_run, tmp_path, capsys):
    """The real CLI entry in this process (a child process per case would only add torch's import time)."""
    (tmp_path / "empty").mkdir()
    clash = tmp_path / "clash"
    clash.mkdir()
    for name in ("photo.png", "photo.jpg"):
        cv2.imwrite(str(clash / name), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    for source, message in ((tmp_path / "missing", "input file or directory not found"),
                            (tmp_path / "empty", "no PNG or JPEG images found"),
                            (tmp_path / "notes.txt", ("not a PNG or JPEG image (--input takes one image file or a "
                                                      "folder of them)"))):
        code = main(["predict", "--config", str(trained_run / "config.yaml"), "--checkpoint", str(trained_run),
                     "--input", str(source), "--output", str(tmp_path / "out")])
        assert code == 1
        assert capsys.readouterr().err.strip() == f"error: {source}: {message}"
    code = main(["predict", "--config", str(trained_run / "config.yaml"), "--checkpoint", str(trained_run),
                 "--input", str(clash), "--output", str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().err.strip() == (f"error: {clash / 'photo.png'}: same name as {clash / 'photo.jpg'}, "
                                               "so their predictions would overwrite each other")
