"""Training losses, all ignoring label 255: dice (the seed's), ce, dice+ce, OHEM ce, class-weighted ce."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from cityseg.config.schema import ConfigError, LossConfig
from cityseg.labels import IGNORE_INDEX

# Cityscapes trainId class weights used by mmsegmentation's class-weighted configs (e.g. OCRNet, DeepLabV3+)
CITYSCAPES_CLASS_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


def autocast_off(device_type: str):
    """A context without autocast: the class sums below are fp32 reductions a bf16 matmul would spoil."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext()


class SoftmaxClassSums(torch.autograd.Function):
    """Per class, over the labelled pixels: the sum of the softmax probabilities (P), of the true class's
    probability (I) and the pixel count (T), with a hand-written backward. Autograd's own would keep a full-size fp32 copy for every
    elementwise step (mask product, gather's scatter, their sum); this one reads the saved probabilities twice and
    writes the logits' gradient once, in the logits' dtype: about a third of the bytes per step."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
        batch, classes, height, width = logits.shape
        with autocast_off(logits.device.type):
            probs = torch.softmax(logits, dim=1, dtype=torch.float32)  # fp32 whatever the logits' precision
            flat = probs.view(batch, classes, height * width)
            predicted = torch.matmul(flat, valid.view(batch, -1, 1)).sum(0).view(classes)  # no masked copy
            true_prob = probs.gather(1, labels.unsqueeze(1)).view(batch, height, width) * valid
            # per class sums by index_add into one bin per (image row, class): a bin gets at most W fp32 adds
            # (exact counts, no long sequential sums), and the atomic adds spread over N*H*C addresses instead of C
            rows = torch.arange(batch * height, device=logits.device).view(batch, height, 1)
            bins = (rows * classes + labels).flatten()
            empty = torch.zeros(batch * height * classes, device=logits.device)
            intersection = empty.index_add(0, bins, true_prob.flatten()).view(-1, classes).sum(0)
            count = empty.index_add(0, bins, valid.flatten()).view(-1, classes).sum(0)  # labelled pixels per class
        ctx.save_for_backward(probs, labels, valid, true_prob)
        ctx.mark_non_differentiable(count)
        ctx.logits_dtype = logits.dtype
        return predicted, intersection, count

    @staticmethod
    def backward(ctx, grad_predicted: torch.Tensor, grad_intersection: torch.Tensor, _grad_count):
        # d/dp_c = valid * (a_c + b_c [c == label]) with a = dL/dP, b = dL/dI; through the softmax,
        # d/dlogit_c = p_c (d/dp_c - s) with s = sum_k p_k d/dp_k = valid * (sum_k a_k p_k + b_label p_label)
        probs, labels, valid, true_prob = ctx.saved_tensors
        batch, classes, height, width = probs.shape
        with autocast_off(probs.device.type):
            a, b = grad_predicted.float(), grad_intersection.float()
            flat = probs.view(batch, classes, height * width)
            b_true = b[labels]  # [N, H, W]
            s = valid * torch.matmul(a.view(1, 1, classes), flat).view(batch, height, width) + b_true * true_prob
            # factor[n, c, x] = valid a_c - s: one full-size write as a [C, 2] x [N, 2, HW] product
            left = torch.stack([a, torch.full_like(a, -1.0)], dim=1)
            factor = torch.matmul(left, torch.stack([valid, s], dim=1).view(batch, 2, -1))
            factor.scatter_add_(1, labels.view(batch, 1, -1), (b_true * valid).view(batch, 1, -1))
            grad = torch.empty(probs.shape, dtype=ctx.logits_dtype, device=probs.device)
            torch.mul(flat, factor, out=grad.view(batch, classes, -1))  # computed in fp32, written once
        return grad, None, None


class DiceLoss(torch.nn.Module):
    """smp's multiclass DiceLoss (the seed's) without its one-hot targets: 1 - the mean over classes of the soft Dice
    score over the batch's labelled pixels, 0 for a class absent from the batch. smp's forward makes eight tensors
    of the logits' size, three of them int64 (its one-hot targets); here only the fp32 probabilities are that size
    in the forward, and the backward writes the logits' gradient directly (SoftmaxClassSums)."""

    def __init__(self, smooth: float = 0.0, eps: float = 1e-7, log_loss: bool = False):
        super().__init__()
        self.smooth, self.eps, self.log_loss = smooth, eps, log_loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE_INDEX
        labels = torch.where(valid, target, 0).long()
        weight = valid.float()  # [N, H, W]: ignored pixels count nowhere
        predicted, intersection, count = SoftmaxClassSums.apply(logits, labels, weight)
        # smp's Tversky form with alpha = beta = 1/2: I + (P - I)/2 + (T - I)/2 = (P + T)/2
        score = (intersection + self.smooth) / ((predicted + count) / 2 + self.smooth).clamp_min(self.eps)
        loss = -torch.log(score.clamp_min(self.eps)) if self.log_loss else 1.0 - score
        return (loss * (count > 0)).mean()  # a class absent from the batch: Dice is undefined, counts 0


