"""Training losses, all ignoring label 255: dice (the seed's), ce, dice+ce, OHEM ce, class-weighted ce."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss

from cityseg.config import ConfigError, LossConfig
from cityseg.labels import IGNORE_INDEX

# Cityscapes trainId class weights used by mmsegmentation's class-weighted configs (e.g. OCRNet, DeepLabV3+)
CITYSCAPES_CLASS_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


class DiceCELoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dice = DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
        self.ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

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
        pixel_loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none").flatten()
        valid = target.flatten() != IGNORE_INDEX
        if not valid.any():
            return pixel_loss.sum() * 0.0  # keeps the graph: every rank still runs backward
        with torch.no_grad():
            true_prob = torch.exp(-pixel_loss[valid])  # p(true class) = exp(-CE)
            threshold = torch.tensor(self.thresh, device=logits.device)
            if true_prob.numel() > self.min_kept:
                kth = torch.kthvalue(true_prob, self.min_kept).values
                threshold = torch.maximum(threshold, kth)
            kept = true_prob <= threshold
        return pixel_loss[valid][kept].mean()


class OutputLoss(torch.nn.Module):
    """The loss of a model's output, in float32 whatever the autocast dtype: the logits, or (main, aux) from a
    model with model.aux_head, then loss(main) + aux_weight x loss(aux) (mmseg's auxiliary head, weight 0.4)."""

    def __init__(self, loss: torch.nn.Module, aux_weight: float):
        super().__init__()
        self.loss, self.aux_weight = loss, aux_weight

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, tuple):
            main, aux = output
            return self.loss(main.float(), target) + self.aux_weight * self.loss(aux.float(), target)
        return self.loss(output.float(), target)


def build_loss(loss_cfg, num_classes: int = 19) -> torch.nn.Module:
    """The loss named by loss.name (a LossConfig, or just the name: the options' defaults then apply), taking the
    model's output as it comes (OutputLoss)."""
    if isinstance(loss_cfg, str):
        loss_cfg = LossConfig(name=loss_cfg)
    return OutputLoss(pixel_loss(loss_cfg, num_classes), loss_cfg.aux_weight)


def pixel_loss(loss_cfg, num_classes: int) -> torch.nn.Module:
    name = loss_cfg.name
    if name == "dice":
        return DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
    if name == "ce":
        return torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
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
        return torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32), ignore_index=IGNORE_INDEX)
    raise ValueError(f"loss.name: unknown loss {name!r}; expected dice, ce, dice+ce, ohem_ce or weighted_ce")
