"""`cityseg predict --input`: any folder of PNG / JPEG images at any size, subfolders kept; bad input is one line."""
from __future__ import annotations

import cv2
import numpy as np

from tests.conftest import cityseg


def test_predict_on_a_folder_of_images_of_any_size(trained_run, tmp_path):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "photos"
    (inputs / "trip" / "day1").mkdir(parents=True)
    cv2.imwrite(str(inputs / "trip" / "day1" / "street.jpg"), rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    cv2.imwrite(str(inputs / "berlin_000000_000019_leftImg8bit.png"),
                rng.integers(0, 256, (100, 200, 3), dtype=np.uint8))
    cv2.imwrite(str(inputs / "gray.PNG"), rng.integers(0, 256, (33, 47), dtype=np.uint8))
    (inputs / "notes.txt").write_text("not an image")
    out = inputs / "predictions"  # inside the input folder: a second run must not take it as input
    for _ in range(2):
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
    assert len(list(out.rglob("*.*"))) == 9


def test_predict_bad_input_is_one_line(trained_run, tmp_path):
    (tmp_path / "empty").mkdir()
    for source, message in ((tmp_path / "missing", "input directory not found"),
                            (tmp_path / "empty", "no PNG or JPEG images found")):
        result = cityseg("predict", "--config", trained_run / "config.yaml", "--checkpoint", trained_run,
                         "--input", source, "--output", tmp_path / "out")
        assert result.returncode == 1
        assert result.stderr.strip() == f"error: {source}: {message}", result.stderr
