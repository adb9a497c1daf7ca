"""Interrupted = uninterrupted wherever the stop lands: 2 ranks stopped at the first step, mid-epoch, an epoch's
last step, an evaluation step, during a save, or killed (-9) right after a checkpoint, then resumed, end with the
parameters, every rank's buffers, metrics.jsonl and the logged losses of a run never stopped."""
from __future__ import annotations

import io
import re
import subprocess
import tarfile

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.process import PYTHON, REPO, child_env, run, train
from tests.helpers.runs import (
    assert_exit,
    logged_steps,
    read_jsonl,
    sealed_steps,
    trainer_state,
)

pytestmark = pytest.mark.slow
STOP_AT = "tests/checkpoint/stop_at.py"
# 16 images, batch 2, 2 ranks: 4 steps per epoch, 2 epochs, a checkpoint after every step; every vote synchronous.
# Cross-entropy: its numbers are the old main's to the bit (the Dice's backward has been rewritten since), so the
# old main's run directory resumed here can be held to the parameters of a run never stopped.
RUN = dict(data__batch_size=2, train__epochs=2, checkpoint__every_steps=1, checkpoint__keep_last=20,
           train__stop_vote_s=0, loss__name="ce")
BY_STEPS = dict(RUN, train__eval_every_steps=3)  # evaluations at steps 3, 6 and 8 instead of at the epochs' ends
OLD_MAIN = "4b77aa6"  # main before the resume fix and the package's folders: its run directories must still resume
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
EMPTY_EPOCH = re.compile(r"(?<![\d.])0\.0 img/s")  # an epoch line of no steps (not 20.0 img/s)


@pytest.fixture(scope="module")
def straight(synth_root, tmp_path_factory):
    """The run never stopped, with RUN's settings (its checkpoints of every step kept)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert_exit(train(synth_root, out, processes=2, script=STOP_AT, **RUN), 0)
    return out


def records(path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def tensors(checkpoint) -> dict[str, torch.Tensor]:
    """Parameters and buffers of rank 0 (model.safetensors) and rank 1 (its own buffers) of a checkpoint."""
    found = {f"rank0.{key}": value for key, value in load_file(str(checkpoint / "model.safetensors")).items()}
    found.update({f"rank1.{key}": value for key, value in
                  load_file(str(checkpoint / "model_buffers_1.safetensors")).items()})
    return found


def assert_same_state(checkpoint, straight_checkpoint) -> None:
    ours, theirs = tensors(checkpoint), tensors(straight_checkpoint)
    assert ours.keys() == theirs.keys()
    differ = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not differ, f"{checkpoint.name}: {len(differ)} tensors differ from the straight run's, e.g. {differ[:3]}"
    assert trainer_state(checkpoint)["step"] == trainer_state(straight_checkpoint)["step"]


def assert_buffers_restored_per_rank(dump, checkpoint) -> bool:
    """Each rank resumed with its own BatchNorm statistics and counters; True when the ranks' differ."""
    saved = {0: load_file(str(checkpoint / "model.safetensors")),
             1: load_file(str(checkpoint / "model_buffers_1.safetensors"))}
    restored = {rank: load_file(str(dump / f"rank{rank}.safetensors")) for rank in (0, 1)}
    for rank in (0, 1):
        differ = [key for key in restored[rank] if not torch.equal(restored[rank][key], saved[rank][key])]
        assert not differ, f"rank {rank} resumed from {checkpoint.name} with other buffers: {differ[:3]}"
    return any(not torch.equal(restored[0][key], restored[1][key]) for key in restored[0])


def segment(root, out, overrides, **stop) -> tuple[object, int]:
    """Train (or resume) until the stop given as CITYSEG_TEST_*=step lands; the step of the newest checkpoint."""
    env = child_env(**{f"CITYSEG_TEST_{key.upper()}": str(value) for key, value in stop.items()})
    result = train(root, out, processes=2, env=env, script=STOP_AT, **overrides)
    if set(stop) <= {"dump_restored"}:
        assert_exit(result, 0)
    else:
        assert result.returncode != 0, result.stdout[-2000:]
    assert not EMPTY_EPOCH.search(result.stdout)  # no empty epoch line after a resume at an epoch's end
    return result, sealed_steps(out)[-1]


