"""The input normalization an encoder's pretrained weights expect, resolved once and recorded in the run's config."""
from __future__ import annotations

import json

from cityseg.config.schema import IMAGENET_MEAN, IMAGENET_STD


def encoder_normalization(model_cfg) -> tuple[list[float], list[float], str]:
    """(mean, std, source) in [0, 1] units for model.encoder: timm's pretrained_cfg for `tu-` encoders (the `tf_`
    MobileNetV3 weights expect 0.5 / 0.5), the cached hub config.json of smp's own encoders, else ImageNet's.
    Read from timm's registry or the local cache: nothing is downloaded."""
    encoder = model_cfg.encoder
    if encoder.startswith("tu-"):
        import timm

        pretrained = timm.models.get_pretrained_cfg(encoder[3:])  # "name" or "name.tag"
        if pretrained is not None and pretrained.mean and pretrained.std:
            return list(pretrained.mean), list(pretrained.std), f"timm pretrained_cfg of {encoder[3:]}"
        return list(IMAGENET_MEAN), list(IMAGENET_STD), f"ImageNet (timm lists no pretrained_cfg for {encoder[3:]})"
    settings = _smp_hub_settings(encoder, model_cfg.encoder_weights)
    if settings is not None:
        return list(settings["mean"]), list(settings["std"]), f"smp-hub config of {encoder}"
    return list(IMAGENET_MEAN), list(IMAGENET_STD), f"ImageNet (smp's {encoder} weights are ImageNet-normalized)"


def _smp_hub_settings(encoder: str, weights: str | None) -> dict | None:
    """smp's pretrained settings (mean / std) from the config.json in the local Hugging Face cache, if there."""
    from huggingface_hub import try_to_load_from_cache
    from segmentation_models_pytorch.encoders import encoders

    options = encoders.get(encoder, {}).get("pretrained_settings", {})
    setting = options.get(weights) or options.get("imagenet")
    if not setting:
        return None
    path = try_to_load_from_cache(setting["repo_id"], "config.json", revision=setting.get("revision"))
    if not isinstance(path, str):
        return None
    settings = json.loads(open(path).read())
    return settings if "mean" in settings and "std" in settings else None


def resolve_normalization(data_cfg, model_cfg) -> str | None:
    """Fill data.mean / data.std left null from model.encoder (so config.yaml records what the run used); returns
    where they came from, or None when the config set both."""
    if data_cfg.mean is not None and data_cfg.std is not None:
        return None
    mean, std, source = encoder_normalization(model_cfg)
    data_cfg.mean = data_cfg.mean if data_cfg.mean is not None else mean
    data_cfg.std = data_cfg.std if data_cfg.std is not None else std
    return source
