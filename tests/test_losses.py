"""OHEM cross-entropy, class-weighted cross-entropy and the auxiliary-head sum against hand-computed values; all ignore
255."""
import pytest
import torch
import torch.nn.functional as F

from cityseg.config import ConfigError, LossConfig
from cityseg.losses import CITYSCAPES_CLASS_WEIGHTS, OhemCELoss, build_loss


def batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 8, 8) * 3
    target = torch.randint(0, 19, (2, 8, 8))
    target[0, :2] = 255
    return logits, target


def test_ohem_keeps_pixels_below_the_threshold():
    logits, target = batch()
    pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[target != 255]
    hard = pixel[torch.exp(-pixel) <= 0.7]
    assert 0 < hard.numel() < pixel.numel()
    loss = build_loss(LossConfig(name="ohem_ce", ohem_thresh=0.7, ohem_min_kept=1))(logits, target)
    assert loss.item() == pytest.approx(hard.mean().item(), rel=1e-6)


def test_ohem_keeps_at_least_min_kept_hardest():
    logits, target = batch()
    pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[target != 255]
    count = int((torch.exp(-pixel) <= 0.05).sum()) + 10  # more than are below the threshold
    loss = OhemCELoss(thresh=0.05, min_kept=count)(logits, target)
    assert loss.item() == pytest.approx(pixel.sort(descending=True).values[:count].mean().item(), rel=1e-6)


def test_ohem_with_every_pixel_ignored_is_zero_with_a_graph():
    logits = torch.randn(1, 19, 4, 4, requires_grad=True)
    loss = OhemCELoss()(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_weighted_ce_uses_the_cityscapes_table_by_default():
    logits, target = batch()
    weights = torch.tensor(CITYSCAPES_CLASS_WEIGHTS)
    valid = target != 255
    pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[valid]
    expected = (pixel * weights[target[valid]]).sum() / weights[target[valid]].sum()
    loss = build_loss(LossConfig(name="weighted_ce"), 19)(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    own = build_loss(LossConfig(name="weighted_ce", class_weights=[2.0] * 19), 19)(logits, target)
    assert own.item() == pytest.approx(pixel.mean().item(), rel=1e-6)  # equal weights = plain CE


def test_weighted_ce_refuses_a_wrong_number_of_weights():
    with pytest.raises(ConfigError, match="loss.class_weights: 3 weights for 19 classes"):
        build_loss(LossConfig(name="weighted_ce", class_weights=[1.0, 2.0, 3.0]), 19)
    with pytest.raises(ConfigError, match="loss.class_weights"):
        build_loss(LossConfig(name="weighted_ce"), 20)


def test_aux_head_output_adds_its_loss_at_weight_0_4_in_float32():
    logits, target = batch()
    aux = torch.randn_like(logits)
    ce = build_loss(LossConfig(name="ce"))
    expected = F.cross_entropy(logits, target, ignore_index=255) + 0.4 * F.cross_entropy(aux, target, ignore_index=255)
    assert ce((logits, aux), target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ce(logits, target).item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item())
    half = ce((logits.bfloat16(), aux.bfloat16()), target)  # autocast output: the loss casts to float32 itself
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected.item(), rel=2e-2)
    assert build_loss(LossConfig(name="ce", aux_weight=1.0))((logits, aux), target).item() == pytest.approx(
        (F.cross_entropy(logits, target, ignore_index=255) + F.cross_entropy(aux, target, ignore_index=255)).item())
