"""Metrics as rich tables: a validation's IoU per class, and `cityseg evaluate`'s classes and categories."""
from __future__ import annotations

import math

from rich.table import Table


def iou_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in metrics["iou"].items():
        table.add_row(name, "n/a" if math.isnan(value) else f"{value:.4f}")
    table.add_row("[bold]mIoU", f"[bold]{metrics['mIoU']:.4f}")
    table.add_row("pixel acc", f"{metrics['pixel_acc']:.4f}")
    return table


def _score(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def benchmark_tables(metrics: dict) -> list[Table]:
    """`cityseg evaluate`'s tables: classes (IoU, iIoU where measured), then categories, each with its mean."""
    tables = []
    for level, iou_key, iiou_key, mean_key, imean_key in (("class", "iou", "iiou", "mIoU", "iIoU"),
                                                         ("category", "category_iou", "category_iiou",
                                                          "category_mIoU", "category_iIoU")):
        table = Table()
        table.add_column(level)
        table.add_column("IoU", justify="right")
        instance = metrics.get(iiou_key)
        if instance is not None:
            table.add_column("iIoU", justify="right")
        for name, value in metrics[iou_key].items():
            table.add_row(name, _score(value), *([_score(instance.get(name))] if instance is not None else []))
        table.add_row(f"[bold]{'mIoU' if level == 'class' else 'mean'}", f"[bold]{_score(metrics[mean_key])}",
                      *([f"[bold]{_score(metrics[imean_key])}"] if instance is not None else []))
        if level == "class":
            table.add_row("pixel acc", _score(metrics["pixel_acc"]), *([""] if instance is not None else []))
        tables.append(table)
    return tables