class CrossEntropy(torch.nn.Module):
    """Cross-entropy over the labelled pixels in fp32 whatever the logits' precision; class-weighted if given."""

    def __init__(self, weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target.long(), weight=self.weight, ignore_index=IGNORE_INDEX)


class DiceCELoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dice = DiceLoss()
        self.ce = CrossEntropy()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.ce(logits, target)


class OhemCELoss(torch.nn.Module):
    """Online hard example mining CE (BiSeNetV2, STDC, PIDNet; mmseg OHEMPixelSampler): only pixels whose
    probability of the true class is below `thresh` count, and at least the `min_kept` hardest labelled pixels of
    the batch (when fewer are that hard, the threshold rises to the min_kept-th smallest probability)."""

    def __init__(self, thresh: float = 0.7, min_kept: int = 100000):
        super().__init__()
        self.thresh, self.min_kept = thresh, min_kept

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pixel_loss = F.cross_entropy(logits.float(), target.long(), ignore_index=IGNORE_INDEX,
                                     reduction="none").flatten()
        valid = target.flatten() != IGNORE_INDEX
        with torch.no_grad():  # masks, not boolean indexing: the pixels are chosen on the device, no host read
            true_prob = torch.where(valid, torch.exp(-pixel_loss), torch.inf)  # p(true class) = exp(-CE)
            threshold = torch.full((), self.thresh, device=logits.device)
            if true_prob.numel() > self.min_kept:  # ignored pixels sort last: the min_kept-th labelled one
                kth = torch.kthvalue(true_prob, self.min_kept).values
                threshold = torch.where(valid.sum() > self.min_kept, torch.maximum(threshold, kth), threshold)
            kept = valid & (true_prob <= threshold)
        # none kept (nothing labelled, or nothing hard): 0 with a graph, every rank still runs backward
        return (pixel_loss * kept).sum() / kept.sum().clamp_min(1)


class OutputLoss(torch.nn.Module):
    """The loss of a model's output: the logits, or (main, aux) from a model with model.aux_head, then loss(main) +
    aux_weight x loss(aux) (mmseg's auxiliary head, weight 0.4). The pixel losses cast to float32 themselves, so no
    full-size float32 copy of bf16 logits is made here."""

    def __init__(self, loss: torch.nn.Module, aux_weight: float):
        super().__init__()
        self.loss, self.aux_weight = loss, aux_weight

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, tuple):
            main, aux = output
            return self.loss(main, target) + self.aux_weight * self.loss(aux, target)
        return self.loss(output, target)


def build_loss(loss_cfg, num_classes: int = 19) -> torch.nn.Module:
    """The loss named by loss.name (a LossConfig, or just the name: the options' defaults then apply), taking the
    model's output as it comes (OutputLoss)."""
    if isinstance(loss_cfg, str):
        loss_cfg = LossConfig(name=loss_cfg)
    return OutputLoss(pixel_loss(loss_cfg, num_classes), loss_cfg.aux_weight)


def pixel_loss(loss_cfg, num_classes: int) -> torch.nn.Module:
    name = loss_cfg.name
    if name == "dice":
        return DiceLoss()
    if name == "ce":
        return CrossEntropy()
    if name == "dice+ce":
        return DiceCELoss()
    if name == "ohem_ce":
        return OhemCELoss(loss_cfg.ohem_thresh, loss_cfg.ohem_min_kept)
    if name == "weighted_ce":
        weights = loss_cfg.class_weights
        if weights is None:
            if num_classes != len(CITYSCAPES_CLASS_WEIGHTS):
                raise ConfigError(f"loss.class_weights: the Cityscapes table has 19 weights but the model has "
                                 f"{num_classes} classes; list {num_classes} weights")
            weights = CITYSCAPES_CLASS_WEIGHTS
        if len(weights) != num_classes:
            raise ConfigError(f"loss.class_weights: {len(weights)} weights for {num_classes} classes")
        return CrossEntropy(torch.tensor(weights, dtype=torch.float32))
    raise ValueError(f"loss.name: unknown loss {name!r}; expected dice, ce, dice+ce, ohem_ce or weighted_ce")
