"""The training parts built in one place: model, loss, optimizer, LR schedule, data stream and EMA, prepared."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from cityseg.data.loaders import train_stream
from cityseg.model.build import build_model, convert_sync_batchnorm
from cityseg.train.ema import attach_ema
from cityseg.train.losses import build_loss
from cityseg.train.optim import Schedule, build_optimizer


@dataclass
class Training:
    """What train_step needs, as train.py runs it; `cityseg bench` and the GPU proof time these same parts."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    schedule: Schedule
    loader: object = None  # the training stream; None where the caller feeds its own batches
    steps_per_epoch: int | None = None
    ema: object = None  # cityseg.train.ema.WeightEMA when train.ema_decay is set


def prepare_model(model_cfg, train_cfg, accelerator, num_classes: int) -> torch.nn.Module:
    """The model as trained: sync-BN across CUDA ranks when asked, channels_last memory, cuDNN autotuning."""
    model = build_model(model_cfg, num_classes)
    if model_cfg.sync_bn:
        if accelerator.device.type == "cuda" and accelerator.num_processes > 1:
            model = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
        elif accelerator.is_main_process:
            print("warning: model.sync_bn needs more than one CUDA device; training with plain BatchNorm",
                  file=sys.stderr)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training shapes are fixed: autotune each convolution once
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores, as cuDNN's convolutions
    return model


def run_length(train_cfg, loader) -> tuple[int | None, int]:
    """(optimizer steps per epoch, the schedule's total steps). Without a loader (the caller's own batches) the
    schedule spans train.max_steps, or one step."""
    if loader is None:
        return None, train_cfg.max_steps or 1
    # optimizer steps; len(loader) is per rank and accelerate also steps on an epoch's last, shorter window
    steps_per_epoch = math.ceil(len(loader) / train_cfg.grad_accum)
    # train.epochs null: iteration-based, train.max_steps alone is the schedule (epochs follow from the data)
    total_steps = train_cfg.max_steps if train_cfg.epochs is None else train_cfg.epochs * steps_per_epoch
    if train_cfg.max_steps is not None:
        total_steps = min(total_steps, train_cfg.max_steps)
    return steps_per_epoch, total_steps


def build_training(cfg, accelerator, num_classes: int, train_set=None,
                   compile_options: dict | None = None) -> Training:
    """Every part of a training step, built and prepared in the order resuming relies on (the RNG draws).

    train_set None: no loader, the caller feeds its own batches (the benchmarks' synthetic ones). compile_options:
    torch.compile's arguments under train.compile (the GPU proof's modes and backends); None: its defaults."""
    model = prepare_model(cfg.model, cfg.train, accelerator, num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    # one iterator for the run: prefetches across epoch ends
    loader = None if train_set is None else train_stream(
        cfg.data, train_set, accelerator, seed=cfg.seed, epochs=cfg.train.epochs,
        preempt_signals=cfg.train.preempt_signals)
    ema = attach_ema(accelerator, accelerator.unwrap_model(model), cfg.train.ema_decay)  # before any load_state
    if cfg.train.compile:
        model = torch.compile(model, **(compile_options or {}))
    loss_fn = build_loss(cfg.loss, num_classes).to(accelerator.device)
    if cfg.train.compile:  # the loss too: its softmax, per-class sums and their backward fuse in its own graph
        loss_fn = torch.compile(loss_fn, **(compile_options or {}))
    steps_per_epoch, total_steps = run_length(cfg.train, loader)
    schedule = Schedule.for_run(cfg, accelerator.num_processes, total_steps)
    return Training(model, optimizer, loss_fn, schedule, loader, steps_per_epoch, ema)
