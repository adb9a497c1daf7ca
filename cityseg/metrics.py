"""Segmentation metrics from one confusion matrix: IoU per class, mIoU, pixel accuracy (the Cityscapes way)."""
from __future__ import annotations

import math

import torch

from cityseg.labels import IGNORE_INDEX


def new_confusion(num_classes: int, device) -> torch.Tensor:
    return torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)


def update_confusion(confusion: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor) -> None:
    """Add one batch: rows are ground truth, columns predictions; pixels labelled 255 are left out."""
    num_classes = confusion.shape[0]
    valid = targets != IGNORE_INDEX
    pairs = targets[valid].long() * num_classes + predictions[valid].long()
    confusion += torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> list[float]:
    """TP / (TP + FP + FN) per class; NaN where a class has neither ground truth nor prediction."""
    confusion = confusion.double().cpu()
    true_pos = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_pos
    return [float(tp / u) if u > 0 else math.nan for tp, u in zip(true_pos, union)]


def mean_ignoring_nan(values) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def summarize(confusion: torch.Tensor, class_names: list[str]) -> dict:
    """The numbers a run reports: mIoU (NaN classes left out, as the official evaluator does), pixel_acc, iou."""
    ious = iou_per_class(confusion)
    total = int(confusion.sum())
    return {
        "mIoU": mean_ignoring_nan(ious),
        "pixel_acc": float(confusion.diag().sum()) / total if total else math.nan,
        "iou": dict(zip(class_names, ious)),
    }
