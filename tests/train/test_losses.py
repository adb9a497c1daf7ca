"""The Dice loss against smp's, OHEM, class-weighted cross-entropy and the auxiliary-head sum against hand-computed
values; all ignore 255 and take bf16 logits and uint8 masks as the step hands them over."""
import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss as SmpDiceLoss
from torch.utils._python_dispatch import TorchDispatchMode

from cityseg.config.schema import ConfigError, LossConfig
from cityseg.train.losses import (
    CITYSCAPES_CLASS_WEIGHTS,
    DiceLoss,
    OhemCELoss,
    build_loss,
)


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


def test_ohem_with_fewer_labelled_pixels_than_min_kept_keeps_the_threshold():
    logits, target = batch()  # 128 pixels, 112 labelled
    pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[target != 255]
    hard = pixel[torch.exp(-pixel) <= 0.05]
    assert 0 < hard.numel() < 112
    loss = OhemCELoss(thresh=0.05, min_kept=120)(logits, target)  # min_kept between labelled and all pixels
    assert loss.item() == pytest.approx(hard.mean().item(), rel=1e-6)
    easy = OhemCELoss(thresh=1e-9, min_kept=120)(logits.requires_grad_(), target)
    easy.backward()  # nothing that hard: 0, and a graph (every rank runs backward)
    assert easy.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


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


def dice_cases():
    """(logits, target): ignored pixels, classes absent from the batch, a batch with no labelled pixel, many rows."""
    generator = torch.Generator().manual_seed(1)
    for shape, present in (((2, 19, 8, 16), 19), ((2, 19, 8, 16), 5), ((3, 7, 33, 70), 7), ((1, 4, 5, 6), 4)):
        logits = torch.randn(shape, generator=generator) * 4
        target = torch.randint(0, present, (shape[0], *shape[2:]), generator=generator)
        target[0, : shape[2] // 3] = 255
        target[-1, :, -3:] = 255
        yield logits, target
    yield torch.randn(2, 19, 4, 4, generator=generator), torch.full((2, 4, 4), 255)


@pytest.mark.parametrize("options", [{}, {"smooth": 1.0}, {"log_loss": True}, {"eps": 1e-3, "log_loss": True}])
def test_dice_equals_smp_loss_and_gradient(options):
    for logits, target in dice_cases():
        # the reference is smp in float64: smp's fp32 result carries its own rounding (its intersection is a
        # difference of sums), 1.6e-6 off here and up to 1e-5 with log_loss; this loss stays within 1e-6
        exact_logits = logits.double().requires_grad_()
        expected = SmpDiceLoss(mode="multiclass", ignore_index=255, **options)(exact_logits, target)
        expected.backward()
        own_logits = logits.clone().requires_grad_()
        loss = DiceLoss(**options)(own_logits, target.to(torch.uint8))
        loss.backward()
        assert loss.dtype == torch.float32
        assert abs(loss.item() - expected.item()) < 1e-6, (options, loss.item(), expected.item())
        assert torch.allclose(own_logits.grad.double(), exact_logits.grad, rtol=0, atol=1e-6), options


def test_losses_take_bf16_logits_and_compute_in_fp32():
    logits, target = batch()
    half = logits.to(torch.bfloat16)
    for name in ("dice", "ce", "dice+ce", "ohem_ce", "weighted_ce"):
        loss_fn = build_loss(LossConfig(name=name), 19)
        loss = loss_fn(half, target.to(torch.uint8))
        assert loss.dtype == torch.float32, name
        assert loss.item() == pytest.approx(loss_fn(half.float(), target).item(), rel=1e-6, abs=1e-7), name
    dice = SmpDiceLoss(mode="multiclass", ignore_index=255)(half.double(), target)  # the same rounded logits
    assert abs(build_loss("dice")(half, target).item() - dice.item()) < 1e-6


class Allocations(TorchDispatchMode):
    """Records (op, dtype, numel) of every new tensor an op makes (views left out): what a loss materialises."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(tensor, torch.Tensor) and not func.is_view:
                self.made.append((str(func), tensor.dtype, tensor.numel()))
        return out

    def full_size(self, numel: int) -> list[tuple]:
        return [(op, dtype) for op, dtype, size in self.made if size >= numel]


def test_dice_makes_no_one_hot_and_few_full_size_tensors():
    logits = (torch.randn(2, 19, 16, 32) * 3).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 19, (2, 16, 32), dtype=torch.uint8)
    target[0, :4] = 255
    with Allocations() as forward:
        loss = build_loss("dice")(logits, target)
    with Allocations() as backward:
        loss.backward()
    made = forward.full_size(logits.numel()) + backward.full_size(logits.numel())
    assert all(dtype.is_floating_point for _, dtype in made), made  # no one-hot, no [N, C, H, W] index or mask
    # the fp32 probabilities (on CPU a bf16 -> fp32 copy first: CUDA's softmax reads bf16 itself) and their masked
    # copy; smp's forward makes eight, three of them int64 (its one-hot)
    assert len(forward.full_size(logits.numel())) <= 3, forward.full_size(logits.numel())
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


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
