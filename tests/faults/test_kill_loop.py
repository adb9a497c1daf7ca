"""kill -9 of a whole run at 20 random moments, half of them during a checkpoint save: nothing is ever lost."""
import json

import pytest

from tests.faults.kill_loop import HEADROOM
from tests.helpers.process import PYTHON, child_env, run
from tests.helpers.runs import tiny_overrides

KILLS = 20


@pytest.mark.slow
def test_every_restart_resumes_from_a_complete_checkpoint(synth_root, tmp_path):
    out = tmp_path / "run"
    args = ["--config", "configs/demo.yaml",
            *tiny_overrides(synth_root, out, train__epochs=1000, checkpoint__every_steps=1,
                            checkpoint__keep_last=2, train__eval_every_epochs=1000, optim__schedule="constant")]
    result = run([PYTHON, "tests/faults/kill_loop.py", out, KILLS, 1234, *args], timeout=900,
                 env=child_env(PYTHONUNBUFFERED="1"))
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    kills, final = records[:-1], records[-1]
    assert len(kills) == KILLS and final.get("final")

    newest_so_far = 0
    for record in kills:
        assert record["corrupt"] == [], record  # every sealed checkpoint verifies and loads with safetensors
        if record["expected_resume"] is None:
            assert record["resume_line"].startswith("resume: no checkpoint"), record
        else:  # the restart took the newest complete checkpoint
            assert record["resume_line"] == f"resume: from {record['expected_resume']}", record
            assert record["resume"] is not None
        newest = max(record["steps"], default=0)
        if record["killed_mid_save"]:  # the save it interrupted is a leftover past every sealed checkpoint
            partial = [int(name.rsplit("_", 1)[1]) for name in record["unsealed"] if name.startswith(".tmp_step_")]
            assert partial and max(partial) > newest, record
        assert newest >= newest_so_far, record  # a kill never costs a sealed checkpoint
        newest_so_far = newest
    assert newest_so_far >= 3, kills[-1]  # the run made progress across the kills
    # judged from the disk after each kill: at least a quarter of the kills really cut a save short
    assert sum(record["killed_mid_save"] for record in kills) >= KILLS // 4, [r["killed_mid_save"] for r in kills]

    assert final["exit"] == 0, final["log"]
    assert final["resume_line"] == f"resume: from {kills[-1]['resume']}", final["resume_line"]
    assert "done:" in final["log"] and final["corrupt"] == [] and final["unsealed"] == [], final
    assert max(final["steps"]) == newest_so_far + HEADROOM
