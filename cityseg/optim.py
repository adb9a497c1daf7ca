"""The optimizer and the learning-rate schedule (a pure function of the step, so resuming needs no scheduler state)."""
from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def lr_at(step: int, total_steps: int, optim_cfg) -> float:
    """Warmup then poly decay, a pure function of the step: resuming the step resumes the schedule."""
    if step < optim_cfg.warmup_steps:
        return optim_cfg.lr * (step + 1) / optim_cfg.warmup_steps
    if optim_cfg.schedule == "constant":
        return optim_cfg.lr
    progress = min(1.0, (step - optim_cfg.warmup_steps) / max(1, total_steps - optim_cfg.warmup_steps))
    return optim_cfg.lr * (1.0 - progress) ** optim_cfg.poly_power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
