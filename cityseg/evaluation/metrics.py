"""Segmentation metrics from one confusion matrix: IoU, mIoU, pixel accuracy, category IoU, iIoU (the Cityscapes way)."""
from __future__ import annotations

import math

import torch

from cityseg.labels import (
    CATEGORIES,
    EVAL_CLASSES,
    IGNORE_INDEX,
    INSTANCE_CLASS_NAMES,
    category_lut,
)


def new_confusion(num_classes: int, device) -> torch.Tensor:
    return torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)


def update_confusion(confusion: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor) -> None:
    """Add one batch: rows are ground truth, columns predictions; pixels labelled 255 are left out."""
    num_classes = confusion.shape[0]
    valid = targets != IGNORE_INDEX
    pairs = targets[valid].long() * num_classes + predictions[valid].long()
    confusion += torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


@torch.inference_mode()
def confusion_over(model, loader, accelerator, num_classes: int, predict=None) -> torch.Tensor:
    """This rank's confusion matrix over its shard, summed over all ranks (each sample counted once)."""
    model.eval()
    confusion = new_confusion(num_classes, accelerator.device)
    for images, masks, _ in loader:
        images, masks = images.to(accelerator.device), masks.to(accelerator.device)
        with accelerator.autocast():
            logits = predict(images, masks.shape[-2:]) if predict else model(images)
        update_confusion(confusion, logits.argmax(1), masks)
    return accelerator.reduce(confusion, reduction="sum") if accelerator.num_processes > 1 else confusion


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


# The official evaluator's instance-size normalizer (cityscapesscripts evalPixelLevelSemanticLabeling.avgClassSize):
# an instance's pixels are weighted by (average size of its class) / (its size), so small objects count as much.
AVG_INSTANCE_SIZE = {"person": 3462.4756337644, "rider": 3930.4788056518, "car": 12794.0202738185,
                     "truck": 27855.1264367816, "bus": 35732.1511111111, "train": 67583.7075812274,
                     "motorcycle": 6298.7200839748, "bicycle": 4672.3249222261}
INSTANCE_CATEGORIES = ("human", "vehicle")  # the categories whose classes all have instances


def _offset(scheme: str) -> int:
    return 0 if scheme == "trainid19" else 1  # seed20: index 0 is 'unlabelled' (void)


def new_instance_stats(device) -> torch.Tensor:
    """Rows: the 8 instance classes then the 2 instance categories; columns: weighted TP, weighted FN."""
    return torch.zeros(len(INSTANCE_CLASS_NAMES) + len(INSTANCE_CATEGORIES), 2, dtype=torch.float64, device=device)


def _instance_tables(scheme: str, device):
    """Label id → row of the instance stats (-1: not an evaluated instance class), its training index, weight;
    training index → category row (-1: none)."""
    offset, rows = _offset(scheme), {name: i for i, name in enumerate(INSTANCE_CLASS_NAMES)}
    row_of_id = torch.full((256,), -1, dtype=torch.long)
    index_of_id = torch.full((256,), -1, dtype=torch.long)
    size_of_id = torch.ones(256, dtype=torch.float64)
    category_of_index = torch.full((256,), -1, dtype=torch.long)
    for c in EVAL_CLASSES:
        if c.category in INSTANCE_CATEGORIES:
            category_of_index[c.train_id + offset] = INSTANCE_CATEGORIES.index(c.category)
        if c.name in rows:
            row_of_id[c.id], index_of_id[c.id], size_of_id[c.id] = rows[c.name], c.train_id + offset, \
                AVG_INSTANCE_SIZE[c.name]
    return [table.to(device) for table in (row_of_id, index_of_id, size_of_id, category_of_index)]


