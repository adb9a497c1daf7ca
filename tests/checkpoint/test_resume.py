"""Interrupted = uninterrupted: preemption, exact mid-epoch resume, signals to one rank, keep_last/best, export."""
import json
import re
import shutil
import signal

import pytest

from cityseg.checkpoint import find_resume, verify
from tests.checkpoint.runs import (complete_checkpoints, interrupt_after_first_checkpoint, losses_by_step,
                                   max_weight_difference, resume_config, run_training)
from tests.conftest import cityseg, read_jsonl


def preempted_step(output: str) -> int:
    match = re.search(r"preempted: checkpoint .* written at step (\d+)", output)
    assert match, output[-3000:]
    return int(match.group(1))


@pytest.fixture(scope="module")
def straight_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run_training(resume_config(synth_root, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_training(straight, resumed, resumed_from: int):
    assert max_weight_difference(straight / "model.safetensors", resumed / "model.safetensors") == 0.0
    expected, got = losses_by_step(straight), losses_by_step(resumed)
    assert sorted(got) == sorted(expected)  # every step logged once, none twice
    for step in expected:
        assert got[step] == expected[step], (step, resumed_from)
    assert read_jsonl(resumed / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")


def test_preempted_single_process_run_resumes_exactly(straight_run, synth_root, tmp_path):
    out = tmp_path / "run"
    # SIGUSR1 to the whole process group, loader workers included (as `scancel --signal` does): they must survive.
    output = interrupt_after_first_checkpoint(resume_config(synth_root, out, data__num_workers=2), whole_group=True)
    assert "exit code 75" in output, output[-3000:]
    stopped = preempted_step(output)
    assert stopped % 8 != 0 and stopped < 24, "not a mid-epoch stop"  # 8 steps per epoch
    result = run_training(resume_config(synth_root, out, data__num_workers=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume: from {out}/checkpoints/step_{stopped:08d}" in result.stdout
    assert_same_training(straight_run, out, stopped)


@pytest.fixture(scope="module")
def straight_run_2proc(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight2") / "run"
    result = run_training(resume_config(synth_root, out, data__batch_size=1), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("ranks", [[0, 1], [1]], ids=["both-ranks", "one-rank-only"])
def test_preempted_two_process_run_resumes_exactly(straight_run_2proc, synth_root, tmp_path, ranks):
    out = tmp_path / "run"
    overrides = resume_config(synth_root, out, data__batch_size=1)
    output = interrupt_after_first_checkpoint(overrides, processes=2, sig=signal.SIGTERM, ranks=ranks)
    stopped = preempted_step(output)
    saved = complete_checkpoints(out)
    assert saved[-1].name == f"step_{stopped:08d}"
    # both ranks took part in the stop checkpoint: each wrote its RNG state into the same, single directory
    assert {p.name for p in saved[-1].glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert output.count("preempted:") == 1  # printed by the main process only
    result = run_training(overrides, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(straight_run_2proc, out, stopped)


def test_keep_last_and_best_are_honoured(straight_run):
    kept = complete_checkpoints(straight_run)
    assert [p.name for p in kept] == ["step_00000018", "step_00000021", "step_00000024"]  # keep_last=3
    assert not list((straight_run / "checkpoints").glob(".tmp_*"))
    best = json.loads((straight_run / "checkpoints" / "best" / "best.json").read_text())
    evaluations = read_jsonl(straight_run / "metrics.jsonl")
    top = max(evaluations, key=lambda e: e["mIoU"])
    assert best["mIoU"] == top["mIoU"] and best["step"] == top["step"]
    verify(straight_run / "checkpoints" / "best")


def test_corrupt_newest_checkpoint_is_skipped_with_a_message(straight_run, synth_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    newest = complete_checkpoints(out)[-1]
    optimizer = newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # a truncated write
    messages = []
    assert find_resume(out, warn=messages.append) == complete_checkpoints(out)[-2]
    assert "optimizer.bin: truncated" in messages[0]
    result = run_training(resume_config(synth_root, out, train__epochs=4))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: skipping checkpoint" in result.stdout and "resume: from" in result.stdout
    assert f"step_{21:08d}" in result.stdout.split("resume: from")[1].splitlines()[0]


def test_export_writes_weights_that_evaluate_loads(straight_run, tmp_path):
    step = complete_checkpoints(straight_run)[-1]
    result = cityseg("export", "--checkpoint", step, "--output", tmp_path / "exported")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exported" / "config.yaml").is_file()
    assert max_weight_difference(tmp_path / "exported" / "model.safetensors", straight_run / "model.safetensors") == 0
    evaluated = cityseg("evaluate", "--config", tmp_path / "exported" / "config.yaml", "--checkpoint", step,
                        "--json", tmp_path / "eval.json")
    assert evaluated.returncode == 0, evaluated.stderr
    last = read_jsonl(straight_run / "metrics.jsonl")[-1]
    assert json.loads((tmp_path / "eval.json").read_text())["mIoU"] == pytest.approx(last["mIoU"], abs=1e-6)
