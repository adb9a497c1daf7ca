"""Launch traps, the collective timeout and mixed precision on CPU, in real processes."""
from __future__ import annotations

import math
import subprocess
import time

import pytest
import torch

from tests.helpers.process import CONFIG, REPO, child_env, cityseg, launch_cmd, run
from tests.helpers.runs import read_jsonl, tiny_overrides


@pytest.fixture
def accelerator_factory():
    """make_accelerator in this process; accelerate's process-wide state is reset afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    from cityseg.distributed.runtime import make_accelerator

    yield make_accelerator
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_bf16_on_cpu_runs_the_layers_in_bf16(accelerator_factory):
    """The model as train() prepares and calls it: every conv / BN / activation output inside autocast is bf16."""
    from cityseg.config.load import load_config
    from cityseg.model.build import build_model

    cfg = load_config("configs/demo.yaml", ["train.mixed_precision=bf16"])
    accelerator = accelerator_factory(cfg)
    assert accelerator.device.type == "cpu"
    model = accelerator.prepare(build_model(cfg.model, 19))
    dtypes = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.Hardswish)):
            module.register_forward_hook(lambda m, _, out: dtypes.setdefault(type(m).__name__, set()).add(out.dtype))
    with accelerator.autocast():
        logits = model(torch.randn(2, 3, 64, 128))
    assert {"Conv2d", "BatchNorm2d"} <= set(dtypes)
    assert all(seen == {torch.bfloat16} for seen in dtypes.values()), dtypes
    assert logits.dtype == torch.float32  # accelerate hands the loss fp32 logits


@pytest.mark.slow
def test_bf16_training_with_a_short_last_accumulation_window(synth_root, tmp_path):
    """4 batches per epoch, grad_accum 3: 2 optimizer steps per epoch (3 + 1 batches), both epochs trained."""
    out = tmp_path / "run"
    result = cityseg("train", *CONFIG, *tiny_overrides(synth_root, out, train__epochs=2, train__grad_accum=3,
                                                       train__mixed_precision="bf16", train__channels_last="true"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "mixed precision bf16; global batch = 4 per process x 1 processes x 3 accumulation = 12" in result.stdout
    steps = read_jsonl(out / "train_log.jsonl")
    assert [(r["step"], r["epoch"]) for r in steps] == [(1, 1), (2, 1), (3, 2), (4, 2)]  # from 1
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert [(m["epoch"], m["step"]) for m in read_jsonl(out / "metrics.jsonl")] == [(1, 2), (2, 4)]


@pytest.mark.slow
def test_fp16_on_cpu_is_refused_in_one_line(synth_root, tmp_path):
    result = cityseg("train", *CONFIG, *tiny_overrides(synth_root, tmp_path / "run", train__mixed_precision="fp16"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.mixed_precision: fp16 needs a CUDA GPU (accelerate would silently run fp32 on the CPU); "
        "use bf16 on the CPU"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_multi_gpu_launch_without_gpus_is_stopped(synth_root, tmp_path):
    """`--multi_gpu` on a machine without GPUs and without ACCELERATE_USE_CPU=1: each process would train alone."""
    env = child_env()
    env.pop("ACCELERATE_USE_CPU")
    env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU-less node, also where the tests run on one
    result = run(launch_cmd(2, "train.py", *CONFIG, *tiny_overrides(synth_root, tmp_path / "run")), env=env,
                 timeout=300)
    assert result.returncode != 0
    message = ("error: the launcher started 2 processes but accelerate found no GPU, so each would train alone on "
               "all the data: set ACCELERATE_USE_CPU=1 to train on CPU processes over gloo")
    assert message in result.stderr.splitlines(), result.stderr[-3000:]  # rank 0's line; rank 1's is prefixed
    report = result.stderr.strip().splitlines()  # torch's failure report names the reason as its root cause
    assert report[-2].strip() == f"traceback : {message}" and set(report[-1]) == {"="}, result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # the process's own code (2: a config problem) in the report above
    assert "cityseg/train/loop.py" not in result.stderr  # no traceback of ours (the launcher prints its own summary)
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "train_log.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=1", "error: command line override 'train.max_stepz=1': unknown key 'train.max_stepz' (did you "
                          "mean 'train.max_steps'?)"),
    ("data.root=/nonexistent/cityscapes", "error: data.root /nonexistent/cityscapes: directory not found; expected "
                                          "the Cityscapes layout <root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png "
                                          "with <root>/gtFine/<split>/<city>/*_gtFine_labelIds.png")])
def test_a_one_line_error_under_accelerate_launch_is_on_screen_before_the_launcher_exits(override, message,
                                                                                          tmp_path):
    """2 processes: each prints its reason at once; torch's ~40-line failure report that follows names it as the
    root cause, on its last line of text; nothing arrives after the launcher has exited (a reason printed after
    the shell prompt came back would be missed)."""
    out, screen = tmp_path / "run", tmp_path / "stderr.txt"
    with open(screen, "w") as stderr:  # a file, not a pipe: what was written by when the launcher exited
        launcher = subprocess.Popen(launch_cmd(2, "train.py", *CONFIG, f"output_dir={out}", override), cwd=REPO,
                                    env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        code = launcher.wait(timeout=300)
    at_exit = screen.read_text()
    time.sleep(2)  # a line written later (by a helper waiting for the launcher to exit) would show up by now
    assert screen.read_text() == at_exit, "written after the launcher exited:\n" + screen.read_text()[len(at_exit):]
    assert code != 0
    lines = at_exit.strip().splitlines()
    assert message in lines, at_exit[-3000:]  # rank 0's own line; rank 1's is prefixed with [rank 1]
    assert at_exit.index(message) < at_exit.index("ChildFailedError"), at_exit[-3000:]  # before the report
    assert lines[-2].strip() == f"traceback : {message}" and set(lines[-1]) == {"="}, at_exit[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_a_stalled_rank_fails_the_collective_after_dist_timeout_minutes(tmp_path):
    """dist.timeout_minutes=0.1 reaches the process group: gloo gives up after 6000 ms, not the 30-minute default."""
    result = run(launch_cmd(2, "tests/distributed/stall_rank.py", tmp_path / "ready", "dist.timeout_minutes=0.1"),
                 timeout=240)  # without the timeout applied, rank 0 would wait for the 120 s stall and more
    assert result.returncode != 0
    assert "collective failed:" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "6000ms" in result.stdout, result.stdout
