"""Defects only a CUDA run showed, tested on CPU: sync-BN keeps timm's fused activations; evaluation's unwrap of a
compiled DDP model leaves DDP (and its no_sync) in the training model."""
import pytest
import torch
from timm.layers import BatchNormAct2d

from cityseg.config.schema import ModelConfig
from cityseg.model.build import build_model, convert_sync_batchnorm
from tests.helpers.process import launch_cmd, rank_reports, run


def test_sync_batchnorm_conversion_keeps_the_network():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), num_classes=19).eval()
    fused = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    with_act = [m for m in fused if not isinstance(m.act, torch.nn.Identity)]
    assert len(fused) >= 20 and len(with_act) >= 10  # the seed encoder: 33 fused layers, 22 with ReLU
    for module in model.modules():  # non-trivial statistics, so that a dropped activation changes the output
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    images = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        expected = model(images)
        converted = convert_sync_batchnorm(model).eval()
        got = converted(images)
    assert set(converted.state_dict()) == set(model.state_dict())
    assert not any(type(m) is torch.nn.BatchNorm2d or type(m) is BatchNormAct2d for m in converted.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) >= len(fused)
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_ddp_sync_survives_evaluation_unwrap_of_compiled_model():
    result = run(launch_cmd(2, "tests/bench/ddp_compile_probe.py"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = rank_reports(result.stdout)
    assert len(ranks) == 2, result.stdout
    for rank in ranks:
        assert rank["ddp_kept"] == "DistributedDataParallel", rank
        assert rank["no_sync_gap"] > 1e-4, rank  # the first micro-step kept each rank's own gradients
        assert rank["sync_gap"] < 1e-6, rank  # the window's last micro-step averaged them across ranks
