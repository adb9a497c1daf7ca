"""On a CUDA machine (marker gpu: deselected by default, `bash tests/run.sh -m gpu` runs them and they fail without
a GPU): every precision's steady-state step makes no host sync, through the same child process the GPU proof uses."""
import json

import pytest
import torch
import yaml

from cityseg.bench.gpu_measure import STEP_VARIANTS
from cityseg.bench.gpu_proof import QUICK, proof_config
from tests.helpers.process import PYTHON, child_env, run

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda_present():
    assert torch.cuda.is_available(), "marker gpu selected on a machine without a CUDA GPU (torch.cuda.is_available())"


@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_steady_state_step_makes_no_host_sync(variant, tmp_path):
    config = tmp_path / "step.yaml"
    config.write_text(yaml.safe_dump(proof_config(tmp_path, QUICK)))
    env = child_env()
    env.pop("ACCELERATE_USE_CPU")
    options = {"variant": STEP_VARIANTS[variant], "steps": 2, "warmup": 2}
    result = run([PYTHON, "-m", "cityseg.bench.gpu_proof", "--child", "step", "--config", config, "--options",
                  json.dumps(options), "--result", tmp_path / "result.json"], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["syncs_per_step"] == 0, result.stderr[-3000:]
    assert report["mfu"] is None or 0 < report["mfu"] < 1
