"""Optimizer choices (SGD / AdamW, no decay on norms and biases or by name, head LR multiplier), the LR rule keyed
to the global batch, poly min_lr, and the iteration-based schedule of a real run (evaluations and checkpoints every
N steps across epochs)."""
import math

import pytest
import torch

from cityseg.config.load import load_config
from cityseg.config.schema import OptimConfig
from cityseg.model.build import build_model
from cityseg.train.optim import build_optimizer, lr_at, lr_scaling, set_lr
from tests.helpers.process import PYTHON, REPO, run
from tests.helpers.runs import read_jsonl, tiny_overrides


def model():
    return build_model(load_config(None).model, 19)


def test_default_is_one_adamw_group_as_before():
    optimizer = build_optimizer(model(), OptimConfig())
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.005


def test_sgd_with_momentum_and_nesterov():
    optimizer = build_optimizer(model(), OptimConfig(name="sgd", lr=0.01, momentum=0.8, nesterov=True,
                                                     weight_decay=5e-4))
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.8, True, 5e-4)


def test_no_decay_on_norm_and_bias_and_head_lr_multiplier():
    net = model()
    optimizer = build_optimizer(net, OptimConfig(no_decay_norm_bias=True, head_lr_mult=10.0, weight_decay=0.01))
    names = {id(p): n for n, p in net.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.append(name)
            assert group["weight_decay"] == (0.0 if param.ndim <= 1 else 0.01), name
            assert group["lr_mult"] == (1.0 if name.startswith("encoder.") else 10.0), name
    assert sorted(seen) == sorted(names.values())  # every parameter exactly once
    assert any(".bn" in n or "norm" in n or n.endswith(".bias") for n in seen)
    first = optimizer.param_groups[0]
    assert first["lr_mult"] == 1.0 and first["weight_decay"] == 0.01  # the logged LR is the encoder's
    set_lr(optimizer, 0.5)
    assert {g["lr"] for g in optimizer.param_groups} == {0.5, 5.0}


def rule(batch: int, processes: int, accum: int, reference: int | None = 8, scaling: str = "none",
         name: str = "sgd"):
    cfg = load_config(None, [f"data.batch_size={batch}", f"train.grad_accum={accum}", f"optim.name={name}",
                             f"train.reference_global_batch={reference if reference else 'null'}",
                             f"optim.lr_scaling={scaling}", "optim.lr=0.01"])
    return lr_scaling(cfg, processes)


def test_lr_rule_is_keyed_to_the_global_batch_with_grad_accum_and_batch_size():
    # the anchor's global batch 8, reached three ways: no rescale, no warning
    assert rule(2, 4, 1) == (1.0, None) and rule(8, 1, 1) == (1.0, None) and rule(2, 1, 4) == (1.0, None)
    assert rule(2, 1, 1, reference=None) == (1.0, None)  # no reference: nothing to compare
    assert rule(4, 1, 2, scaling="linear") == (1.0, None)  # batch 4 x accum 2 = 8: not cut
    factor, note = rule(2, 1, 2, scaling="linear")  # global batch 4
    assert factor == 0.5 and "global batch 4 (data.batch_size 2 x 1 processes x train.grad_accum 2)" in note
    assert "scaled (linear) by 0.5 to 0.005" in note
    assert rule(4, 1, 1, scaling="linear")[0] == 0.5 and rule(4, 4, 1, scaling="linear")[0] == 2.0
    assert rule(2, 1, 1, scaling="sqrt")[0] == pytest.approx(0.5)  # sqrt(2 / 8)


def test_lr_rule_is_off_by_default_and_says_how_to_match():
    factor, note = rule(2, 1, 1)
    assert factor == 1.0, "mmsegmentation keeps optim.lr unless asked"
    assert note.startswith("warning: global batch 2 (data.batch_size 2 x 1 processes x train.grad_accum 1) differs "
                           "from the recipe's train.reference_global_batch 8; optim.lr 0.01 is used as it is")
    assert "data.batch_size=8 train.grad_accum=1 or data.batch_size=2 train.grad_accum=4" in note
    assert "optim.lr_scaling=linear" in note
    assert "make data.batch_size x processes x train.grad_accum = 8" in rule(2, 3, 1)[1]  # 8 / 3: no even split


def test_lr_rule_never_scales_adamw_linearly_without_saying_so():
    factor, note = rule(1, 1, 1, scaling="linear", name="adamw")
    assert factor == 0.125 and "the linear rule is SGD's; for AdamW optim.lr_scaling=sqrt" in note
    assert "AdamW" not in rule(1, 1, 1, scaling="sqrt", name="adamw")[1]
    assert "AdamW" not in rule(1, 1, 1, scaling="linear", name="sgd")[1]


def test_poly_decays_to_min_lr():
    cfg = OptimConfig(lr=0.01, min_lr=1e-4, poly_power=0.9)
    assert lr_at(0, 100, cfg) == pytest.approx(0.01)
    assert lr_at(50, 100, cfg) == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    assert lr_at(100, 100, cfg) == pytest.approx(1e-4) and lr_at(100, 100, OptimConfig(lr=0.01)) == 0.0


def decay_of(recipe: str) -> dict[str, float]:
    cfg = load_config(REPO / "configs" / recipe, ["model.encoder_weights=null"])
    net = build_model(cfg.model, 19)
    names = {id(p): n for n, p in net.named_parameters()}
    return {names[id(p)]: group["weight_decay"] for group in build_optimizer(net, cfg.optim).param_groups
            for p in group["params"]}


def test_weight_decay_follows_each_anchor():
    """mmseg's SegFormer exempts parameters named "norm" (the encoder's LayerNorms) only; its DeepLabV3+ and
    MobileNetV3 schedules decay every parameter."""
    decay = decay_of("segformer_b0_1024x1024_160k.yaml")
    assert {n for n, wd in decay.items() if wd == 0.0} == {n for n in decay if "norm" in n} != set()
    assert decay["decoder.fuse_stage.1.weight"] == 0.01 and decay["segmentation_head.0.bias"] == 0.01
    for recipe in ("deeplabv3plus_r50_512x1024_80k.yaml", "unet_mobilenetv3_512x1024_320k.yaml"):
        assert set(decay_of(recipe).values()) == {0.0005}, recipe


@pytest.mark.slow
def test_engine_rescales_by_the_global_batch_with_grad_accum(synth_root, tmp_path):
    """batch 4 x 1 process x accum 2 = 8 against a reference of 16, linear: every logged LR is half the schedule's."""
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synth_root, out, train__max_steps=2, train__grad_accum=2, optim__lr=0.01,
                                           train__reference_global_batch=16, optim__lr_scaling="linear")
                 if not o.startswith("train.epochs=")] + ["train.epochs=null"]
    result = run([PYTHON, "train.py", "--config", "configs/demo.yaml", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8 (data.batch_size 4 x 1 processes x train.grad_accum 2)" in result.stdout
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    for record in read_jsonl(out / "train_log.jsonl"):
        assert record["lr"] == pytest.approx(0.5 * lr_at(record["step"] - 1, 2, cfg.optim)), record


@pytest.mark.slow
def test_iteration_based_schedule_evaluates_and_checkpoints_every_n_steps(synth_root, tmp_path):
    """16 images / batch 4 = 4 steps per epoch; train.max_steps=10 spans 3 epochs; eval every 4, checkpoint every 5."""
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synth_root, out, train__max_steps=10, train__eval_every_steps=4,
                                           checkpoint__every_steps=5, checkpoint__keep_last=5, optim__lr=0.01,
                                           optim__schedule="poly", optim__poly_power=1.0)
                 if not o.startswith("train.epochs=")] + ["train.epochs=null"]
    result = run([PYTHON, "train.py", "--config", "configs/demo.yaml", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [4, 8, 10]
    logged = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in logged] == list(range(1, 11)) and logged[-1]["epoch"] == 3
    for record in logged:  # the poly decay spans the 10 steps, not the epochs
        assert record["lr"] == pytest.approx(0.01 * (1 - (record["step"] - 1) / 10)), record
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert steps == ["step_00000004", "step_00000005", "step_00000008", "step_00000010"], steps
    assert (out / "checkpoints" / "best").is_dir()
    assert math.isfinite(read_jsonl(out / "metrics.jsonl")[-1]["mIoU"])


def test_warmup_and_poly_values_by_hand():
    """lr * (step + 1) / warmup for step < warmup, then lr * (1 - (step - warmup) / (total - warmup)) ** power."""
    from cityseg.train.optim import lr_at

    cfg = OptimConfig(lr=0.01, warmup_steps=4, poly_power=2.0)
    got = [lr_at(step, 8, cfg) for step in range(9)]
    assert got == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.005625, 0.0025, 0.000625, 0.0], rel=1e-12)
    default_power = OptimConfig(lr=0.01, warmup_steps=3)  # poly_power 0.9: 0.01 * 0.8 ** 0.9 at step 4 of 8
    assert lr_at(4, 8, default_power) == pytest.approx(0.008180521460508584, rel=1e-12)
    constant = OptimConfig(lr=0.01, warmup_steps=2, schedule="constant")
    assert [lr_at(step, 8, constant) for step in range(4)] == pytest.approx([0.005, 0.01, 0.01, 0.01], rel=1e-12)


@pytest.mark.slow
def test_the_lr_logged_by_a_real_run_is_the_schedule_by_hand(synth_root, tmp_path):
    """2 epochs of 4 steps; the record of step s (counted from 1) carries the LR its update used, lr_at(s - 1)."""
    out = tmp_path / "run"
    result = run([PYTHON, "train.py", "--config", "configs/demo.yaml",
                  *tiny_overrides(synth_root, out, train__epochs=2, optim__lr=0.01, optim__poly_power=2.0,
                                  optim__warmup_steps=4)])
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.005625, 0.0025,
                                                        0.000625], rel=1e-12)
