"""The step path without host reads, on CPU: a NaN batch skips the update on every rank (weights and optimizer
state bit-identical), counters read late are exact, runs log their speed, persistent workers follow the epoch."""
import json
import os
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cityseg.bench import gpu_proof
from cityseg.config.schema import Config
from cityseg.data.cityscapes import CityscapesPairs, collate, find_pairs
from cityseg.data.loaders import worker_kwargs
from cityseg.data.synthetic import write_synthetic
from cityseg.data.transforms import train_transform
from cityseg.labels import label_lut
from cityseg.observe.flops import gpu_model, peak_flops
from tests.helpers.process import PYTHON, launch_cmd, rank_reports, run
from tests.helpers.runs import read_jsonl, tiny_overrides


def probe_ranks(result) -> list[dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    return rank_reports(result.stdout)


@pytest.mark.slow
def test_nan_batch_skips_the_update_exactly_on_one_process():
    (rank,) = probe_ranks(run([PYTHON, "tests/bench/nan_step_probe.py"]))
    assert rank["changed"] == [True, False, False, True], rank  # weights, moments, step count untouched
    assert rank["nan_skipped"] == 2 and rank["first_nan_step"] == 1, rank
    assert np.isfinite(rank["loss"]) and np.isfinite(rank["grad_norm"]), rank  # means over the finite steps


@pytest.mark.slow
def test_fp16_scaler_overflow_and_nan_loss_are_counted_apart():
    """fp16 with a real GradScaler on the CPU (see the probe for why `cityseg train` cannot): an overflow of the
    scaled gradients is the scaler's skip, a NaN loss the NaN skip; neither updates the weights."""
    (rank,) = probe_ranks(run([PYTHON, "tests/bench/fp16_step_probe.py"]))
    assert rank["dtypes"] == ["torch.float16"], rank  # the convolution ran in fp16 under autocast
    assert rank["changed"] == [False, False, True, False, True], rank
    assert rank["scales"][:3] == [2.0**60, 2.0**35, 2.0**10], rank  # the scaler itself found the overflows
    assert (rank["scaler_skipped"], rank["nan_skipped"], rank["first_nan_step"]) == (2, 1, 3), rank
    assert np.isfinite(rank["loss"]) and np.isfinite(rank["grad_norm"]), rank  # means over the applied steps


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_update_on_every_rank():
    ranks = probe_ranks(run(launch_cmd(2, "tests/bench/nan_step_probe.py")))
    assert len(ranks) == 2
    for rank in ranks:  # only rank 1 saw the NaNs; rank 0 skips too (NaN gradients reach it through DDP's
        # all-reduce at step 1; at step 2 only the all-reduced loss flag tells it)
        assert rank["changed"] == [True, False, False, True], rank
        assert rank["nan_skipped"] == 2 and rank["first_nan_step"] == 1, rank


@pytest.mark.slow
def test_training_logs_speed_epoch_verdict_and_profile(synth_root, tmp_path):
    out = tmp_path / "run"
    result = run([PYTHON, "train.py", "--config", "configs/demo.yaml",
                  *tiny_overrides(synth_root, out, train__profile_steps="[1,2]")])
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    for record in records:
        assert record["images_per_s"] > 0 and record["step_time_s"] > 0 and 0 <= record["data_wait"] <= 1
        assert np.isfinite(record["loss"]) and record["grad_norm"] > 0 and record["nan_skipped"] == 0
        assert "mfu" not in record and "mem_allocated_gb" not in record  # CPU: no peak FLOP/s, no GPU memory
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("epoch 1: ")]
    assert len(verdicts) == 1 and "-bound: " in verdicts[0] and "waiting for data" in verdicts[0], result.stdout
    (trace,) = (out / "profile").glob("*.json")
    assert trace.name == "trace_rank0_steps1-2.json"
    assert any(event.get("name") for event in json.loads(trace.read_text())["traceEvents"])


