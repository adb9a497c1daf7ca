"""Faults in real runs: Ctrl-C and kill -9 of one rank under accelerate launch, NaN loss, a disk that fills up."""
import json
import math
import os
import queue
import re
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cityseg import checkpoint
from cityseg.train.resume import find_resume
from tests.helpers.process import PYTHON, REPO, child_env, launch_cmd, rank_pids, run
from tests.helpers.runs import read_jsonl, tiny_overrides


def launch_until(lines_wanted: str, cmd: list[str], act, timeout: float = 300) -> tuple[str, float]:
    """Start a launcher in its own process group; call act(proc) when a line starts with lines_wanted. Its output is
    read by a thread, so neither the wait for that line nor the wait for the exit after it can outlast `timeout`:
    the test fails naming what it waited for."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()
    output, acted_at, deadline = [], None, time.monotonic() + timeout
    try:
        while (line := _next_line(lines, deadline, output, lines_wanted if acted_at is None else None)) is not None:
            output.append(line)
            if acted_at is None and line.startswith(lines_wanted):
                act(proc)
                acted_at = time.monotonic()
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert acted_at is not None, "".join(output)[-3000:]
    return "".join(output), time.monotonic() - acted_at


def _next_line(lines: queue.Queue, deadline: float, output: list[str], wanted: str | None) -> str | None:
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        what = f"a line starting {wanted!r}" if wanted else "the launcher to exit after the action"
        raise AssertionError(f"timed out waiting for {what}\n{''.join(output)[-3000:]}") from None


def test_launch_until_gives_up_at_its_deadline_naming_what_it_waited_for():
    started = time.monotonic()
    with pytest.raises(AssertionError, match="timed out waiting for a line starting 'step 3/'"):
        launch_until("step 3/", [PYTHON, "-c", "print('silent from now on', flush=True); import time; "
                                 "time.sleep(120)"], lambda proc: None, timeout=3)
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_ctrl_c_on_two_processes_checkpoints_and_exits_cleanly(synth_root, tmp_path):
    out = tmp_path / "run"
    cmd = launch_cmd(2, "train.py", "--config", "configs/demo.yaml", *tiny_overrides(synth_root, out, train__epochs=50))
    # a terminal's Ctrl-C: SIGINT to the whole foreground process group (launcher and both workers)
    output, _ = launch_until("step 3/", cmd, lambda proc: os.killpg(proc.pid, signal.SIGINT))
    match = re.search(r"interrupted: checkpoint (\S+) written at step (\d+); the same command resumes; exit 130", output)
    assert match, output[-3000:]
    saved, step = checkpoint.step_dir(out, int(match.group(2))), int(match.group(2))
    assert str(saved) == match.group(1) and step >= 3
    assert checkpoint.verify(saved)["step"] == step and find_resume(out) == saved
    assert "KeyboardInterrupt" not in output and "[rank" not in output, output[-3000:]  # no worker traceback
    assert not list((out / "checkpoints").glob(".tmp_*"))


@pytest.mark.slow
def test_kill_9_of_one_rank_ends_the_run_naming_the_dead_rank(synth_root, tmp_path):
    cmd = launch_cmd(2, "train.py", "--config", "configs/demo.yaml",
                     *tiny_overrides(synth_root, tmp_path / "run", train__epochs=50), "dist.timeout_minutes=1")
    output, seconds_to_exit = launch_until(
        "step 3/", cmd, lambda proc: os.kill(rank_pids(proc.pid)[1], signal.SIGKILL))
    assert seconds_to_exit < 60, output[-3000:]  # within dist.timeout_minutes, not hanging
    # the survivor: one line, no traceback; the launcher's report: rank 1 died of SIGKILL
    survivor = [line for line in output.splitlines() if line.startswith("[rank 0] error: a collective failed")]
    # one line, and the launcher's report shows it as rank 0's failure before its root cause (rank 1's SIGKILL)
    assert len(survivor) == 1, output[-4000:]
    reason = survivor[0].removeprefix("[rank 0] ")
    assert output.index(f"traceback : {reason}") < output.index("Root Cause"), output[-4000:]
    assert set(output.strip().splitlines()[-1]) == {"="}, output[-2000:]  # nothing after the report
    assert "[rank0]: Traceback" not in output
    root_cause = output[output.index("Root Cause"):]
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9", root_cause), root_cause


@pytest.mark.slow
def test_nan_loss_stops_before_nonfinite_weights_are_saved(synth_root, tmp_path):
    """optim.lr=1e30, a real user mistake: the first step sends the weights to ~1e30, the next loss is Inf/NaN."""
    out = tmp_path / "run"
    result = run([PYTHON, "train.py", "--config", "configs/demo.yaml",
                  *tiny_overrides(synth_root, out, optim__lr="1e30", checkpoint__every_steps=1)])
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: loss is NaN/Inf at step 1 (epoch 1); stopped before any non-finite "
                                     "weights were saved (train.on_nan=skip skips such steps)"), result.stderr
    assert not (out / "model.safetensors").exists()
    saved = checkpoint.complete_checkpoints(out)
    assert saved, "the step before the NaN was checkpointed"
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(str(path / checkpoint.MODEL_FILE)).values())


def data_with_one_unlabelled_sample(root: Path, position: int, seed: int = 0) -> Path:
    """6 train / 2 val images of 32x64; the label of the sample at `position` of epoch 0's shuffled order is all
    'unlabeled' (id 0, ignored): with batch 1 and loss.name=ce its loss is the mean over no pixels, NaN."""
    from accelerate.data_loader import SeedableRandomSampler

    from cityseg.data.cityscapes import find_pairs
    from cityseg.data.synthetic import write_synthetic

    write_synthetic(root, n_train=6, n_val=2, height=32, width=64, seed=1)
    order = list(SeedableRandomSampler(range(6), data_seed=seed))  # the engine's epoch-0 order (data_seed = seed)
    _, label_path = find_pairs(root, "train")[order[position]]
    Image.fromarray(np.zeros((32, 64), np.uint8), "L").save(label_path)
    return root


NAN_RUN = dict(data__image_size="[32,64]", data__batch_size=1, loss__name="ce", train__on_nan="skip",
               optim__schedule="constant", checkpoint__every_steps=1, checkpoint__keep_last=10)
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # a forward pass in train mode updates these


def trained_state(checkpoint_dir: Path) -> tuple[dict, dict]:
    """(parameters, optimizer state) of a checkpoint: what an update changes (BN running statistics excluded)."""
    weights = load_file(str(checkpoint_dir / checkpoint.MODEL_FILE))
    parameters = {k: v for k, v in weights.items() if not k.endswith(BN_BUFFERS)}
    optimizer = torch.load(checkpoint_dir / "optimizer.bin", weights_only=True)["state"]
    return parameters, {(i, name): value for i, state in optimizer.items() for name, value in state.items()}


def assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        different = [key for key in x if not torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key]))]
        assert different == [], different[:5]


@pytest.mark.slow
def test_nan_skip_leaves_weights_and_optimizer_as_if_the_batch_never_came(tmp_path):
    """One bad batch at step 3 of 5: the state after step 3 is the state after step 2 (parameters, Adam moments and
    step count), so the run goes on as one that never applied that batch; the other steps train normally."""
    root = data_with_one_unlabelled_sample(tmp_path / "cs", position=2)
    out = tmp_path / "run"
    result = run([PYTHON, "train.py", "--config", "configs/demo.yaml",
                  *tiny_overrides(root, out, train__max_steps=5, **NAN_RUN)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: 1 step(s) skipped for a NaN/Inf loss (train.on_nan=skip)" in result.stdout, result.stdout
    records = read_jsonl(out / "train_log.jsonl")
    losses = {r["step"]: r["loss"] for r in records}
    assert list(losses) == [1, 2, 3, 4, 5] and math.isnan(losses[3])  # the injected batch is at step 3
    # counted as a NaN skip from step 3 on, never as a loss-scaler skip (no scaler without fp16)
    assert [(r["nan_skipped"], r["scaler_skipped"]) for r in records] == [(0, 0), (0, 0), (1, 0), (1, 0), (1, 0)]
    assert all(math.isfinite(losses[step]) for step in (1, 2, 4, 5)), losses

    states = {step: trained_state(checkpoint.step_dir(out, step)) for step in range(1, 6)}
    assert_same_state(states[3], states[2])  # the skipped step: no parameter, moment or Adam step changed
    for before, after in ((1, 2), (3, 4), (4, 5)):  # the steps around it did update
        assert any(not torch.equal(states[before][0][k], states[after][0][k]) for k in states[after][0])
    final = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())
    assert all(torch.equal(final[k], v) for k, v in states[5][0].items())


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_both(tmp_path):
    """2 ranks, batch 1 each: the bad sample reaches rank 1 only, at step 2. Both ranks skip step 2: the run ends
    normally, rank 0's state after step 2 equals that after step 1, and the sharded validation (each rank judging
    its image with its own weights) equals one process evaluating rank 0's weights, so rank 1 holds the same."""
    root = data_with_one_unlabelled_sample(tmp_path / "cs", position=3)  # global batch 3 = rank 1's 2nd batch
    out = tmp_path / "run"
    result = run(launch_cmd(2, "train.py", "--config", "configs/demo.yaml",
                            *tiny_overrides(root, out, dist__timeout_minutes=1, **NAN_RUN)))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("warning: 1 step(s) skipped for a NaN/Inf loss") == 1, result.stdout
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "train_log.jsonl")}
    assert list(losses) == [1, 2, 3] and math.isfinite(losses[1] + losses[3]), losses  # step 2: as logging decides
    assert_same_state(trained_state(checkpoint.step_dir(out, 2)), trained_state(checkpoint.step_dir(out, 1)))
    assert checkpoint.read_trainer_state(checkpoint.step_dir(out, 3))["nan_skipped"] == 1

    measured = tmp_path / "one.json"
    one = run([PYTHON, "-m", "cityseg", "evaluate", "--config", out / "config.yaml", "--checkpoint",
               out / "model.safetensors", "--json", measured])
    assert one.returncode == 0, one.stderr[-3000:]
    in_training, afterwards = read_jsonl(out / "metrics.jsonl")[-1], json.loads(measured.read_text())
    assert afterwards["images"] == 2
    assert in_training["pixel_acc"] == pytest.approx(afterwards["pixel_acc"], abs=1e-9)
    assert in_training["mIoU"] == pytest.approx(afterwards["mIoU"], abs=1e-9, nan_ok=True)