def update_instance_stats(stats: torch.Tensor, prediction: torch.Tensor, instance_ids: torch.Tensor,
                          scheme: str) -> None:
    """Add one image, as the official evaluator does: each instance (id*1000+k > 1000 in *_instanceIds.png) adds
    its correctly / wrongly predicted pixels times avg_size(class) / size(instance), for its class and category."""
    row_of_id, index_of_id, size_of_id, category_of_index = _instance_tables(scheme, prediction.device)
    inside = instance_ids > 1000
    ids, predicted = instance_ids[inside].long(), prediction[inside].long()
    instances, which = torch.unique(ids, return_inverse=True)
    label_ids = instances // 1000
    keep = row_of_id[label_ids] >= 0  # instances of classes outside the 8 (caravan, trailer) do not count
    sizes = torch.bincount(which, minlength=len(instances)).double()
    hits = torch.bincount(which, weights=(predicted == index_of_id[label_ids][which]).double(),
                          minlength=len(instances))
    instance_category = category_of_index[index_of_id[label_ids].clamp(min=0)]
    category_hits = torch.bincount(which, weights=(category_of_index[predicted] == instance_category[which]).double(),
                                   minlength=len(instances))
    weights = size_of_id[label_ids] / sizes
    for row, tp in ((row_of_id[label_ids], hits), (len(INSTANCE_CLASS_NAMES) + instance_category, category_hits)):
        stats[:, 0].index_add_(0, row[keep], (tp * weights)[keep])
        stats[:, 1].index_add_(0, row[keep], ((sizes - tp) * weights)[keep])


def _iou_with_void(confusion: torch.Tensor, groups: torch.Tensor, num_groups: int) -> list[float]:
    """IoU per group after summing classes into groups; group num_groups is void: its ground truth rows are
    dropped and predictions of it count only as misses (false negatives), as in the official evaluator."""
    size = num_groups + 1
    pairs = groups[:, None] * size + groups[None, :]
    grouped = torch.bincount(pairs.flatten(), weights=confusion.flatten(), minlength=size * size).view(size, size)
    grouped[num_groups] = 0
    return iou_per_class(grouped)[:num_groups]


def benchmark_scores(confusion: torch.Tensor, scheme: str, instance_stats: torch.Tensor | None = None) -> dict:
    """The official Cityscapes numbers from one confusion matrix (rows ground truth, columns predictions, in the
    scheme's indices): IoU of the 19 classes and 7 categories, their means with NaN (absent) ones left out,
    pixel accuracy over non-void pixels, and with instance stats the iIoU of the 8 instance classes and 2 categories."""
    confusion = confusion.double().cpu()
    offset, num_eval = _offset(scheme), len(EVAL_CLASSES)
    class_group = torch.tensor([num_eval] * offset + list(range(num_eval)))  # seed20 'unlabelled' → void
    category_group = torch.tensor(category_lut(scheme)[: len(class_group)].astype("int64")).clamp(max=len(CATEGORIES))
    ious = _iou_with_void(confusion, class_group, num_eval)
    category_ious = _iou_with_void(confusion, category_group, len(CATEGORIES))
    valid = confusion[offset:]  # rows of non-void ground truth
    total = float(valid.sum())
    names = [c.name for c in EVAL_CLASSES]
    scores = {
        "mIoU": mean_ignoring_nan(ious),
        "pixel_acc": float(valid[:, offset:].diagonal().sum()) / total if total else math.nan,
        "iou": dict(zip(names, ious)),
        "category_mIoU": mean_ignoring_nan(category_ious),
        "category_iou": {name: value for (_, name), value in zip(CATEGORIES, category_ious)},
    }
    if instance_stats is not None:
        stats = instance_stats.double().cpu()
        predicted = confusion[offset:].sum(0)[offset:]  # per class, over non-void ground truth
        false_pos = predicted - confusion.diagonal()[offset:]
        iiou = {}
        for row, name in enumerate(INSTANCE_CLASS_NAMES):
            tp, fn = stats[row].tolist()
            denominator = tp + fn + float(false_pos[names.index(name)])
            iiou[name] = tp / denominator if denominator > 0 else math.nan
        category_iiou = {}
        for row, category in enumerate(INSTANCE_CATEGORIES):
            tp, fn = stats[len(INSTANCE_CLASS_NAMES) + row].tolist()
            members = [names.index(c.name) for c in EVAL_CLASSES if c.category == category]
            inside = confusion[offset:][:, [m + offset for m in members]]
            outside_rows = [i for i in range(num_eval) if i not in members]
            false_pos_category = float(inside[outside_rows].sum())
            denominator = tp + fn + false_pos_category
            category_iiou[category] = tp / denominator if denominator > 0 else math.nan
        scores.update(iIoU=mean_ignoring_nan(iiou.values()), iiou=iiou,
                      category_iIoU=mean_ignoring_nan(category_iiou.values()), category_iiou=category_iiou)
    return scores
