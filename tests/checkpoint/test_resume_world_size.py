"""Resume mid-epoch with another world size (1->2, 2->1, 2->3 processes over gloo): the samples trained before the
stop are skipped, the rest of the epoch is shared by the new ranks, each sample of the epoch trained once."""
from __future__ import annotations

import pytest
from accelerate.data_loader import SeedableRandomSampler

from cityseg.data.sampler import EpochSampler
from tests.checkpoint.harness import assert_exit, sealed_steps, train, trainer_state
from tests.checkpoint.record_samples import RECORD_ENV
from tests.conftest import child_env, read_jsonl

pytestmark = pytest.mark.slow
RECORD = "tests/checkpoint/record_samples.py"
SAMPLES, BATCH = 16, 2  # synth_root's training set; per-process batch
# 2 epochs; the first run stops mid-epoch 0 after `max_steps` steps (and saves), the resumed one goes to the end
RUN = dict(data__batch_size=BATCH, train__epochs=2)


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


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1), (2, 3)])
def test_mid_epoch_resume_with_another_world_size_trains_each_sample_once(stopped, synth_root, tmp_path,
                                                                         before, after):
    _, checkpoint, trained_before = stopped[before]
    state = trainer_state(checkpoint)
    consumed = sum(len(rank) for rank in trained_before)
    assert (state["epochs_done"], state["world_size"], state["samples_in_epoch"]) == (0, before, consumed)

    out = tmp_path / "resumed"
    env = child_env(**{RECORD_ENV: str(tmp_path / "samples")})
    result = train(synth_root, out, after, env=env, script=RECORD, train__resume=checkpoint, **RUN)
    assert_exit(result, 0)
    per_step = BATCH * after
    steps_per_epoch, mapped = SAMPLES // per_step, consumed // per_step
    total = 2 * steps_per_epoch
    assert (f"was saved with world_size {before} -> {after}: epoch 1 continues after the {consumed} samples"
            in result.stdout), result.stdout[-3000:]
    assert f"maps by samples seen to step {mapped} of {total}" in result.stdout

    ranks = recorded(tmp_path / "samples", after)
    trained_after = [index for rank in ranks for index in of_epoch(rank, 0)]
    # these cases leave a multiple of the new global batch: the epoch is the whole set, each sample once
    assert (SAMPLES - consumed) % per_step == 0
    assert sorted(sum(trained_before, []) + trained_after) == list(range(SAMPLES))
    assert len({len(of_epoch(rank, 0)) for rank in ranks}) == 1  # an equal share for every new rank
    second = [index for rank in ranks for index in of_epoch(rank, 1)]  # the next epoch is whole again
    assert len(second) == len(set(second)) == steps_per_epoch * per_step

    steps = [(r["step"], r["epoch"]) for r in read_jsonl(out / "train_log.jsonl")]
    resumed_epoch_end = mapped + (SAMPLES - consumed) // per_step
    assert steps == [(s, 1) for s in range(mapped + 1, resumed_epoch_end + 1)] + \
        [(s, 2) for s in range(resumed_epoch_end + 1, resumed_epoch_end + steps_per_epoch + 1)]
    assert resumed_epoch_end == steps_per_epoch  # by samples seen, the epoch ends where a straight run's would


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