def test_persistent_workers_see_every_set_epoch(tmp_path):
    write_synthetic(tmp_path, n_train=4, n_val=0, height=32, width=64, seed=0)
    cfg = Config()
    cfg.data.image_size, cfg.data.crop_size, cfg.data.scale_range = [32, 64], [16, 32], [0.8, 1.5]
    dataset = CityscapesPairs(find_pairs(tmp_path, "train"), label_lut("trainid19"), train_transform(cfg.data))
    loader = DataLoader(dataset, batch_size=2, sampler=[0, 1, 2, 3], collate_fn=collate, **worker_kwargs(2))
    seen, workers = [], []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        batches = list(loader)
        workers.append(sorted(w.pid for w in loader._iterator._workers))
        expected = [dataset[i][0] for i in range(4)]  # the main process's samples for this epoch
        got = [image for batch in batches for image in batch[0]]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"epoch {epoch}: workers used a stale epoch"
        seen.append(torch.stack(got))
    assert workers[0] == workers[1] == workers[2]  # forked once
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


def test_full_size_synthetic_frame_is_photo_sized(tmp_path):
    write_synthetic(tmp_path, n_train=1, n_val=0, height=1024, width=2048, seed=3)
    (png,) = (tmp_path / "leftImg8bit" / "train").rglob("*.png")
    assert 1.5e6 <= os.path.getsize(png) <= 2.5e6, os.path.getsize(png)  # a real Cityscapes frame: about 2 MB


