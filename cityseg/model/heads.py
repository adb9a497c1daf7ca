"""Pieces beside smp's models: mmsegmentation's auxiliary FCN head and 3x3 ASPP bottleneck, the padded class
head, Unet's upsampling in the activations' dtype."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
from torch import nn


class FCNHead(nn.Sequential):
    """mmseg FCNHead(num_convs=1, concat_input=False, channels=256): 3x3 conv + BN + ReLU, dropout 0.1, 1x1 conv."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256):
        super().__init__(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))


class WithAuxHead(nn.Module):
    """An smp encoder-decoder plus an FCN head on the encoder's next-to-last stage (ResNet: the 1024-channel one),
    as mmsegmentation's auxiliary_head. Training returns (main, aux) logits at the input size; eval only main.

    The smp model's parts keep their attribute names (encoder., decoder., segmentation_head.): weights files, the
    encoder / head LR groups and `cityseg weights` see the same keys, plus aux_head.*.
    """

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.encoder, self.decoder, self.segmentation_head = model.encoder, model.decoder, model.segmentation_head
        self.aux_head = FCNHead(model.encoder.out_channels[-2], num_classes)

    def forward(self, images: torch.Tensor):
        features = self.encoder(images)
        main = self.segmentation_head(self.decoder(features))
        if not self.training:
            return main
        aux = F.interpolate(self.aux_head(features[-2]), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return main, aux


def use_3x3_aspp_project(model: nn.Module) -> None:
    """smp's ASPP projects its concatenated branches with a 1x1 conv; mmsegmentation's ASPPHead uses a 3x3
    ConvModule (its `bottleneck`, 10.5 M of DeepLabV3+ R50's 43.6 M parameters at 512 channels)."""
    project = model.decoder.aspp[0].project
    old = project[0]
    project[0] = nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1, bias=False)



class PaddedClassConv(nn.Conv2d):
    """The class head's convolution with `padded_to` output channels: the num_classes real filters, then zero
    filters made on the fly. Its parameters (and so every checkpoint and weights file) are the unpadded conv's."""

    def __init__(self, conv: nn.Conv2d, padded_to: int):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        self.load_state_dict(conv.state_dict())
        self.padded_to = padded_to

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        extra = self.padded_to - self.out_channels
        weight = F.pad(self.weight, (0, 0, 0, 0, 0, 0, 0, extra))  # [out, in, kh, kw]: zero filters appended
        bias = None if self.bias is None else F.pad(self.bias, (0, extra))
        return self._conv_forward(features, weight, bias)


class KeepClasses(nn.Module):
    """The real classes' channels of padded logits: what the loss, the metrics and inference see."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, :self.num_classes]


def pad_class_head(model: nn.Module, num_classes: int, padded_to: int) -> None:
    """model.pad_classes_to: smp's segmentation head (conv, upsampling, activation) computes padded_to channels
    (a multiple of 8 suits tensor cores; 19 does not) and hands on the first num_classes, so the logits, the loss
    and the state dict are those of the unpadded model."""
    head = getattr(model, "segmentation_head", None)
    if not isinstance(head, nn.Sequential) or not isinstance(head[0], nn.Conv2d):
        raise TypeError(f"{type(model).__name__} has no smp segmentation head (a conv first) to pad")
    head[0] = PaddedClassConv(head[0], padded_to)
    head.append(KeepClasses(num_classes))  # no parameters: the state dict keys stay segmentation_head.0.*


class SameDtypeUnetDecoderBlock(UnetDecoderBlock):
    """smp's Unet decoder block whose nearest upsampling runs in the activations' dtype. CUDA autocast lists
    upsample_nearest2d as fp32: each block would cast to fp32, upsample, cat in fp32 and cast back for the conv
    (and backward mirrors it). Nearest upsampling only copies values, so it is exact in any dtype: the same
    numbers reach the conv, with a third of the bytes moved. Same parameters and state-dict keys as smp's block."""

    def forward(self, feature_map, target_height: int, target_width: int, skip_connection=None):
        if self.interpolation_mode != "nearest":
            return super().forward(feature_map, target_height, target_width, skip_connection)
        device = feature_map.device.type  # a meta (shape-only) model has no autocast to turn off
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            feature_map = F.interpolate(feature_map, size=(target_height, target_width), mode="nearest")
        if skip_connection is not None:
            feature_map = torch.cat([feature_map, skip_connection], dim=1)
            feature_map = self.attention1(feature_map)
        return self.attention2(self.conv2(self.conv1(feature_map)))


def upsample_in_activation_dtype(model: nn.Module) -> None:
    """Every smp Unet decoder block of the model becomes a SameDtypeUnetDecoderBlock (in place)."""
    for module in model.modules():
        if type(module) is UnetDecoderBlock:
            module.__class__ = SameDtypeUnetDecoderBlock
