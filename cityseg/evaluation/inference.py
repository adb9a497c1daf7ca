"""Logits of a batch as evaluation and prediction need them: resize, sliding window, flip, multi-scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE_MULTIPLE = 32  # smp encoders halve the resolution five times


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis: every `stride`, plus one flush with the end so the last pixels are covered."""
    if length <= crop:
        return [0]
    stride = min(stride, crop)  # a stride longer than the window would skip the pixels between windows
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


def forward_padded(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits of images of any size: padded bottom/right to a multiple of 32, cropped back after the forward."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % SIZE_MULTIPLE, -width % SIZE_MULTIPLE
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))  # zero = the mean colour after normalization
    return model(images)[..., :height, :width]


def sliding_logits(model: torch.nn.Module, images: torch.Tensor, crop: list[int], stride: list[int]) -> torch.Tensor:
    """Logits from crop-sized windows every stride; where windows overlap their logits are averaged."""
    height, width = images.shape[-2:]
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    total, counts = None, torch.zeros(height, width, device=images.device)
    for top in window_starts(height, crop_h, stride[0]):
        for left in window_starts(width, crop_w, stride[1]):
            window = forward_padded(model, images[..., top:top + crop_h, left:left + crop_w]).float()
            if total is None:
                total = window.new_zeros(images.shape[0], window.shape[1], height, width)
            total[..., top:top + crop_h, left:left + crop_w] += window
            counts[top:top + crop_h, left:left + crop_w] += 1
    return total / counts


def segment_logits(model: torch.nn.Module, images: torch.Tensor, net_size: list[int], eval_cfg) -> torch.Tensor:
    """Float logits at the network size: images resized to net_size, whole or sliding (eval.*), flip-averaged;
    with eval.scales other than [1.0], the log of the multi-scale averaged probabilities (see multi_scale_logits)."""
    scales = [float(s) for s in getattr(eval_cfg, "scales", None) or [1.0]]
    if scales != [1.0]:
        return multi_scale_logits(model, images, net_size, eval_cfg, scales)
    if list(images.shape[-2:]) != list(net_size):
        # bilinear, half-pixel centres, no antialias: what cv2.INTER_LINEAR did to the training images
        images = F.interpolate(images, size=tuple(net_size), mode="bilinear", align_corners=False)

    def run(batch):
        if eval_cfg.sliding:
            return sliding_logits(model, batch, eval_cfg.crop_size, eval_cfg.stride)
        return forward_padded(model, batch).float()

    logits = run(images)
    if eval_cfg.flip:
        logits = (logits + run(images.flip(-1)).flip(-1)) / 2
    return logits


def multi_scale_logits(model: torch.nn.Module, images: torch.Tensor, net_size: list[int], eval_cfg,
                       scales: list[float]) -> torch.Tensor:
    """mmsegmentation's aug test: the input resized to each scale x net_size (and flipped with eval.flip), each
    prediction's softmax resized back to net_size, the probabilities averaged. Returns their log: an argmax, a
    softmax or a bilinear upsampling of it behaves as of logits."""
    total, count = None, 0
    for scale in scales:
        size = [max(1, round(net_size[0] * scale)), max(1, round(net_size[1] * scale))]
        batch = images
        if list(images.shape[-2:]) != size:
            batch = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)
        for flipped in ((False, True) if eval_cfg.flip else (False,)):
            if eval_cfg.sliding:
                logits = sliding_logits(model, batch.flip(-1) if flipped else batch, eval_cfg.crop_size,
                                        eval_cfg.stride)
            else:
                logits = forward_padded(model, batch.flip(-1) if flipped else batch).float()
            logits = logits.flip(-1) if flipped else logits
            if size != list(net_size):
                logits = F.interpolate(logits, size=tuple(net_size), mode="bilinear", align_corners=False)
            probabilities = logits.softmax(1)
            total = probabilities if total is None else total + probabilities
            count += 1
    # tiny, not 0: log(0) = -inf would turn into NaN where a later bilinear upsampling weighs it by 0
    return (total / count).clamp_min(torch.finfo(total.dtype).tiny).log()


def upsampled_argmax(logits: torch.Tensor, out_size) -> torch.Tensor:
    """Class per pixel at out_size (bilinear logits), one image at a time: a batch of 1024x2048 logits is huge."""
    if tuple(logits.shape[-2:]) == tuple(out_size):
        return logits.argmax(1)
    return torch.cat([F.interpolate(one[None], size=tuple(out_size), mode="bilinear", align_corners=False).argmax(1)
                      for one in logits])
