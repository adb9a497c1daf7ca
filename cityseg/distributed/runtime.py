"""The Accelerator built from the config: precision, accumulation, non-blocking copies, process-group timeout."""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

from cityseg.config.schema import ConfigError


def check_mixed_precision(mixed_precision: str, cuda: bool) -> None:
    if mixed_precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU (accelerate would silently run fp32 on "
                          "the CPU); use bf16 on the CPU")


def make_accelerator(cfg) -> Accelerator:
    """One Accelerator for train, evaluate, predict and bench; refuses launches that would silently misbehave."""
    check_mixed_precision(cfg.train.mixed_precision, torch.cuda.is_available())
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        # the training order is cityseg.data.sampler.EpochSampler's (resumable at any sample, any world size);
        # the seedable sampler keeps any other shuffled loader replayable too
        # non_blocking: pinned batches reach the GPU without the host waiting (the loader time is then host time)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist.timeout_minutes))],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise ConfigError(f"the launcher started {launched} processes but accelerate found no GPU, so each would "
                          "train alone on all the data: set ACCELERATE_USE_CPU=1 to train on CPU processes over gloo")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_precision not in ("no", cfg.train.mixed_precision) and accelerator.is_main_process:
        print(f"warning: the launcher's mixed precision '{launcher_precision}' is ignored; the config's "
              f"train.mixed_precision '{cfg.train.mixed_precision}' applies", file=sys.stderr)
    return accelerator
