"""Training losses: dice (the seed's), cross-entropy, or their sum — all ignoring label 255."""
from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss

from cityseg.labels import IGNORE_INDEX


class DiceCELoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dice = DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
        self.ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.ce(logits, target)


def build_loss(name: str) -> torch.nn.Module:
    if name == "dice":
        return DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
    if name == "ce":
        return torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    if name == "dice+ce":
        return DiceCELoss()
    raise ValueError(f"loss.name: unknown loss {name!r}; expected dice, ce or dice+ce")