def test_peak_table_names_common_gpus_and_no_mfu_on_cpu():
    assert gpu_model("NVIDIA H100 80GB HBM3") == "H100 SXM" and gpu_model("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_model("NVIDIA H200") == "H200" and gpu_model("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_model("NVIDIA L40S") == "L40S" and gpu_model("NVIDIA GeForce GTX 1080") is None
    assert peak_flops(torch.device("cpu"), "bf16")[0] is None


def test_full_proof_without_cuda_stops_at_once_in_one_line_with_the_machine_recorded(tmp_path, capsys):
    started = time.monotonic()
    code = gpu_proof.main(["--work", str(tmp_path / "work"), "--json", str(tmp_path / "proof.json")])
    assert code == 2 and time.monotonic() - started < 30  # no section started: nothing ran at full size on the CPU
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("gpu_proof: no working CUDA (torch.cuda.is_available() is False"), line
    report = json.loads((tmp_path / "proof.json").read_text())
    assert report["cuda"] == {"error": "torch.cuda.is_available() is False"} and report["order"] == []
    machine = report["machine"]
    assert {"torch", "cuda_build", "cudnn", "driver", "smp", "timm"} <= set(machine), machine
    assert machine["torch"] == torch.__version__ and machine["timm"] and machine["smp"]


def test_proof_refuses_a_report_inside_its_work_folder(tmp_path, capsys):
    code = gpu_proof.main(["--quick", "--work", str(tmp_path), "--json", str(tmp_path / "sub" / "proof.json")])
    assert code == 2 and not (tmp_path / "sub").exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is inside --work" in line and "--json" in line


@pytest.mark.slow
def test_quick_proof_keeps_every_other_section_when_two_are_killed(tmp_path):
    """The step sections of the quick proof, in order, with one section made to hang and one to crash on purpose:
    the hung one is stopped at its share of the deadline, and every other section's result is in the JSON."""
    report_path = tmp_path / "proof.json"
    result = run(["bash", "bench/gpu_proof.sh", "--quick", "--work", tmp_path / "work", "--json", report_path,
                  "--only", "cuda,steps,profile,compile,sweep", "--fault", "profile=hang",
                  "--fault", "sweep.pad_classes_24=crash", "--deadline", "400"], timeout=600)
    assert result.returncode == 1, (result.stdout + result.stderr)[-4000:]
    report = json.loads(report_path.read_text())
    assert report["order"] == ["cuda", "steps.fp32", "profile", "compile.default", "compile.reduce_overhead",
                               "compile.max_autotune_no_cudagraphs", "sweep.batch", "sweep.pad_classes_24",
                               "sweep.pad_classes_32", "sweep.pad_classes_32_compile"]
    assert report["profile"]["timed_out"] and "the section's cap" in report["profile"]["error"], report["profile"]
    assert "fault injected" in report["sweep"]["pad_classes_24"]["error"]
    step = report["steps"]["fp32"]
    assert step["images_per_s"] > 0 and step["syncs_per_step"] is None and step["precision"] == "no"
    assert list(report["sweep"]["batch"]["batches"]) == ["2", "4"]
    assert report["sweep"]["pad_classes_32"]["pad_classes_to"] == 32 and report["sweep"]["pad_classes_32"]["loss"] > 0
    compiled = report["sweep"]["pad_classes_32_compile"]
    assert compiled["compile_backend"] == "eager" and compiled["images_per_s"] > 0, compiled  # traced on CPU
    for name in ("reduce_overhead", "max_autotune_no_cudagraphs"):
        assert report["compile"][name] == {"skipped": "skipped: needs CUDA"}
    assert report["cuda"]["skipped"].startswith("no CUDA")
    logs = sorted(os.listdir(tmp_path / "work" / "logs"))
    assert len(logs) == 7 and logs[0].startswith("02_steps.fp32"), logs  # one per section that ran a child
    best = report["verdict"]["best_step"]
    assert best["images_per_s"] == max(row["images_per_s"] for row in all_steps(report)), best
    assert report["compile"]["default"]["compile_backend"] == "eager"
    assert "gpu_proof: failed sections: profile, sweep.pad_classes_24" in result.stderr


def all_steps(report: dict) -> list[dict]:
    rows = [*report["steps"].values(), *report["compile"].values(), *report["sweep"]["batch"]["batches"].values()]
    rows += [row for name, row in report["sweep"].items() if name != "batch"]
    return [row for row in rows if row.get("images_per_s")]


@pytest.mark.slow
def test_gpu_proof_quick_runs_every_stage_on_cpu(tmp_path):
    report_path = tmp_path / "proof.json"
    result = run(["bash", "bench/gpu_proof.sh", "--quick", "--work", tmp_path / "proof", "--json", report_path,
                  "--only", "steps,profile,data,cache,epoch_data,epoch_cache,loop_syncs,runs,loaders,"
                  "full_resolution_eval,loss"], timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(report_path.read_text())
    assert report["data"]["train"] == 16 and report["cache"]["section_s"] > 0
    assert report["steps"]["fp32"]["images_per_s"] > 0
    for name in ("cached_device_augment", "cached_cpu_augment", "uncached"):
        loader = report["loaders"][name]
        assert loader["images_per_s"] > 0 and 0 <= loader["data_wait_last_epoch"] <= 1, loader
    assert len(report["loaders"]["cached_device_augment"]["mIoU"]) == 2
    assert report["full_resolution_eval"]["images_per_s"] > 0
    assert set(report["verdict"]) == {"zero_syncs_per_step", "best_step", "best_step_2000_img_s",
                                      "data_wait_under_5pct", "miou_rises"}
    assert "cityseg GPU proof on cpu" in result.stdout
    check_profile(report["profile"])
    loss = report["loss"]
    assert loss["configured"]["loss.name"] == "dice" and loss["configured"]["class"] == "cityseg.train.losses.DiceLoss"
    assert loss["configured"]["ms_per_call"] > 0 and loss["smp_dice_one_hot"]["ms_per_call"] > 0
    check_runs(report)


def check_profile(diagnosis: dict) -> None:
    profile = diagnosis["profile"]
    assert profile["steps"] == 5 and profile["cpu_ops_per_step"] > 0 and profile["cpu_op_time_per_step_s"] > 0
    assert profile["kernels_per_step"] is None and profile["device_busy_share"] is None  # no device timeline
    top = profile["top_cpu_ops"]
    assert 1 <= len(top) <= 20 and sum(op["share"] for op in top) <= 1 + 1e-9, top
    assert [op["ms_per_step"] for op in top] == sorted((op["ms_per_step"] for op in top), reverse=True)
    assert diagnosis["unprofiled"]["wall_s_per_step"] >= diagnosis["unprofiled"]["host_s_per_step"] > 0


def check_runs(report: dict) -> None:
    """The loop and whole-run sections of the quick proof (tiny sizes, CPU): each ran and says what it measured."""
    assert report["loop_syncs"]["window_steps"] == 2 and report["loop_syncs"]["syncs_per_window"] is None
    assert report["epoch_data"]["epoch"] == {"train": 24, "val": 8}
    for name, steps_per_epoch in (("epoch", 6), ("gpu_share", 2)):
        run = report["runs"][name]
        assert run["exit_code"] == 0 and run["epochs"] == 2 and run["steps_per_epoch"] == steps_per_epoch, run
        assert len(run["epoch_start_stall_s"]) == 2 and len(run["validation_s"]) == 2, run
        assert len(run["checkpoint_s"]) == 2 and all(s > 0 for s in run["checkpoint_s"] + run["validation_s"])
        assert run["steady_images_per_s"] > 0 and 0 <= run["steady_data_wait"] <= 1, run
        assert 0 < run["end_to_end_images_per_s"] < run["steady_images_per_s"], run  # startup, validation, saves
