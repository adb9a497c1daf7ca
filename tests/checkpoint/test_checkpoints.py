"""On disk: keep_last and best honoured, export feeds evaluate, a corrupt newest checkpoint is skipped, bad input."""
from __future__ import annotations

import json
import shutil

import pytest

from cityseg.cli import main as cityseg_main
from tests.helpers.files import CodeOnLoad
from tests.helpers.process import cityseg, train
from tests.helpers.runs import (
    assert_exit,
    final_weights,
    logged_steps,
    max_abs_diff,
    read_jsonl,
    sealed_steps,
    trainer_state,
    unsealed_dirs,
)

# 16 images, batch 4: 4 steps per epoch, 2 epochs, a checkpoint after every step, the last 2 kept
KEPT = dict(train__epochs=2, checkpoint__every_steps=1, checkpoint__keep_last=2, optim__lr=0.005)


@pytest.fixture(scope="module")
def trained_once(synth_root, tmp_path_factory):
    """The training, run once per module; tests never touch it, each gets its own copy (kept_run)."""
    out = tmp_path_factory.mktemp("kept") / "run"
    assert_exit(train(synth_root, out, **KEPT), 0)
    return out


@pytest.fixture
def kept_run(trained_once, tmp_path):
    """This test's own copy of the run: what it truncates, resumes or exports into is seen by no other test."""
    return shutil.copytree(trained_once, tmp_path / "kept_run")


@pytest.mark.slow
def test_keep_last_and_best_by_validation_miou(kept_run):
    assert sealed_steps(kept_run) == [7, 8] and not unsealed_dirs(kept_run)
    evaluations = read_jsonl(kept_run / "metrics.jsonl")
    assert [e["step"] for e in evaluations] == [4, 8]
    best = max(evaluations, key=lambda e: e["mIoU"])
    record = json.loads((kept_run / "checkpoints" / "best" / "best.json").read_text())
    assert record["mIoU"] == best["mIoU"] and record["step"] == best["step"]
    assert trainer_state(kept_run / "checkpoints" / "best")["step"] == best["step"]
    # the final artefact is the last checkpoint's weights
    assert (kept_run / "model.safetensors").read_bytes() == \
        (kept_run / "checkpoints" / "step_00000008" / "model.safetensors").read_bytes()


def export(capfd, *args) -> tuple[int, str]:
    """`cityseg export ...` in this process (it only copies files): (exit code, stderr)."""
    code = cityseg_main(["export", *map(str, args)])
    return code, capfd.readouterr().err


@pytest.mark.slow
def test_export_of_best_is_what_evaluate_loads(kept_run, tmp_path, capfd):
    exported = tmp_path / "exported"
    code, stderr = export(capfd, "--checkpoint", kept_run / "checkpoints" / "best", "--out", exported)
    assert code == 0, stderr
    assert sorted(p.name for p in exported.iterdir()) == ["config.yaml", "model.safetensors"]
    metrics_file = tmp_path / "metrics.json"
    result = cityseg("evaluate", "--config", exported / "config.yaml", "--checkpoint", exported / "model.safetensors",
                     "--json", metrics_file)
    assert_exit(result, 0)
    record = json.loads((kept_run / "checkpoints" / "best" / "best.json").read_text())
    assert json.loads(metrics_file.read_text())["mIoU"] == pytest.approx(record["mIoU"], abs=1e-6)

    # by default export writes into the run directory, and never silently replaces the final weights there
    before = (kept_run / "model.safetensors").read_bytes()
    code, stderr = export(capfd, "--checkpoint", kept_run / "checkpoints" / "best")
    assert code == 1 and stderr.strip().splitlines() == [
        f"error: {kept_run / 'model.safetensors'}: already exists (pass --force to replace it, or choose --out)"]
    assert (kept_run / "model.safetensors").read_bytes() == before
    code, stderr = export(capfd, "--checkpoint", tmp_path / "nowhere")
    assert code == 1 and stderr.strip() == f"error: {tmp_path / 'nowhere'}: checkpoint directory not found"


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_reported_and_the_previous_one_resumed(synth_root, kept_run, tmp_path):
    weights, steps, evaluations = final_weights(kept_run), logged_steps(kept_run), read_jsonl(kept_run / "metrics.jsonl")
    newest = kept_run / "checkpoints" / "step_00000008"
    optimizer = newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # a save cut short by a full disk

    explicit = train(synth_root, kept_run, train__resume=newest, **KEPT)
    assert_exit(explicit, 1)
    assert explicit.stderr.strip().splitlines()[-1].startswith(f"error: {optimizer}: ")  # one line, names the file

    resumed = train(synth_root, kept_run, **KEPT)
    assert_exit(resumed, 0)
    assert f"warning: skipping checkpoint: {optimizer}: " in resumed.stdout
    assert f"resume: from {kept_run / 'checkpoints' / 'step_00000007'}" in resumed.stdout
    assert max_abs_diff(final_weights(kept_run), weights) == 0.0  # step 8 trained again, identically
    assert logged_steps(kept_run) == steps and read_jsonl(kept_run / "metrics.jsonl") == evaluations
    assert sealed_steps(kept_run) == [7, 8] and not unsealed_dirs(kept_run)
    assert trainer_state(newest)["files"]["optimizer.bin"] == optimizer.stat().st_size  # replaced, whole


@pytest.mark.slow
def test_config_and_directory_mistakes_are_one_line_errors(synth_root, kept_run, tmp_path):
    fresh = train(synth_root, kept_run, train__resume="none", **KEPT)
    assert_exit(fresh, 1)
    assert fresh.stderr.strip().splitlines() == [
        f"error: {kept_run}: holds checkpoints of an earlier run (newest step_00000008); with train.resume=none "
        "use a new output_dir, or train.resume=auto to continue that run"]
    bad_signal = train(synth_root, tmp_path / "run", train__preempt_signals="[SIGKILL]")
    assert_exit(bad_signal, 2)
    assert bad_signal.stderr.strip().splitlines() == [
        "error: train.preempt_signals: 'SIGKILL' is not a signal a process can catch (e.g. SIGUSR1, SIGTERM)"]


@pytest.mark.slow
@pytest.mark.parametrize("target, message", [
    ("optimizer.bin", "{ckpt}: cannot be loaded into this run's model/optimizer (UnpicklingError: Weights only load "
                      "failed"),
    # accelerate would skip an unloadable RNG file silently (and resume inexactly): verify() refuses it first
    ("random_states_0.pkl", "{ckpt}/random_states_0.pkl: unreadable (UnpicklingError: Weights only load failed"),
])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_without_running_it(synth_root, kept_run, tmp_path, target,
                                                                           message):
    """torch.load(weights_only=True) only: the payload is refused, never executed, and the run stops in one line
    naming the checkpoint (the file sizes match the record: only the unpickler can tell)."""
    import torch

    from cityseg.checkpoint import TRAINER_STATE, write_json_atomic

    newest, marker = kept_run / "checkpoints" / "step_00000008", tmp_path / "payload_ran"
    torch.save({"state": {}, "param_groups": [], "hook": CodeOnLoad(marker)}, newest / target)
    state = trainer_state(newest)
    state["files"][target] = (newest / target).stat().st_size
    write_json_atomic(newest / TRAINER_STATE, state)

    result = train(synth_root, tmp_path / "resumed", train__resume=newest, **KEPT)
    assert_exit(result, 1)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: " + message.format(ckpt=newest)), line
    assert not marker.exists()
    assert not (tmp_path / "resumed" / "train_log.jsonl").exists()