def limit_file_size(limit_bytes: int):
    """RLIMIT_FSIZE in the child: a write past it fails (EFBIG) like a full disk; SIGXFSZ ignored so it is an error."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.slow
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(synth_root, tmp_path):
    out = tmp_path / "run"
    args = [PYTHON, "train.py", "--config", "configs/demo.yaml",
            *tiny_overrides(synth_root, out, checkpoint__every_steps=1, optim__schedule="constant")]
    first = run([*args, "train.max_steps=1"])
    assert first.returncode == 0, first.stderr[-3000:]
    previous = checkpoint.step_dir(out, 1)
    before = (previous / checkpoint.MODEL_FILE).read_bytes()

    # the resumed run cannot write its next checkpoint (12 MB of weights, 2 MB allowed per file)
    second = run([*args, "train.max_steps=3"], preexec_fn=limit_file_size(2 * 2**20))
    assert second.returncode == 1
    line = second.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, second.stderr
    assert line.startswith(f"error: {out / 'checkpoints'}: writing checkpoint step_00000002 failed ("), line
    assert line.endswith(f"GiB free there); the previous checkpoint {previous} is intact"), line
    assert find_resume(out) == previous and checkpoint.verify(previous)["step"] == 1
    assert (previous / checkpoint.MODEL_FILE).read_bytes() == before
    assert not list((out / "checkpoints").glob(".*"))  # the partial checkpoint was removed, its space freed
