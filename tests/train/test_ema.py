"""EMA of the weights: the update rule, validated and exported instead of the raw weights, exact on resume."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cityseg.train.ema import WeightEMA
from tests.helpers.process import cityseg, train
from tests.helpers.runs import assert_exit, final_weights, read_jsonl

# an EMA run: 16 images / batch 4, 4 steps, a checkpoint every 2
EMA = dict(train__ema_decay=0.8, checkpoint__every_steps=2, checkpoint__keep_last=4, optim__lr=0.01)


def test_update_follows_the_warmed_up_decay():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.99)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(step=1)
    decay = min(0.99, 2 / 11)
    for name, value in ema.module.state_dict().items():
        trained = model.state_dict()[name]
        if value.is_floating_point():
            assert torch.allclose(value, decay * start[name] + (1 - decay) * trained), name
        else:
            assert torch.equal(value, trained), name
    assert ema.decay_at(10**6) == 0.99
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.slow
def test_ema_is_saved_validated_exported_and_exact_on_resume(synth_root, tmp_path):
    straight = tmp_path / "straight"
    assert_exit(train(synth_root, straight, **EMA), 0)  # 16 images / batch 4: 4 steps, checkpoints at 2 and 4
    step2, step4 = straight / "checkpoints" / "step_00000002", straight / "checkpoints" / "step_00000004"
    ema4 = load_file(str(step4 / "ema.safetensors"))
    raw4 = load_file(str(step4 / "model.safetensors"))
    assert any(not torch.equal(ema4[k], raw4[k]) for k in ema4 if ema4[k].is_floating_point())
    exported = load_file(str(straight / "model.safetensors"))
    assert all(torch.equal(exported[k], ema4[k]) for k in ema4)  # what was validated is what is exported

    resumed = tmp_path / "resumed"
    assert_exit(train(synth_root, resumed, **EMA, train__resume=step2), 0)
    again = load_file(str(resumed / "checkpoints" / "step_00000004" / "ema.safetensors"))
    assert sorted(again) == sorted(ema4)
    for name in ema4:
        assert torch.equal(again[name], ema4[name]), name

    out = tmp_path / "eval.json"  # the last validation was of the EMA weights: evaluate reproduces it
    result = cityseg("evaluate", "--config", straight / "config.yaml", "--checkpoint", straight / "model.safetensors",
                     "--json", out, "data.num_workers=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["mIoU"] == pytest.approx(read_jsonl(straight / "metrics.jsonl")[-1]["mIoU"],
                                                                abs=1e-6)


@pytest.mark.slow
def test_a_checkpoint_that_lost_its_ema_is_refused_naming_the_file(synth_root, tmp_path):
    first = tmp_path / "first"
    assert_exit(train(synth_root, first, **EMA), 0)
    broken = tmp_path / "step_00000002"
    shutil.copytree(first / "checkpoints" / "step_00000002", broken)
    (broken / "ema.safetensors").unlink()
    result = train(synth_root, tmp_path / "second", **EMA, train__resume=broken)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "ema.safetensors" in last, result.stderr[-2000:]


@pytest.mark.slow
def test_ema_is_updated_once_per_optimizer_step_under_gradient_accumulation(synth_root, tmp_path):
    """grad_accum 2: 8 micro-batches make 4 optimizer steps. Every checkpoint's EMA is the previous one moved once
    towards that step's weights and BatchNorm statistics: ema_k = d_k * ema_(k-1) + (1 - d_k) * w_k, with
    d_k = min(decay, (1 + k) / (10 + k)); an update per micro-batch would move it twice, the first time towards
    the weights before the optimizer step."""
    out = tmp_path / "run"
    assert_exit(train(synth_root, out, **{**EMA, "data__batch_size": 2, "train__grad_accum": 2,
                                        "checkpoint__every_steps": 1}), 0)
    steps = [int(p.name.split("_")[1]) for p in sorted((out / "checkpoints").glob("step_*"))]
    assert steps == [1, 2, 3, 4], steps
    ckpt = [out / "checkpoints" / f"step_{k:08d}" for k in range(5)]
    for k in (2, 3, 4):
        previous, ema = load_file(str(ckpt[k - 1] / "ema.safetensors")), load_file(str(ckpt[k] / "ema.safetensors"))
        weights = load_file(str(ckpt[k] / "model.safetensors"))
        decay = min(0.8, (1 + k) / (10 + k))
        moved = 0
        for name, value in ema.items():
            if not value.is_floating_point():
                assert torch.equal(value, weights[name]), name  # counters are copied
                continue
            expected = decay * previous[name] + (1 - decay) * weights[name]
            assert torch.allclose(value, expected, rtol=1e-5, atol=1e-7), (k, name)
            moved += not torch.equal(value, previous[name])
        assert moved > 0, k


@pytest.mark.slow
def test_two_ranks_resumed_mid_epoch_end_with_the_uninterrupted_runs_ema(synth_root, tmp_path):
    """Each rank's EMA follows its own BatchNorm statistics, and validation averages them over the ranks: a resume
    must give every rank back its own (not the main rank's), or the averaged statistics drift from the straight
    run's. 2 epochs of 4 steps, resumed at step 6 (mid-epoch, after the first validation's averaging)."""
    run_shape = dict(data__batch_size=2, train__epochs=2, train__ema_decay=0.8, checkpoint__every_steps=1,
                     checkpoint__keep_last=10, optim__lr=0.01)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_exit(train(synth_root, straight, processes=2, **run_shape), 0)
    step6 = straight / "checkpoints" / "step_00000006"
    assert (step6 / "ema_buffers_1.safetensors").is_file()
    assert_exit(train(synth_root, resumed, processes=2, train__resume=step6, **run_shape), 0)
    a, b = final_weights(straight), final_weights(resumed)  # the exported EMA, BatchNorm statistics included
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
