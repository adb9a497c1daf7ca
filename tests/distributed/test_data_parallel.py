"""Data-parallel training on real CPU processes over gloo: the numbers match one process, one rank speaks."""
from __future__ import annotations

import json
import math
import subprocess

import pytest

from tests.helpers.process import (
    CONFIG,
    PYTHON,
    REPO,
    child_env,
    cityseg,
    free_port,
    launch_cmd,
    run,
)
from tests.helpers.runs import read_jsonl, tiny_overrides

pytestmark = pytest.mark.slow


def config_launch(config_file: str, num_processes: int, *target: str, port: int = 0) -> list[str]:
    """`accelerate launch --config_file launch/<config_file>` (the shipped launch configs, as users run them);
    port 0: the launcher picks a free one as it binds it."""
    return [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config_file),
            "--num_processes", str(num_processes), "--main_process_port", str(port), *target]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def assert_same_metrics(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a["mIoU"] == pytest.approx(b["mIoU"], abs=tol)
    assert a["pixel_acc"] == pytest.approx(b["pixel_acc"], abs=tol)
    assert list(a["iou"]) == list(b["iou"])
    for name in a["iou"]:
        x, y = a["iou"][name], b["iou"][name]
        if x is None or y is None or math.isnan(x) or math.isnan(y):  # a class absent in both (JSON null / NaN)
            assert x is None or math.isnan(x), name
            assert y is None or math.isnan(y), name
        else:
            assert x == pytest.approx(y, abs=tol), name


@pytest.fixture(scope="module")
def two_process_run(synth_root, tmp_path_factory):
    """The demo config trained by 2 processes for 2 epochs (2 optimizer steps each), sync_bn asked for on CPU."""
    out = tmp_path_factory.mktemp("dp") / "run"
    result = run(launch_cmd(2, "train.py", *CONFIG,
                            *tiny_overrides(synth_root, out, train__epochs=2, model__sync_bn="true")))
    assert_ok(result)
    return out, result


def test_two_processes_train_and_only_the_main_one_reports(two_process_run):
    out, result = two_process_run
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [(m["epoch"], m["step"]) for m in metrics] == [(1, 2), (2, 4)]  # one line per evaluation, not per rank
    records = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:  # one step per window (log_every 1): images/s x s/step is the global batch of 2 x 4
        assert record["images_per_s"] * record["step_time_s"] == pytest.approx(8), record
    assert (out / "model.safetensors").is_file()
    lines = result.stdout.splitlines()
    header = [line for line in lines if line.startswith("cityseg: ")]
    assert len(header) == 1, result.stdout
    assert "global batch = 4 per process x 2 processes x 1 accumulation = 8" in header[0]
    assert sum(line.startswith("step 2/4 ") for line in lines) == 1, result.stdout
    assert sum(line.startswith("eval step 4 ") for line in lines) == 1, result.stdout
    # model.sync_bn on CPU: one warning (main rank), and training went on with plain BatchNorm
    assert result.stderr.count("warning: model.sync_bn needs more than one CUDA device") == 1, result.stderr


def test_two_processes_equal_one_process_with_gradient_accumulation(two_process_run, synth_root, tmp_path):
    """Same global batches (the shuffle does not depend on the world size), same logged loss: the mean over ranks
    and over the accumulation window. Runs through launch/single_gpu.yaml, which is one process on a CPU machine."""
    out, _ = two_process_run
    single = tmp_path / "accum"
    assert_ok(run(config_launch("single_gpu.yaml", 1, "train.py", *CONFIG,
                                *tiny_overrides(synth_root, single, train__epochs=2, train__grad_accum=2))))
    two = read_jsonl(out / "train_log.jsonl")
    one = read_jsonl(single / "train_log.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)


def test_evaluate_gives_the_same_numbers_on_one_and_two_processes(two_process_run, synth_root, tmp_path):
    """7 validation images, batch 2, 2 ranks: shards of 4 and 3 images, the last batches short."""
    out, _ = two_process_run
    args = ["evaluate", *CONFIG, "--checkpoint", out / "model.safetensors"]
    overrides = [f"data.root={synth_root}", "data.image_size=[64,128]", "data.val_batch_size=2", "data.num_workers=0"]
    one = cityseg(*args, "--json", tmp_path / "one.json", *overrides)
    assert_ok(one)
    two = run(config_launch("cpu.yaml", 2, "-m", "cityseg", *args, "--json", tmp_path / "two.json", *overrides))
    assert_ok(two)
    one_metrics = json.loads((tmp_path / "one.json").read_text())
    two_metrics = json.loads((tmp_path / "two.json").read_text())
    assert one_metrics["images"] == two_metrics["images"] == 7
    assert (one_metrics["processes"], two_metrics["processes"]) == (1, 2)  # cpu.yaml did start 2 ranks over gloo
    assert_same_metrics(one_metrics, two_metrics)
    assert two.stdout.count("mIoU") == 1, two.stdout  # the table is printed by the main rank only
    # the sharded validation inside the 2-process training reported what one process measures afterwards
    assert_same_metrics(read_jsonl(out / "metrics.jsonl")[-1], one_metrics)


def test_two_machines_on_loopback_train_together(two_process_run, synth_root, tmp_path):
    """launch/multi_node.yaml as two machines of one process each, machine 0 at 127.0.0.1: the same run, the same
    numbers as 2 processes on one machine; machine 1 stays quiet."""
    out, _ = two_process_run
    port = free_port()  # both machines must be told it before either starts: port 0 cannot be shared
    machines = [subprocess.Popen(
        [str(a) for a in config_launch("multi_node.yaml", 2, "--num_machines", "2", "--machine_rank", str(rank),
                                       "--main_process_ip", "127.0.0.1", "train.py", *CONFIG,
                                       *tiny_overrides(synth_root, tmp_path / "run", train__epochs=2,
                                                       model__sync_bn="true"), port=port)],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [machine.communicate(timeout=600) for machine in machines]
    for machine, (stdout, stderr) in zip(machines, results):
        assert machine.returncode == 0, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    assert "cityseg: 2 process(es)" in results[0][0]
    assert results[1][0].strip() == "", results[1][0]
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == read_jsonl(out / "metrics.jsonl")
