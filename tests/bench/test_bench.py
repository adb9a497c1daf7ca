"""`cityseg bench --quick` runs every measurement on a tiny synthetic set (no speed assertions: that is the report)."""
import json
import math

import pytest

from tests.helpers.process import cityseg


@pytest.mark.slow
def test_bench_quick_writes_the_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = cityseg("bench", "--config", "configs/demo.yaml", "--quick", "--json", out, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seed-style" in result.stdout and "overhead" in result.stdout
    assert result.stdout.lstrip().startswith("SMOKE TEST (--quick), not a measurement")
    assert "its numbers and ratios mean nothing" in " ".join(result.stdout.split())
    report = json.loads(out.read_text())
    for section, key in [("loader", "seed_img_s"), ("loader", "uncached_img_s"), ("loader", "cached_img_s"),
                         ("step", "engine_s"), ("step", "bare_s"), ("precision", "bf16_img_s"),
                         ("processes", "two_by_one_img_s")]:
        assert report[section][key] > 0 and math.isfinite(report[section][key]), (section, key)
    vote = report["vote"]  # the stop vote's cost per step at 2 ranks, both kinds side by side
    assert result.stdout.count(" us/step") == 2  # its two rows (the table wraps the longer measurement names)
    assert vote["sync_us_per_step"] > 0 and vote["async_us_per_step"] > 0 and vote["k"] >= 1
    assert math.isclose(vote["sync_vs_async"], vote["sync_us_per_step"] / vote["async_us_per_step"])
    assert len(vote["samples_s"]["sync"]) == len(vote["samples_s"]["async"]) == 1  # --quick: one repeat
    step = report["step"]
    assert math.isclose(step["overhead_pct"], 100 * (step["engine_s"] / step["bare_s"] - 1))
    assert report["setup"]["quick"] is True and report["setup"]["images"] == 4 and report["setup"]["source"].startswith("synthetic")
