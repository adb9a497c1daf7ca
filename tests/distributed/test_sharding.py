"""Sharded training data: disjoint, covering, reshuffled per epoch, a function of the seed, not of the world size."""
from __future__ import annotations

import json

import pytest

from tests.helpers.process import PYTHON, run

pytestmark = pytest.mark.slow
SCRIPT = "tests/distributed/record_shards.py"


def interleave(per_rank: list[list[int]], batch_size: int) -> list[int]:
    """The global order: batch 0 of rank 0, batch 0 of rank 1, batch 1 of rank 0, ..."""
    batches = [[order[i:i + batch_size] for i in range(0, len(order), batch_size)] for order in per_rank]
    return [index for round_ in zip(*batches) for batch in round_ for index in batch]


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory):
    """What each rank's training loader yielded: 2 ranks under torchrun (the launch mode not used elsewhere in
    these tests; ACCELERATE_USE_CPU=1 from child_env), and 1 plain process."""
    out = tmp_path_factory.mktemp("shards")
    args = ["--config", "configs/demo.yaml", "--epochs", "2", f"data.root={synth_root}", "data.image_size=[64,128]",
            "data.batch_size=4", "data.num_workers=0", "seed=3"]
    # --standalone: a rendezvous on localhost port 0, bound by torchrun itself (no port picked in advance to race)
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for name, command in (("two", [*torchrun, SCRIPT, "--out", out / "two", *args]),
                          ("one", [PYTHON, SCRIPT, "--out", out / "one", *args])):
        result = run(command)
        assert result.returncode == 0, result.stderr[-4000:]
    two = [json.loads((out / "two" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    one = json.loads((out / "one" / "rank0.json").read_text())
    assert [r["world"] for r in two] == [2, 2] and one["world"] == 1
    return two, one


def test_each_epoch_is_split_into_disjoint_shards_that_cover_the_set(shards):
    two, _ = shards
    for epoch in (0, 1):
        rank0, rank1 = (r["orders"]["4"][epoch] for r in two)
        assert len(rank0) == len(rank1) == 8
        assert not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == list(range(16))


def test_the_shuffle_changes_per_epoch_and_depends_only_on_the_seed(shards):
    two, one = shards
    for batch_size in ("4", "3"):
        single = one["orders"][batch_size]
        assert single[0] != single[1], "epochs 0 and 1 were shuffled alike"
        for epoch in (0, 1):
            together = interleave([r["orders"][batch_size][epoch] for r in two], int(batch_size))
            assert together == single[epoch][:len(together)]  # same seed: same order, 1 or 2 processes
    assert sorted(one["orders"]["4"][0]) == list(range(16)) and one["orders"]["4"][0] != list(range(16))


def test_the_remainder_is_dropped_and_changes_with_the_epoch(shards):
    """16 samples in batches of 3 over 2 ranks: 2 rounds of 2 x 3 = 12 per epoch; 4 left out, others each epoch."""
    two, _ = shards
    left_out = []
    for epoch in (0, 1):
        seen = [index for r in two for index in r["orders"]["3"][epoch]]
        assert len(seen) == len(set(seen)) == 12
        left_out.append(set(range(16)) - set(seen))
    assert left_out[0] != left_out[1]


def test_augmentations_replay_per_sample_and_epoch_whatever_the_rank(shards):
    """An image is augmented from (seed, epoch, index): the same on rank 1 of 2 as on one process; epochs differ."""
    two, one = shards
    merged = {**two[0]["checksums"], **two[1]["checksums"]}
    assert len(merged) == 32
    assert merged == pytest.approx(one["checksums"], rel=1e-9)
    assert any(merged[f"0/{i}"] != pytest.approx(merged[f"1/{i}"], rel=1e-9) for i in range(16))


def test_loader_workers_draw_different_random_numbers_on_each_rank(shards):
    two, _ = shards
    draws = [tuple(row) for r in two for row in r["worker_draws"].values()]
    assert len(draws) == 4  # 2 ranks x 2 workers
    assert len(set(draws)) == 4
