"""One training step that never waits on the host: forward, backward, and an update skipped on device if not finite."""
from __future__ import annotations

import torch
import torch.distributed as dist

from cityseg.data.device_augment import augment_with_theta
from cityseg.train.optim import set_lr

# StepStats.totals: counters since the last read, all on the device
LOSS_SUM, LOSS_COUNT, NAN_STEPS, SCALER_STEPS, FIRST_NAN_STEP, GRAD_NORM_SUM, STEPS = range(7)


class StepStats:
    """Per-step numbers accumulated on the device and read on the host only when asked (every train.log_every
    steps, before a save, at an epoch's end): the steady-state step makes no device->host read."""

    def __init__(self, device):
        self.device = device
        self.window = torch.zeros(3, device=device)  # this accumulation window: loss sum, finite, non-finite
        self.totals = torch.zeros(7, device=device)
        self.totals[FIRST_NAN_STEP] = -1
        self.pending = self.empty()  # host side: what poll() has read and take() not yet reported

    def add_micro_batch(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.window += torch.stack([torch.where(finite, loss.float(), 0.0), finite.float(), (~finite).float()])

    def agree_window(self, accelerator) -> torch.Tensor:
        """Sum the window over ranks (a device all-reduce, never read here); True where any loss was not finite."""
        if accelerator.num_processes > 1:
            dist.all_reduce(self.window)
        return self.window[2] > 0

    def end_step(self, nan_skip: torch.Tensor, scaler_skip: torch.Tensor, grad_norm: torch.Tensor,
                 step_index: int) -> None:
        first = self.totals[FIRST_NAN_STEP]
        update = torch.stack([self.window[0], self.window[1], nan_skip.float(), scaler_skip.float(),
                              torch.where(nan_skip & (first < 0), step_index - first, 0.0),
                              torch.where(torch.isfinite(grad_norm), grad_norm.float(), 0.0),
                              torch.ones((), device=self.device)])
        self.totals += update
        self.window.zero_()

    def poll(self) -> dict:
        """Move the device counters into the host-side totals (one device->host copy); returns those totals."""
        values = self.totals.tolist()
        self.totals.zero_()
        self.totals[FIRST_NAN_STEP] = -1
        if self.pending["first_nan_step"] is None and values[FIRST_NAN_STEP] >= 0:
            self.pending["first_nan_step"] = int(values[FIRST_NAN_STEP])
        for key, index in (("loss_sum", LOSS_SUM), ("loss_count", LOSS_COUNT), ("nan_skipped", NAN_STEPS),
                           ("scaler_skipped", SCALER_STEPS), ("grad_norm_sum", GRAD_NORM_SUM), ("steps", STEPS)):
            self.pending[key] += values[index]
        return self.pending

    def take(self) -> dict:
        """The numbers of the steps since the last take: mean loss (over ranks and micro-batches), skip counts,
        mean gradient norm of the applied steps."""
        totals = self.poll()
        self.pending = self.empty()
        applied = totals["steps"] - totals["nan_skipped"] - totals["scaler_skipped"]
        return {"loss": totals["loss_sum"] / totals["loss_count"] if totals["loss_count"] else float("nan"),
                "grad_norm": totals["grad_norm_sum"] / applied if applied else float("nan"),
                "nan_skipped": int(totals["nan_skipped"]), "scaler_skipped": int(totals["scaler_skipped"]),
                "first_nan_step": totals["first_nan_step"]}

    @staticmethod
    def empty() -> dict:
        return {"loss_sum": 0.0, "loss_count": 0.0, "nan_skipped": 0.0, "scaler_skipped": 0.0,
                "grad_norm_sum": 0.0, "steps": 0.0, "first_nan_step": None}


def device_batch(images: torch.Tensor, masks: torch.Tensor, extra, data_cfg, channels_last: bool):
    """A loader batch as train_step takes it: cached uint8 samples augmented on the device with the parameters
    (theta) drawn in the workers, and images in channels_last memory under train.channels_last."""
    if data_cfg.cache.dir and data_cfg.cache.device_augment:
        images, masks = augment_with_theta(images, masks, extra, data_cfg)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks


def gradient_norm(accelerator, model, grad_clip: float | None) -> torch.Tensor:
    """The total gradient norm (unscaled under fp16), clipping to grad_clip when set; a device tensor."""
    if grad_clip:
        return accelerator.clip_grad_norm_(model.parameters(), grad_clip)  # unscales first under fp16
    accelerator.unscale_gradients()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=accelerator.device)


def masked_update(accelerator, optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() whose effect is cancelled on the device where skip is True (weights, moments and step
    count unchanged), as GradScaler does: fused optimizers take a found_inf tensor."""
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    scaler = accelerator.scaler
    if scaler is not None:  # fp16: GradScaler hands its found_inf to the fused step; add the NaN-loss verdict
        for found in scaler._per_optimizer_states[id(inner)]["found_inf_per_device"].values():
            found.add_(skip.to(found.device, found.dtype))
        optimizer.step()
        return
    if getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf, inner.grad_scale = skip.float(), None
        try:
            optimizer.step()
        finally:
            del inner.found_inf, inner.grad_scale
        return
    if not skip.item():  # an optimizer without a fused kernel: one host read decides
        optimizer.step()


def scaler_found_inf(accelerator, optimizer) -> torch.Tensor:
    """fp16: whether GradScaler found overflowing gradients this step (it then skips the step and backs off)."""
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    found = accelerator.scaler._per_optimizer_states[id(inner)]["found_inf_per_device"].values()
    return torch.stack([f.to(accelerator.device) for f in found]).sum() > 0


def train_step(accelerator, model, optimizer, loss_fn, images, masks, lr: float, grad_clip: float | None,
               stats: StepStats, step_index: int) -> None:
    """One forward / backward in accelerate's accumulation and autocast contexts; on the window's last micro-batch
    the update, skipped on every rank (they agree through one device all-reduce) when a loss was not finite."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = loss_fn(model(images), masks)  # the loss casts what it needs (fp32 softmax, long labels)
        stats.add_micro_batch(loss.detach())
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            loss_nonfinite = stats.agree_window(accelerator)
            grad_norm = gradient_norm(accelerator, model, grad_clip)  # gradients are the same on every rank
            if accelerator.scaler is not None:  # fp16: overflow is the scaler's business, not a NaN step
                scaler_skip, nan_skip = scaler_found_inf(accelerator, optimizer) & ~loss_nonfinite, loss_nonfinite
            else:
                scaler_skip = torch.zeros_like(loss_nonfinite)  # on the loss's device, as every counter
                nan_skip = loss_nonfinite | ~torch.isfinite(grad_norm)
            set_lr(optimizer, lr)
            masked_update(accelerator, optimizer, nan_skip)
            stats.end_step(nan_skip, scaler_skip, grad_norm, step_index)
        optimizer.zero_grad(set_to_none=True)
