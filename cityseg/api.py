"""Segment from Python: load a run once, predict on image arrays or batch tensors, as `cityseg evaluate` does.

    from cityseg.api import Segmenter
    segmenter = Segmenter.load("runs/demo", overrides=["eval.flip=true"])
    train_ids = segmenter.predict(rgb)            # (H, W) uint8 from an (H, W, 3) uint8 RGB array
    colours = segmenter.colorize(train_ids)       # (H, W, 3) uint8, the official Cityscapes colours
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from cityseg.checkpoint import CheckpointError, load_weights
from cityseg.config.load import load_config, run_config_path
from cityseg.config.schema import Config
from cityseg.data.normalization import resolve_normalization
from cityseg.data.transforms import normalization
from cityseg.evaluation.inference import segment_logits, upsampled_argmax
from cityseg.labels import class_names, colorize, to_label_ids_lut
from cityseg.model.build import build_model

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def weights_path(path: str | Path) -> Path:
    """A run directory means its exported model.safetensors; a checkpoint directory or a file is used as given."""
    path = Path(path)
    if (path / "model.safetensors").is_file() and not (path / "trainer_state.json").is_file():
        return path / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path}: no run directory, checkpoint directory or weights file there")
    if path.is_dir() and not (path / "trainer_state.json").is_file() and (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path}: no model.safetensors yet (training not finished?); load "
                              f"{path / 'checkpoints' / 'best'} or a {path / 'checkpoints'}/step_<N> directory")
    return path


def as_batch(images) -> torch.Tensor:
    """A (B, 3, H, W) tensor from a numpy array or tensor: channels first or (uint8 only) last, batched or not."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected a numpy array or torch tensor of images, got {type(images).__name__}")
    batch = images[None] if images.ndim == 3 else images
    if batch.ndim == 4 and batch.shape[1] != 3 and batch.shape[3] == 3 and batch.dtype == torch.uint8:
        batch = batch.permute(0, 3, 1, 2)  # (B, H, W, 3) RGB, as images are read and stored
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected images as (B, 3, H, W) or (3, H, W), or uint8 (B, H, W, 3) or (H, W, 3); "
                         f"got shape {tuple(images.shape)} {str(images.dtype).removeprefix('torch.')}")
    return batch


class Segmenter:
    """A trained network with its config: preprocessing, eval.* (sliding, flip, scales) and precision as in
    `cityseg evaluate`. Change options between calls through `segmenter.cfg.eval` (e.g. `.flip = True`)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device):
        self.model, self.cfg, self.device = model.to(device).eval(), cfg, device
        self.class_names = class_names(cfg.data.label_scheme)
        mean, std = normalization(cfg.data)  # the run's recorded data.mean / data.std
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    @classmethod
    def load(cls, path: str | Path, config: str | Path | None = None, overrides: list[str] = (),
             device: str | torch.device | None = None) -> Segmenter:
        """path: a run directory (<output_dir>), a checkpoint directory (checkpoints/step_N, checkpoints/best) or a
        model.safetensors file. config: default the config.yaml recorded beside the weights. device: default CUDA
        if available, else the CPU."""
        weights = weights_path(path)
        cfg = load_config(config if config is not None else run_config_path(weights), list(overrides),
                          recorded=config is None)
        resolve_normalization(cfg.data, cfg.model)  # a config given by hand: the encoder's
        model = build_model(cfg.model, len(class_names(cfg.data.label_scheme)))
        load_weights(model, weights)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, cfg, device)

    def _autocast(self):
        dtype = AUTOCAST.get(self.cfg.train.mixed_precision)
        if dtype is None or (dtype is torch.float16 and self.device.type != "cuda"):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _normalized(self, images) -> torch.Tensor:
        images = as_batch(images).to(self.device)
        if images.dtype == torch.uint8:  # raw RGB: the pipeline's normalization (albumentations Normalize)
            return (images.float() - self._mean) / self._std
        if not images.is_floating_point():
            raise ValueError(f"expected uint8 RGB or normalized float images, got {images.dtype}")
        return images.float()

    @torch.inference_mode()
    def logits(self, images) -> torch.Tensor:
        """(B, classes, h, w) float logits at data.image_size. images: a numpy array or torch tensor, uint8 RGB
        as (B, H, W, 3) / (H, W, 3) or (B, 3, H, W) / (3, H, W), or float (B, 3, H, W) / (3, H, W) already
        normalized as the training data is (ImageNet mean / std)."""
        with self._autocast():
            return segment_logits(self.model, self._normalized(images), self.cfg.data.image_size, self.cfg.eval).float()

    @torch.inference_mode()
    def predict_batch(self, images, full_resolution: bool = True) -> torch.Tensor:
        """(B, H, W) int64 torch tensor of training indices, for images as `logits` takes them (one image is a
        batch of one): at the images' size (full_resolution, logits upsampled bilinearly as `cityseg evaluate
        --mode full`), or at data.image_size (what training validates)."""
        batch = as_batch(images)
        logits = self.logits(batch)
        return upsampled_argmax(logits, batch.shape[-2:] if full_resolution else logits.shape[-2:])

    def predict(self, image: np.ndarray, full_resolution: bool = True) -> np.ndarray:
        """(H, W) uint8 training indices (see class_names) of one (H, W, 3) uint8 RGB image."""
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {described}")
        batch = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        return self.predict_batch(batch, full_resolution)[0].to(torch.uint8).cpu().numpy()

    def colorize(self, prediction: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB in the official Cityscapes colours."""
        return colorize(prediction, self.cfg.data.label_scheme)

    def to_label_ids(self, prediction: np.ndarray) -> np.ndarray:
        """Official Cityscapes label ids (what the benchmark server and `cityseg predict`'s labelIds/ hold)."""
        return to_label_ids_lut(self.cfg.data.label_scheme)[prediction]
