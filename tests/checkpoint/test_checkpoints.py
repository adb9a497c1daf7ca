"""On disk: keep_last and best honoured, export feeds evaluate, a corrupt newest checkpoint is skipped, bad input."""
from __future__ import annotations

import json

import pytest

from tests.checkpoint.harness import (assert_exit, final_weights, logged_steps, max_abs_diff, sealed_steps, train,
                                      trainer_state, unsealed_dirs)
from tests.conftest import cityseg, read_jsonl

# 16 images, batch 4: 4 steps per epoch, 2 epochs, a checkpoint after every step, the last 2 kept
KEPT = dict(train__epochs=2, checkpoint__every_steps=1, checkpoint__keep_last=2, optim__lr=0.005)


@pytest.fixture(scope="module")
def kept_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("kept") / "run"
    assert_exit(train(synth_root, out, **KEPT), 0)
    return out


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


def test_export_of_best_is_what_evaluate_loads(kept_run, tmp_path):
    exported = tmp_path / "exported"
    result = cityseg("export", "--checkpoint", kept_run / "checkpoints" / "best", "--out", exported)
    assert_exit(result, 0)
    assert sorted(p.name for p in exported.iterdir()) == ["config.yaml", "model.safetensors"]
    metrics_file = tmp_path / "metrics.json"
    result = cityseg("evaluate", "--config", exported / "config.yaml", "--checkpoint", exported / "model.safetensors",
                     "--json", metrics_file)
    assert_exit(result, 0)
    record = json.loads((kept_run / "checkpoints" / "best" / "best.json").read_text())
    assert json.loads(metrics_file.read_text())["mIoU"] == pytest.approx(record["mIoU"], abs=1e-6)

    # by default export writes into the run directory, and never silently replaces the final weights there
    result = cityseg("export", "--checkpoint", kept_run / "checkpoints" / "best")
    assert_exit(result, 1)
    assert result.stderr.strip().splitlines() == [
        f"error: {kept_run / 'model.safetensors'}: already exists (pass --force to replace it, or choose --out)"]
    result = cityseg("export", "--checkpoint", tmp_path / "nowhere")
    assert_exit(result, 1)
    assert result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: checkpoint directory not found"


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
