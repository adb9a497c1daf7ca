"""The GPU proof's diagnosis helpers on the CPU, in seconds: the profiler summary of a real step, the device busy
time as a union of intervals, the linked Cityscapes-sized trees, and a run's summary from its train_log.jsonl."""
import json
import os

import pytest
import torch

from cityseg.bench.gpu_diagnose import (
    _union_length,
    profile_summary,
    run_summary,
    tile_tree,
)
from cityseg.config.schema import Config
from cityseg.data.cityscapes import find_pairs
from cityseg.data.synthetic import write_synthetic


def test_busy_time_is_the_union_of_overlapping_intervals():
    assert _union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == 4  # [0, 3] and [5, 6]
    assert _union_length([]) == 0


def test_profile_summary_of_cpu_work_names_the_costliest_ops():
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def step():
        (a @ b).relu_()
        torch.add(a, 1)

    summary = profile_summary(step, torch.device("cpu"), steps=5, top=2)
    assert summary["steps"] == 5 and summary["cpu_ops_per_step"] >= 3
    assert summary["kernels_per_step"] is None and summary["device_busy_share"] is None  # no device timeline
    top = summary["top_cpu_ops"]
    assert len(top) == 2 and top[0]["ms_per_step"] >= top[1]["ms_per_step"], top
    assert any(op["name"] in ("aten::mm", "aten::matmul") for op in top), top  # 256^3 multiply-adds dominate
    assert all(0 < op["share"] <= 1 for op in top) and top[0]["calls_per_step"] >= 1


def test_tiled_tree_cycles_the_source_pairs_as_links(tmp_path):
    write_synthetic(tmp_path / "src", n_train=3, n_val=1, height=32, width=64, seed=0)
    assert tile_tree(tmp_path / "src", tmp_path / "big", {"train": 7, "val": 2}) == {"train": 7, "val": 2}
    pairs = find_pairs(tmp_path / "big", "train")
    sources = find_pairs(tmp_path / "src", "train")
    assert len(pairs) == 7 and len(find_pairs(tmp_path / "big", "val")) == 2
    assert all(os.path.islink(image) and os.path.islink(label) for image, label in pairs)
    assert [os.path.realpath(image) for image, _ in pairs] == [str(sources[i % 3][0].resolve()) for i in range(7)]
    tile_tree(tmp_path / "src", tmp_path / "big", {"train": 7, "val": 2})  # a rerun keeps the links


def test_run_summary_keeps_epoch_starts_out_of_the_steady_state(tmp_path):
    cfg = Config()
    cfg.data.batch_size, cfg.train.log_every = 4, 2
    # 2 epochs of 4 steps: windows 2 and 6 open an epoch (slow: the stall), 4 and 8 are steady
    speeds = {2: 1.0, 4: 10.0, 6: 2.0, 8: 12.0}
    records = [{"step": step, "epoch": 1 + (step > 4), "images_per_s": speed, "data_wait": 0.5 if speed < 5 else 0.1,
                "step_time_s": 0.1} for step, speed in speeds.items()]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    phases = {"validate": [1.5, 1.0], "save": [0.5, 0.4], "epoch_start": [0.3, 0.1]}
    summary = run_summary(tmp_path, cfg, phases, wall=16.0)
    assert summary["steady_images_per_s"] == 11.0 and summary["steady_data_wait"] == pytest.approx(0.1)
    assert summary["first_window_images_per_s"] == [1.0, 2.0]
    assert summary["steps_per_epoch"] == 4 and summary["epochs"] == 2
    assert summary["end_to_end_images_per_s"] == 8 * 4 / 16.0
    assert summary["validation_s"] == [1.5, 1.0] and summary["checkpoint_s"] == [0.5, 0.4]
    assert summary["epoch_start_stall_s"] == [0.3, 0.1]