def run_chain(root, tmp_path, overrides, stops: list[tuple[dict, int]], straight=None) -> None:
    out = tmp_path / "stopped"
    if straight is None:
        straight = tmp_path / "straight"
        assert_exit(train(root, straight, processes=2, script=STOP_AT, **overrides), 0)
    ranks_differed, resumed_from = False, None
    for index, (stop, expected_step) in enumerate(stops):
        dump = tmp_path / f"restored{index}"
        result, step = segment(root, out, overrides, dump_restored=dump, **stop)
        if resumed_from is not None:
            ranks_differed |= assert_buffers_restored_per_rank(dump, resumed_from)
        resumed_from = out / "checkpoints" / f"step_{step:08d}"
        assert step == expected_step, f"{stop}: newest checkpoint {step}, expected {expected_step}\n{result.stdout}"
        if "signal_step" in stop or "signal_save" in stop:
            assert f"written at step {step}" in result.stdout
        name = f"step_{step:08d}"
        assert_same_state(out / "checkpoints" / name, straight / "checkpoints" / name)
        assert records(out / "metrics.jsonl") == [record for record in records(straight / "metrics.jsonl")
                                                  if record["step"] <= step]
    segment(root, out, overrides)  # to the end
    assert ranks_differed  # at least one resume point where the ranks' statistics were not the same
    for name in ("step_00000008", "best"):
        assert_same_state(out / "checkpoints" / name, straight / "checkpoints" / name)
    assert (out / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")
    assert logged_steps(out) == logged_steps(straight)


def test_stops_at_first_step_mid_epoch_epoch_end_and_during_a_save(synth_root, straight, tmp_path):
    run_chain(synth_root, tmp_path, RUN, straight=straight, stops=[
        (dict(signal_step=1), 1),  # the first step
        (dict(signal_step=3), 3),  # mid-epoch
        (dict(signal_step=4), 4),  # an epoch's last step: its validation and save come first
        (dict(signal_save=5), 6),  # a signal during the save of step 5 stops at step 6
        (dict(kill_save=7), 7),  # kill -9 right after a mid-epoch checkpoint
    ])


def test_stops_at_evaluation_steps_and_kills_after_each_kind_of_checkpoint(synth_root, tmp_path):
    run_chain(synth_root, tmp_path, BY_STEPS, [
        (dict(kill_save=1), 1),  # kill -9 right after the first checkpoint
        (dict(signal_step=3), 3),  # an evaluation step: its validation and save come first
        (dict(kill_save=4), 4),  # kill -9 right after an epoch-end checkpoint
        (dict(kill_save=6), 6),  # kill -9 right after an evaluation's checkpoint
        (dict(signal_step=7, rank=0), 7),  # the main rank signalled
    ])


def test_run_directory_of_the_old_main_stopped_at_an_epoch_end_resumes_and_evaluates(synth_root, straight, tmp_path):
    """The old main saved a stop on an epoch's last step before that epoch's validation, with the main rank's
    statistics only: the resumed run owes the epoch's end and does it first (no empty epoch), then trains on with
    the parameters of a run never stopped (the statistics of the old checkpoint's other rank are lost)."""
    old_tree, out = tmp_path / "old_main", tmp_path / "run"
    old_tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_MAIN, "cityseg", "train.py", "configs"],
                             capture_output=True, timeout=60, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old_tree, filter="data")
    old_env = child_env(PYTHONPATH=str(old_tree), CITYSEG_TEST_SIGNAL_STEP="4")
    stopped = train(synth_root, out, processes=2, env=old_env, script=STOP_AT, **RUN)
    assert stopped.returncode != 0 and "written at step 4" in stopped.stdout, stopped.stdout[-2000:]
    old_checkpoint = out / "checkpoints" / "step_00000004"
    assert trainer_state(old_checkpoint)["batch_in_epoch"] == 4  # the old layout: the epoch's end still owed
    assert not (out / "metrics.jsonl").exists()

    evaluated = run([PYTHON, "-m", "cityseg", "evaluate", "--checkpoint", old_checkpoint])
    assert evaluated.returncode == 0 and "mIoU" in evaluated.stdout, evaluated.stderr[-2000:]

    resumed = train(synth_root, out, processes=2, **RUN)
    assert_exit(resumed, 0)
    assert f"resume: from {old_checkpoint}" in resumed.stdout
    assert not EMPTY_EPOCH.search(resumed.stdout) and "epoch 1:" not in resumed.stdout  # the empty epoch says nothing
    assert [record["step"] for record in read_jsonl(out / "metrics.jsonl")] == [4, 8]
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    parameters = [key for key in theirs if not key.endswith(BUFFERS)]
    assert parameters and all(torch.equal(ours[key], theirs[key]) for key in parameters)
    final = run([PYTHON, "-m", "cityseg", "evaluate", "--checkpoint", out / "model.safetensors"])
    assert final.returncode == 0 and "mIoU" in final.stdout, final.stderr[-2000:]
