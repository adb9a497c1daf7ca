"""The counted step (cityseg.bench.step_bytes): bytes and ATen ops of build_training's step on fake tensors, under
CUDA autocast's rules, split into parts that add up, and what the bench prints and writes."""
import json

import pytest
import torch

from cityseg.bench.step_bytes import ByteCounter, ceiling, count_training_step, moved_bytes
from cityseg.bench.throughput import bench
from cityseg.config.load import load_config

TINY = ["data.batch_size=4", "data.image_size=[64,128]", "train.channels_last=true"]


def counted(*overrides):
    return count_training_step(load_config("configs/seed_unet_mobilenetv3.yaml", [*TINY, *overrides]))


@pytest.mark.slow  # a few fake-tensor steps: 5-10 s on 2 shared cores
def test_parts_add_up_to_the_step_and_the_forward_follows_cuda_autocast():
    report = counted("train.mixed_precision=bf16", "train.ema_decay=0.99")
    assert abs(sum(report["gb_by_phase"].values()) - report["gb_per_step"]) < 1e-9
    assert sum(report["ops_by_phase"].values()) == report["ops_per_step"]
    assert all(report["gb_by_phase"][phase] > 0 for phase in report["gb_by_phase"])  # EMA included
    check = report["cuda_autocast_check"]
    assert check["ops"] > 50 and check["agree"] == check["ops"], check
    limit = ceiling(report, 2.0)
    assert abs(limit["img_s"] - 4 / (report["gb_per_step"] / 2000)) < 1e-6


@pytest.mark.slow  # a few fake-tensor steps: 5-10 s on 2 shared cores
def test_bf16_moves_fewer_bytes_than_fp32_through_casts():
    fp32, bf16 = counted("train.mixed_precision='no'"), counted("train.mixed_precision=bf16")
    fp32_ops, bf16_ops = ({top["op"]: top for top in report["top_ops"]} for report in (fp32, bf16))
    assert "_to_copy" not in fp32_ops and "_to_copy" in bf16_ops  # autocast's casts
    # a convolution reads its input and weight and writes its output, each in 2 bytes instead of 4
    assert bf16_ops["convolution"]["gb"] * 2 == fp32_ops["convolution"]["gb"]
    assert bf16_ops["convolution"]["launches"] == fp32_ops["convolution"]["launches"]
    assert bf16["gb_by_phase"]["optimizer"] == fp32["gb_by_phase"]["optimizer"]  # fp32 master weights either way
    assert bf16["cuda_autocast_check"]["agree"] == bf16["cuda_autocast_check"]["ops"]


def test_a_broadcast_input_is_read_once():
    assert moved_bytes(torch.zeros(4, 3)) == 48
    assert moved_bytes(torch.zeros(3).expand(4, 3)) == 12


def test_indexed_ops_count_the_elements_they_touch_and_out_tensors_once():
    """gather reads its source only where the index points; an in-place scatter_add_ reads and writes only the
    elements its source lands on; an out= tensor is written once (it is also what the op returns); an alias
    (_unsafe_view) moves nothing."""
    source = torch.zeros(8, 1000)  # 32,000 bytes: counted whole, it would swamp the 8 elements gathered
    index, ones, out = torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1), torch.empty(10)
    with ByteCounter() as counter:
        source.gather(1, index)
        source.scatter_add_(1, index, ones)
        torch.mul(out, out, out=out)
        torch.ops.aten._unsafe_view(source, [8000])
    moved = {op: entry[0] for (_, op), entry in counter.by_op.items()}
    assert moved == {"gather": 8 * 4 + 64 + 32, "scatter_add_": 64 + 32 + 2 * 32, "mul": 3 * 40}, moved


@pytest.mark.slow  # a few fake-tensor steps: 5-10 s on 2 shared cores
def test_bench_count_only_prints_and_writes_the_counted_step(tmp_path, capsys):
    cfg = load_config("configs/seed_unet_mobilenetv3.yaml", [*TINY, "train.mixed_precision=bf16"])
    bench(cfg, json_path=tmp_path / "bench.json", tb_per_s=3.0, count_only=True)
    out = " ".join(capsys.readouterr().out.split())
    written = json.loads((tmp_path / "bench.json").read_text())["counted"]
    assert "counted, not timed" in out and "ceiling at 3 TB/s" in out and "compiled: not counted on CPU" in out
    assert written["ceiling"]["tb_per_s"] == 3.0 and written["batch"] == 4 and written["image_size"] == [64, 128]
