"""Exponential moving average of the weights: updated after each optimizer step, evaluated, saved in checkpoints."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cityseg.checkpoint import (
    EMA_FILE,
    EMA_RANK_FILE,
    CheckpointError,
    load_rank_buffers,
    save_rank_buffers,
)


class WeightEMA:
    """A frozen copy of the model whose floating-point weights and buffers follow the trained ones:
    ema = d * ema + (1 - d) * weights, with d = min(decay, (1 + step) / (10 + step)) so early averages are not
    dominated by the random init (timm's warmup). d is a pure function of the step: resuming is exact."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # pairs of (average, live tensor), made once: parameters and buffers are updated in place (optimizer step,
        # load_state on resume), so the views stay valid and a step builds no dicts
        trained = model.state_dict()
        self.floats, self.sources, self.others, self.other_sources = [], [], [], []
        for name, average in self.module.state_dict().items():
            if average.is_floating_point():
                self.floats.append(average)
                self.sources.append(trained[name])
            else:  # e.g. BatchNorm's num_batches_tracked
                self.others.append(average)
                self.other_sources.append(trained[name])

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(self.floats, self.sources, 1.0 - self.decay_at(step))  # fused, no host read
        if self.others:  # one launch instead of one per BatchNorm counter
            torch._foreach_copy_(self.others, self.other_sources)

    def save(self, directory: str | Path) -> None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.module.state_dict().items()}
        save_file(state, str(Path(directory) / EMA_FILE), metadata={"format": "pt"})

    def save_rank_buffers(self, directory: str | Path, rank: int) -> None:
        """A rank other than the main one saves its own floating-point buffers (its BatchNorm statistics)."""
        save_rank_buffers(self.module, Path(directory) / EMA_RANK_FILE.format(rank=rank), floating_only=True)

    def load(self, directory: str | Path, rank: int = 0) -> None:
        """The main file, then this rank's own buffers where the checkpoint has them (same world size)."""
        self._load(Path(directory) / EMA_FILE, strict=True)
        load_rank_buffers(self.module, Path(directory), rank, EMA_RANK_FILE)

    def _load(self, path: Path, strict: bool) -> None:
        if not path.is_file():  # resume_check refuses a config that turned EMA on since: this checkpoint lost it
            raise CheckpointError(f"{path}: missing; the run keeps an EMA (train.ema_decay) but this checkpoint "
                                  "has none")
        try:
            state = load_file(str(path), device="cpu")
            unexpected = set(state) - set(self.module.state_dict())
            if unexpected:
                raise KeyError(f"unexpected {sorted(unexpected)[0]}")
            self.module.load_state_dict(state, strict=strict)
        except Exception as err:  # noqa: BLE001 - a foreign or truncated file
            raise CheckpointError(f"{path}: cannot be loaded as this run's EMA weights "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def attach_ema(accelerator, model: torch.nn.Module, decay: float | None) -> WeightEMA | None:
    """The EMA of the bare `model` (None when train.ema_decay is null), saved into / loaded from every checkpoint
    by accelerate's save/load hooks (as safetensors: accelerate's own custom-state files are pickles)."""
    if decay is None:
        return None
    ema = WeightEMA(model, decay)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save(output_dir)
        else:
            ema.save_rank_buffers(output_dir, accelerator.process_index)

    def load_hook(models, input_dir):
        ema.load(input_dir, accelerator.process_index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return ema
