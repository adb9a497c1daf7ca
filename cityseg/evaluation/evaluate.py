"""`cityseg evaluate`: saved weights on a split, at the training size or the labels' full resolution, sharded."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import cv2
import torch

from cityseg.checkpoint import load_weights
from cityseg.data.cityscapes import LABEL_SUFFIX, DataError
from cityseg.data.loaders import eval_dataset, eval_loader
from cityseg.data.normalization import resolve_normalization
from cityseg.distributed.runtime import make_accelerator
from cityseg.evaluation.inference import segment_logits, upsampled_argmax
from cityseg.evaluation.metrics import (
    benchmark_scores,
    confusion_over,
    new_confusion,
    new_instance_stats,
    update_confusion,
    update_instance_stats,
)
from cityseg.labels import class_names
from cityseg.model.build import build_model

INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
AUG_TEST_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # mmsegmentation's Cityscapes aug test (img_ratios), with flip


def instance_path(label_path: Path) -> Path:
    return label_path.with_name(label_path.name[: -len(LABEL_SUFFIX)] + INSTANCE_SUFFIX)


def read_instance_ids(path: Path) -> torch.Tensor:
    """(H, W) int32 of *_gtFine_instanceIds.png: id * 1000 + k for instances, the label id elsewhere."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 2:
        raise DataError(f"{path}: cannot decode instance ids (expected a one-channel 16-bit PNG)")
    return torch.from_numpy(raw.astype("int32"))


@torch.inference_mode()
def full_resolution_pass(model, loader, dataset, accelerator, cfg, with_instances: bool):
    """Confusion (and iIoU stats) of this rank's shard with logits upsampled to each label's own size, summed
    over ranks: the benchmark protocol."""
    model.eval()
    device, scheme = accelerator.device, cfg.data.label_scheme
    confusion = new_confusion(len(class_names(scheme)), device)
    instance_stats = new_instance_stats(device)
    for images, masks, indices in loader:
        images, masks = images.to(device), masks.to(device)
        with accelerator.autocast():
            logits = segment_logits(model, images, cfg.data.image_size, cfg.eval)
        predictions = upsampled_argmax(logits.float(), masks.shape[-2:])
        update_confusion(confusion, predictions, masks)
        if with_instances:
            for prediction, index in zip(predictions, indices.tolist()):
                instance_ids = read_instance_ids(instance_path(dataset.pairs[index][1])).to(device)
                update_instance_stats(instance_stats, prediction, instance_ids, scheme)
    if accelerator.num_processes > 1:
        confusion = accelerator.reduce(confusion, reduction="sum")
        instance_stats = accelerator.reduce(instance_stats, reduction="sum")
    return confusion, instance_stats


def evaluate(cfg, weights: str | Path, split: str | None = None, aug_test: bool = False) -> dict:
    """Metrics of saved weights on a split per eval.* (mode, sliding, flip, scales); every rank returns the same
    dict. aug_test: multi-scale + flip as mmsegmentation's aug test (eval.scales = AUG_TEST_SCALES, eval.flip)."""
    if aug_test:  # a copy: the caller's config is left as it was
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, scales=list(AUG_TEST_SCALES), flip=True))
    resolve_normalization(cfg.data, cfg.model)  # a run's config.yaml records it; a config given by hand: the encoder's
    accelerator = make_accelerator(cfg)
    scheme, full = cfg.data.label_scheme, cfg.eval.mode == "full"
    names = class_names(scheme)
    dataset = eval_dataset(cfg.data, cfg.seed, split, full_resolution=full)
    model = build_model(cfg.model, len(names))
    load_weights(model, weights)
    model.to(accelerator.device)
    # full-resolution images differ in size outside Cityscapes proper, and a batch of them is large: one at a time
    loader = eval_loader(cfg.data, dataset, accelerator.process_index, accelerator.num_processes,
                         preempt_signals=cfg.train.preempt_signals, batch_size=1 if full else None)
    instance_stats = None
    if full:
        with_instances = all(instance_path(label).is_file() for _, label in dataset.pairs)
        if not with_instances and accelerator.is_main_process:
            print(f"note: not every label has its {INSTANCE_SUFFIX}: iIoU is not reported", file=sys.stderr)
        confusion, instance_stats = full_resolution_pass(model, loader, dataset, accelerator, cfg, with_instances)
        instance_stats = instance_stats if with_instances else None
    else:
        def predict(images, size):
            return segment_logits(model, images, size, cfg.eval)
        confusion = confusion_over(model, loader, accelerator, len(names), predict=predict)
    return {"split": split or cfg.data.val_split, "images": len(dataset), "processes": accelerator.num_processes,
            "mode": cfg.eval.mode,
            "sliding": cfg.eval.sliding, "flip": cfg.eval.flip, "scales": list(cfg.eval.scales),
            **benchmark_scores(confusion, scheme, instance_stats)}
