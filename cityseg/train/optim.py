"""The optimizer and the learning-rate schedule (a pure function of the step, so resuming needs no scheduler state)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """Parameters split by (encoder or head) x (decayed or not); each group carries its LR multiplier.

    The first group is the encoder's decayed weights (multiplier 1): the LR logged is that group's. With
    optim.no_decay_norm_bias, 1-d parameters (biases, BatchNorm / LayerNorm scales) get no weight decay, as in
    timm recipes: decaying a norm's scale towards 0 only fights the normalization. optim.no_decay_keys exempts the
    parameters whose name contains one of them, as mmsegmentation's paramwise custom_keys with decay_mult 0
    (SegFormer: "norm", the encoder's LayerNorms; biases and the decoder's BatchNorm are decayed).
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # one group when nothing differs: the optimizer state of earlier runs' checkpoints still loads
        head = optim_cfg.head_lr_mult != 1.0 and not name.removeprefix("module.").startswith("encoder.")
        no_decay = (optim_cfg.no_decay_norm_bias and param.ndim <= 1) or any(
            key in name for key in optim_cfg.no_decay_keys)
        key = (head, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else optim_cfg.weight_decay,
                           "lr_mult": optim_cfg.head_lr_mult if head else 1.0}
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]  # (False, False) first: the encoder's decayed weights


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """AdamW (the seed's) or SGD with momentum; the LR is set every step by set_lr(Schedule.lr(step))."""
    groups = param_groups(model, optim_cfg)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov,
                               weight_decay=optim_cfg.weight_decay, fused=True)
    # fused: one kernel per step, and it takes a device-side found_inf, so a NaN step is skipped without a host read
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, fused=True)


def lr_at(step: int, total_steps: int, optim_cfg) -> float:
    """Warmup then poly decay of optim.lr, a pure function of the step: resuming the step resumes the schedule.
    A run's LR is Schedule.lr, which also applies the global-batch factor."""
    if step < optim_cfg.warmup_steps:
        return optim_cfg.lr * (step + 1) / optim_cfg.warmup_steps
    if optim_cfg.schedule == "constant":
        return optim_cfg.lr
    progress = min(1.0, (step - optim_cfg.warmup_steps) / max(1, total_steps - optim_cfg.warmup_steps))
    floor = min(optim_cfg.min_lr, optim_cfg.lr)  # mmseg PolyLR's eta_min: the decay ends there, not at 0
    return (optim_cfg.lr - floor) * (1.0 - progress) ** optim_cfg.poly_power + floor


@dataclass(frozen=True)
class Schedule:
    """The LR of every step of one run, decided once: lr_at's warmup and decay to optim.min_lr, times the factor
    for the run's global batch (lr_scaling); `note` is lr_scaling's warning, None when nothing differs."""
    optim_cfg: object
    total_steps: int
    scale: float = 1.0
    note: str | None = None

    @classmethod
    def for_run(cls, cfg, processes: int, total_steps: int) -> "Schedule":
        scale, note = lr_scaling(cfg, processes)
        return cls(cfg.optim, total_steps, scale, note)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.optim_cfg) * self.scale


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def lr_scaling(cfg, processes: int) -> tuple[float, str | None]:
    """(factor on optim.lr, warning or None) for this run's global batch against the recipe's.

    Global batch = data.batch_size x processes x train.grad_accum. A recipe's optim.lr is for its
    train.reference_global_batch; by default (optim.lr_scaling none, as mmsegmentation's auto_scale_lr) the LR is
    kept and a warning names the difference and how to match it. `linear` (Goyal et al. 2017, for SGD) or `sqrt`
    (the rule usually taken for Adam-type optimizers) rescale it; linear on AdamW says so.
    """
    batch, accum, reference = cfg.data.batch_size, cfg.train.grad_accum, cfg.train.reference_global_batch
    global_batch = batch * processes * accum
    if reference is None or global_batch == reference:
        return 1.0, None
    shape = (f"global batch {global_batch} (data.batch_size {batch} x {processes} processes x train.grad_accum "
             f"{accum}) differs from the recipe's train.reference_global_batch {reference}")
    mode = cfg.optim.lr_scaling
    if mode == "none":
        return 1.0, (f"warning: {shape}; optim.lr {cfg.optim.lr:g} is used as it is (optim.lr_scaling none): "
                     f"{_how_to_match(reference, processes, batch)}, or set optim.lr_scaling=linear")
    factor = global_batch / reference if mode == "linear" else math.sqrt(global_batch / reference)
    note = f"warning: {shape}; optim.lr {cfg.optim.lr:g} scaled ({mode}) by {factor:g} to {cfg.optim.lr * factor:g}"
    if mode == "linear" and cfg.optim.name == "adamw":
        note += " (the linear rule is SGD's; for AdamW optim.lr_scaling=sqrt is the usual choice)"
    return factor, note


def _how_to_match(reference: int, processes: int, batch: int) -> str:
    if reference % processes:
        return f"to train as the recipe, make data.batch_size x processes x train.grad_accum = {reference}"
    per_process = reference // processes
    accum = f" or data.batch_size={batch} train.grad_accum={per_process // batch}" if per_process % batch == 0 else ""
    return f"to train as the recipe, set data.batch_size={per_process} train.grad_accum=1{accum}"
