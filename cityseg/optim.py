"""The optimizer and the learning-rate schedule (a pure function of the step, so resuming needs no scheduler state)."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """Parameters split by (encoder or head) x (decayed or not); each group carries its LR multiplier.

    The first group is the encoder's decayed weights (multiplier 1): the LR logged is that group's. With
    optim.no_decay_norm_bias, 1-d parameters (biases, BatchNorm / LayerNorm scales) get no weight decay, as in
    mmsegmentation's SegFormer and timm recipes: decaying a norm's scale towards 0 only fights the normalization.
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # one group when nothing differs: the optimizer state of earlier runs' checkpoints still loads
        head = optim_cfg.head_lr_mult != 1.0 and not name.removeprefix("module.").startswith("encoder.")
        no_decay = optim_cfg.no_decay_norm_bias and param.ndim <= 1
        key = (head, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else optim_cfg.weight_decay,
                           "lr_mult": optim_cfg.head_lr_mult if head else 1.0}
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]  # (False, False) first: the encoder's decayed weights


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """AdamW (the seed's) or SGD with momentum; the LR is set every step by set_lr(lr_at(step))."""
    groups = param_groups(model, optim_cfg)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov,
                               weight_decay=optim_cfg.weight_decay, fused=True)
    # fused: one kernel per step, and it takes a device-side found_inf, so a NaN step is skipped without a host read
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, fused=True)


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
        group["lr"] = lr * group.get("lr_mult", 1.0)


def scaled_lr_factor(world_size: int, reference_world_size: int | None) -> float:
    """The linear scaling rule (Goyal et al. 2017): a recipe's LR is for its reference GPU count; another world
    size changes the global batch by world / reference, and the LR by the same factor."""
    if reference_world_size is None or world_size == reference_world_size:
        return 1.0
    return world_size / reference_world_size
