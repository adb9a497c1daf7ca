"""One training step: forward, loss, backward, optimizer.step() (what engine runs and `cityseg bench` times)."""
from __future__ import annotations

import torch

from cityseg.optim import set_lr
from cityseg.preemption import sum_across_ranks


def train_step(accelerator, model, optimizer, loss_fn, images, masks, lr: float, grad_clip: float | None,
               stop_requested: bool) -> list[float]:
    """One forward / backward / update in accelerate's accumulation and autocast contexts. Returns
    [nonfinite, stop_count, loss_sum] agreed by all ranks; a non-finite loss skips the update on every rank."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), masks.long())
        agreed = sum_across_ranks(accelerator, [~torch.isfinite(loss.detach()), stop_requested, loss.detach()])
        if agreed[0]:
            optimizer.zero_grad(set_to_none=True)
            return agreed
        accelerator.backward(loss)
        if accelerator.sync_gradients and grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return agreed
