"""The segmentation network: a segmentation-models-pytorch factory driven by the config."""
from __future__ import annotations

from pathlib import Path
from types import MethodType

import segmentation_models_pytorch as smp
import torch
from accelerate.utils.operations import ConvertOutputsToFp32, convert_to_fp32
from safetensors.torch import load_file
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm

from cityseg.model.heads import (
    WithAuxHead,
    pad_class_head,
    upsample_in_activation_dtype,
    use_3x3_aspp_project,
)


class ModelError(ValueError):
    """A one-line, user-facing problem building or loading the model."""


def build_model(model_cfg, num_classes: int) -> torch.nn.Module:
    """smp.<arch>(encoder, classes, decoder options); encoder weights from the local cache or a local file, never
    silently random; then the mmseg pieces the config asks for (3x3 ASPP bottleneck, auxiliary FCN head) and the
    padded class head (model.pad_classes_to)."""
    weights = model_cfg.encoder_weights
    from_file = weights is not None and weights not in ("imagenet",) and (Path(weights).suffix or "/" in weights)
    options = {key: getattr(model_cfg, key) for key in ("encoder_output_stride", "decoder_channels",
                                                       "decoder_atrous_rates") if getattr(model_cfg, key) is not None}
    try:
        model = smp.create_model(
            model_cfg.arch, encoder_name=model_cfg.encoder, encoder_weights=None if from_file else weights,
            in_channels=3, classes=num_classes, **options,
        )
    except TypeError as err:  # a decoder option this architecture does not take
        raise ModelError(f"model: {model_cfg.arch} does not take {', '.join(options)} ({err})") from None
    except KeyError as err:
        raise ModelError(f"model.arch / model.encoder: {err.args[0] if err.args else err}") from None
    except (OSError, RuntimeError, ValueError) as err:
        if weights is None:
            raise ModelError(f"model: cannot build {model_cfg.arch} with encoder {model_cfg.encoder}: {err}") from None
        raise ModelError(
            f"model.encoder_weights: '{weights}' weights for encoder {model_cfg.encoder} are not available offline "
            f"({type(err).__name__}); download them into the Hugging Face cache on a machine with internet "
            "(HF_HUB_OFFLINE=1 then finds them), or set model.encoder_weights to a local .safetensors/.pth file, "
            "or to null for random init") from None
    if from_file:
        load_encoder_weights(model, Path(weights))
    if model_cfg.aspp_project_kernel == 3:
        if not hasattr(getattr(model, "decoder", None), "aspp"):
            raise ModelError(f"model.aspp_project_kernel: {model_cfg.arch} has no ASPP (DeepLabV3 / DeepLabV3Plus)")
        use_3x3_aspp_project(model)
    if model_cfg.pad_classes_to and model_cfg.pad_classes_to != num_classes:
        if model_cfg.pad_classes_to < num_classes:
            raise ModelError(f"model.pad_classes_to: {model_cfg.pad_classes_to} is fewer than the {num_classes} "
                             "classes (0 = no padding, or e.g. 24 / 32)")
        try:
            pad_class_head(model, num_classes, model_cfg.pad_classes_to)
        except TypeError as err:
            raise ModelError(f"model.pad_classes_to: {err}") from None
    upsample_in_activation_dtype(model)  # Unet: exact, a third of its decoder's bytes under autocast
    return WithAuxHead(model, num_classes) if model_cfg.aux_head else model


def input_multiple(model: torch.nn.Module) -> int:
    """What a training input's height and width must be divisible by: the encoder's output stride (smp checks it
    at every forward), 1 for an architecture that takes any size."""
    if not getattr(model, "requires_divisible_input_shape", True):
        return 1
    return int(getattr(getattr(model, "encoder", None), "output_stride", 1))


def load_encoder_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"model.encoder_weights: file {path} not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:  # a .pth state dict: tensors only, never a pickle that could run code
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decode failure is the file's fault
        raise ModelError(f"model.encoder_weights: cannot read {path}: {type(err).__name__}: {err}") from None
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if missing:
        raise ModelError(f"model.encoder_weights: {path} lacks {len(missing)} encoder tensors, e.g. {missing[0]}")
    if unexpected:
        print(f"note: {path}: {len(unexpected)} tensors not used by the encoder, e.g. {unexpected[0]}")


def convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm layers → SyncBatchNorm, keeping timm's fused BatchNormAct2d activations (torch's own converter
    turns them into a plain SyncBatchNorm whose forward drops `.act`, with the same state-dict keys)."""
    return timm_convert_sync_batchnorm(model)


def unwrap_for_eval(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (and torch.compile), for evaluation and BatchNorm averaging.

    accelerate's default unwrap_model(keep_torch_compile=True) rewires the compiled training model onto the bare
    one (`compiled._orig_mod = bare`), silently dropping DDP from training: gradients stop being synchronized.
    """
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def training_logits_as_computed(model: torch.nn.Module) -> None:
    """accelerate's prepare makes a mixed-precision model's forward return fp32 (a full-size copy of the logits,
    and its cast back in backward); in training the losses take the autocast dtype and cast what they need
    themselves (an exact cast either way), so the copy is left out there. Evaluation keeps fp32 logits."""
    forward = getattr(model.forward, "__func__", model.forward)
    to_fp32 = getattr(forward, "__wrapped__", None)
    if not isinstance(to_fp32, ConvertOutputsToFp32):  # fp32 training: prepare wrapped nothing
        return

    def forward_fp32_outside_training(self, *args, **kwargs):
        output = to_fp32.model_forward(self, *args, **kwargs)
        return output if self.training else convert_to_fp32(output)

    forward_fp32_outside_training.__wrapped__ = to_fp32  # accelerate's unwrap still peels down to the original
    model.forward = MethodType(forward_fp32_outside_training, model)


def average_batchnorm_stats(model: torch.nn.Module, accelerator) -> None:
    """Every rank's BatchNorm running mean / var become their mean over ranks (one all-reduce), as timm does.

    DDP normalizes each rank's batch with its own statistics and only broadcasts rank 0's buffers at the next
    training forward: without this, each rank would validate its shard with other statistics than the weights
    that are saved, and the all-reduced metrics would match no single model.
    """
    if accelerator.num_processes == 1:
        return
    buffers = [buffer for module in model.modules()
               if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
               for buffer in (module.running_mean, module.running_var)]
    if not buffers:
        return
    averaged = accelerator.reduce(torch.cat([buffer.flatten() for buffer in buffers]), reduction="mean")
    for buffer, values in zip(buffers, averaged.split([buffer.numel() for buffer in buffers])):
        buffer.copy_(values.view_as(buffer))
