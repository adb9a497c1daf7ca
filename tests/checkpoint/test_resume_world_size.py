"""Resume mid-epoch with another world size (1->2, 2->1, 2->3 processes over gloo): the samples trained before the
stop are skipped, the rest of the epoch is shared by the new ranks, each sample of the epoch trained once."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from accelerate.data_loader import SeedableRandomSampler

from cityseg.data.sampler import EpochSampler
from cityseg.train.resume import adapt_position, samples_in_epoch
from tests.checkpoint.record_samples import RECORD_ENV
from tests.helpers.process import child_env, train
from tests.helpers.runs import assert_exit, read_jsonl, sealed_steps, trainer_state

pytestmark = pytest.mark.slow
RECORD = "tests/checkpoint/record_samples.py"
SAMPLES, BATCH = 16, 2  # synth_root's training set; per-process batch
# 2 epochs; the first run stops mid-epoch 0 after `max_steps` steps (and saves), the resumed one goes to the end
RUN = dict(data__batch_size=BATCH, train__epochs=2)
SHAPE_2 = {"world_size": 2, "batch_size": 2, "grad_accum": 1}


def recorded(directory, processes: int) -> list[list[tuple[int, int]]]:
    """Per rank, the (epoch, index) of every training sample it loaded, in order."""
    files = sorted(directory.glob("rank*.txt"))
    assert [f.name for f in files] == [f"rank{rank}.txt" for rank in range(processes)], files
    return [[tuple(map(int, line.split())) for line in f.read_text().splitlines()] for f in files]


def of_epoch(records: list[tuple[int, int]], epoch: int) -> list[int]:
    return [index for e, index in records if e == epoch]


@pytest.fixture(scope="module")
def stopped(synth_root, tmp_path_factory):
    """{processes: (run dir, checkpoint, samples trained per rank in epoch 0)} of runs that stop mid-epoch 0: one
    process after 2 steps (2 x 2 samples), two after 1 step (1 x 2 x 2 samples)."""
    runs = {}
    for processes, steps in ((1, 2), (2, 1)):
        out = tmp_path_factory.mktemp(f"stopped{processes}") / "run"
        env = child_env(**{RECORD_ENV: str(out.parent / "samples")})
        assert_exit(train(synth_root, out, processes, env=env, script=RECORD, train__max_steps=steps, **RUN), 0)
        checkpoint = out / "checkpoints" / f"step_{steps:08d}"
        assert sealed_steps(out)[-1] == steps
        # each rank loads a batch ahead of the one it trains: the first `steps` batches are the trained ones
        trained = [of_epoch(rank, 0)[:steps * BATCH] for rank in recorded(out.parent / "samples", processes)]
        runs[processes] = (out, checkpoint, trained)
    return runs


@pytest.mark.parametrize("before, after, accum", [(1, 2, 1), (2, 1, 1), (2, 3, 1), (2, 1, 2)])
def test_mid_epoch_resume_with_another_world_size_trains_each_sample_once(stopped, synth_root, tmp_path,
                                                                         before, after, accum):
    _, checkpoint, trained_before = stopped[before]
    state = trainer_state(checkpoint)
    consumed = sum(len(rank) for rank in trained_before)
    assert (state["epochs_done"], state["world_size"], state["samples_in_epoch"]) == (0, before, consumed)

    out = tmp_path / "resumed"
    env = child_env(**{RECORD_ENV: str(tmp_path / "samples")})
    result = train(synth_root, out, after, env=env, script=RECORD, train__resume=checkpoint,
                   train__grad_accum=accum, **RUN)
    assert_exit(result, 0)
    per_round = BATCH * after  # one batch on every rank; `accum` rounds make a step
    rounds_per_epoch, rounds_left = SAMPLES // per_round, (SAMPLES - consumed) // per_round
    steps_per_epoch, mapped = math.ceil(rounds_per_epoch / accum), consumed // (per_round * accum)
    changes = f"world_size {before} -> {after}" + (f", grad_accum 1 -> {accum}" if accum != 1 else "")
    assert (f"was saved with {changes}: epoch 1 continues after the {consumed} samples" in result.stdout), \
        result.stdout[-3000:]
    assert f"maps by samples seen to step {mapped} of {2 * steps_per_epoch}" in result.stdout

    ranks = recorded(tmp_path / "samples", after)
    trained_after = [index for rank in ranks for index in of_epoch(rank, 0)]
    # these cases leave a multiple of the new global batch: the epoch is the whole set, each sample once
    assert (SAMPLES - consumed) % per_round == 0
    assert sorted(sum(trained_before, []) + trained_after) == list(range(SAMPLES))
    assert len({len(of_epoch(rank, 0)) for rank in ranks}) == 1  # an equal share for every new rank
    second = [index for rank in ranks for index in of_epoch(rank, 1)]  # the next epoch is whole again
    assert len(second) == len(set(second)) == rounds_per_epoch * per_round

    # steps in the new units; accumulation windows start afresh at the resumed sample
    steps = [(r["step"], r["epoch"]) for r in read_jsonl(out / "train_log.jsonl")]
    resumed_epoch_end = mapped + math.ceil(rounds_left / accum)
    assert steps == [(s, 1) for s in range(mapped + 1, resumed_epoch_end + 1)] + \
        [(s, 2) for s in range(resumed_epoch_end + 1, resumed_epoch_end + steps_per_epoch + 1)]
    assert resumed_epoch_end == steps_per_epoch  # by samples seen, the epoch ends where a straight run's would


def test_the_step_maps_by_samples_seen():
    """adapt_position alone: same shape keeps the step; another maps it; an end-of-epoch checkpoint becomes
    epochs x steps per epoch; a checkpoint from before samples_in_epoch was recorded counts its batches."""
    saved = {"step": 11, "total_steps": 24, "epoch": 2, "epochs_done": 1, "batch_in_epoch": 3, "world_size": 1,
             "batch_size": 2, "grad_accum": 1, "samples_in_epoch": 6, "files": {}}
    same = adapt_position(saved, Path("ckpt"), {"world_size": 1, "batch_size": 2, "grad_accum": 1}, 8, 24, print)
    assert (same["step"], same["batch_in_epoch"], same["resumed_at"]) == (11, 0, [1, 6])
    assert "files" not in same and "samples_in_epoch" not in same
    said = []
    other = adapt_position(saved, Path("ckpt"), {"world_size": 3, "batch_size": 1, "grad_accum": 2}, 3, 9, said.append)
    assert (other["step"], other["total_steps"], other["resumed_at"], other["world_size"]) == (3 + 1, 9, [1, 6], 3)
    assert "step 11 of 24 maps by samples seen to step 4 of 9" in said[0]
    end_of_epoch = {**saved, "batch_in_epoch": 0, "samples_in_epoch": 0}
    assert adapt_position(end_of_epoch, Path("c"), {**SHAPE_2, "grad_accum": 1}, 4, 12, print)["step"] == 4
    old = {key: value for key, value in saved.items() if key != "samples_in_epoch"}
    assert adapt_position(old, Path("c"), SHAPE_2, 4, 12, print)["resumed_at"] == [1, 3 * 2 * 1]
    assert samples_in_epoch({**other, "batch_in_epoch": 2}) == 6 + 2 * 1 * 3  # a second stop in that epoch
    assert samples_in_epoch({**other, "epochs_done": 2, "batch_in_epoch": 2}) == 2 * 1 * 3  # the next epoch


def test_epoch_order_is_accelerates_seedable_order():
    """Runs before EpochSampler shuffled with accelerate's seedable sampler: the same permutation per (seed, epoch),
    so an uninterrupted run trains exactly as it did."""
    for seed, epoch in ((0, 0), (0, 3), (7, 1)):
        ours, theirs = EpochSampler(SAMPLES, seed), SeedableRandomSampler(range(SAMPLES), data_seed=seed)
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == list(theirs)


def test_a_resume_offset_applies_to_its_epoch_only():
    sampler = EpochSampler(SAMPLES, seed=0)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.start_at(2, 5)
    assert list(sampler) == whole[5:] and len(sampler) == SAMPLES - 5
    sampler.set_epoch(3)
    assert len(sampler) == SAMPLES and sorted(sampler) == list(range(SAMPLES))
    with pytest.raises(ValueError):
        sampler.start_at(3, SAMPLES + 1)
