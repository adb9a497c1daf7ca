"""The config schema: typed sections with defaults and ranges, the one place a key is defined."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# keys cityseg no longer reads: a config naming one is told what replaced it; a run's recorded config drops them
RETIRED = {"train.reference_world_size": "replaced by train.reference_global_batch and optim.lr_scaling"}


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")  # reduce-overhead: CUDA graphs


def compile_mode(train_cfg) -> str | None:
    """train.compile as a torch.compile mode: None (eager), true -> "default" (what old configs mean), or the mode."""
    value = train_cfg.compile
    if value is False:
        return None
    return "default" if value is True else value


class ConfigError(ValueError):
    """A one-line, user-facing problem with a config file or override (the CLI exits 2 on it)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key  # the dotted key at fault: load_config names the override or file it came from


def _range(low=None, high=None):
    return {"low": low, "high": high}


@dataclass
class CacheConfig:
    dir: Optional[str] = None  # decode-once shard cache written by `cityseg prepare`
    size: Optional[list[int]] = None  # [H, W] stored in the cache; null = data.image_size
    device_augment: bool = False  # flip / scale / crop / normalize on the device, in batch


@dataclass
class DataConfig:
    root: str = "data/cityscapes"
    image_size: list[int] = field(default_factory=lambda: [256, 512])  # [H, W] the network sees
    label_scheme: Literal["trainid19", "seed20"] = "trainid19"
    batch_size: int = field(default=32, metadata=_range(1))  # per process
    val_batch_size: Optional[int] = field(default=None, metadata=_range(1))  # null = batch_size
    num_workers: int = field(default=4, metadata=_range(0))
    train_split: str = "train"
    val_split: str = "val"
    hflip: bool = True
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random rescale before crop
    crop_size: Optional[list[int]] = None  # [H, W] random crop after scaling; null = no crop
    photometric: bool = False  # brightness / contrast / saturation / hue jitter (mmseg PhotoMetricDistortion)
    cat_max_ratio: float = field(default=1.0, metadata=_range(0.0, 1.0))  # crop retried while one class dominates
    mean: Optional[list[float]] = None  # RGB normalization in [0, 1] units; null = the encoder's pretrained config
    std: Optional[list[float]] = None  # null = the encoder's pretrained config (recorded in the run's config.yaml)
    on_bad_sample: Literal["error", "skip"] = "error"
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class ModelConfig:
    arch: str = "Unet"  # any segmentation_models_pytorch architecture class name
    encoder: str = "tu-tf_mobilenetv3_small_minimal_100"
    encoder_weights: Optional[str] = None  # null | imagenet (from the local HF cache) | path to a file
    sync_bn: bool = False
    encoder_output_stride: Optional[int] = None  # smp DeepLabV3/V3+: 8 or 16; null = smp's default
    decoder_channels: Optional[int] = None  # smp DeepLabV3/V3+ decoder width; null = smp's default
    decoder_atrous_rates: Optional[list[int]] = None  # smp DeepLabV3/V3+ ASPP dilations; null = smp's default
    aspp_project_kernel: Literal[1, 3] = 1  # DeepLabV3/V3+ ASPP projection: 1 = smp's, 3 = mmseg's bottleneck
    aux_head: bool = False  # an FCN head on the encoder's next-to-last stage, trained with loss.aux_weight
    pad_classes_to: int = field(default=0, metadata=_range(0))  # class head computes this many channels; 0 = off


@dataclass
class LossConfig:
    name: Literal["dice", "ce", "dice+ce", "ohem_ce", "weighted_ce"] = "dice"
    ohem_thresh: float = field(default=0.7, metadata=_range(0.0, 1.0))  # ohem_ce: keep pixels with p(true) below
    ohem_min_kept: int = field(default=100000, metadata=_range(1))  # ohem_ce: at least this many pixels per batch
    class_weights: Optional[list[float]] = None  # weighted_ce: one per class; null = the Cityscapes table
    aux_weight: float = field(default=0.4, metadata=_range(0.0))  # model.aux_head: weight of its loss


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))  # sgd
    nesterov: bool = False  # sgd
    no_decay_norm_bias: bool = False  # no weight decay on normalization weights and biases (1-d parameters)
    no_decay_keys: list[str] = field(default_factory=list)  # no weight decay where the name contains one (mmseg)
    head_lr_mult: float = field(default=1.0, metadata=_range(0.0))  # LR multiplier of everything but the encoder
    lr: float = field(default=1e-3, metadata=_range(0.0))
    weight_decay: float = field(default=0.005, metadata=_range(0.0))
    schedule: Literal["poly", "constant"] = "poly"
    poly_power: float = field(default=0.9, metadata=_range(0.0))
    min_lr: float = field(default=0.0, metadata=_range(0.0))  # poly decays to this LR (mmseg's eta_min)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # rescale optim.lr when the global batch differs
    warmup_steps: int = field(default=0, metadata=_range(0))
    grad_clip: Optional[float] = field(default=None, metadata=_range(0.0))


@dataclass
class TrainConfig:
    epochs: Optional[int] = field(default=10, metadata=_range(1))  # null = iteration-based: train.max_steps
    max_steps: Optional[int] = field(default=None, metadata=_range(1))  # schedule length in optimizer steps
    eval_every_steps: int = field(default=0, metadata=_range(0))  # 0 = evaluate every train.eval_every_epochs
    ema_decay: Optional[float] = field(default=None, metadata=_range(0.0, 1.0))  # EMA of the weights; null = off
    reference_global_batch: Optional[int] = field(default=None, metadata=_range(1))  # the recipe's global batch
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_accum: int = field(default=1, metadata=_range(1))
    resume: str = "auto"  # auto | none | <checkpoint dir>
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    stop_vote_s: float = field(default=1.0, metadata=_range(0.0))  # seconds between asynchronous stop votes
    channels_last: bool = False
    # torch.compile of the model and the loss: false | true (= "default") | a mode name (COMPILE_MODES)
    compile: Literal[False, True, "default", "max-autotune-no-cudagraphs", "reduce-overhead"] = False
    log_every: int = field(default=10, metadata=_range(1))
    eval_every_epochs: int = field(default=1, metadata=_range(1))
    on_nan: Literal["error", "skip"] = "error"
    profile_steps: Optional[list[int]] = None  # [first, last] optimizer steps: Chrome trace in <output_dir>/profile/


@dataclass
class CheckpointConfig:
    every_steps: int = field(default=0, metadata=_range(0))  # 0 = only at the end of each epoch
    keep_last: int = field(default=2, metadata=_range(1))


@dataclass
class EvalConfig:
    mode: Literal["resized", "full"] = "resized"
    sliding: bool = False
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])  # sliding window [H, W]
    stride: list[int] = field(default_factory=lambda: [341, 683])
    flip: bool = False  # average with the horizontally flipped prediction
    scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale test: factors of the network size


@dataclass
class DistConfig:
    timeout_minutes: float = field(default=30.0, metadata=_range(0.1))


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "cityseg"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    run_name: Optional[str] = None
    num_images: int = field(default=4, metadata=_range(0))  # validation images logged each evaluation
    log_checkpoints: bool = False  # best checkpoint as an artifact


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False  # also write the W&B scalars as TensorBoard events to <output_dir>/tensorboard/


@dataclass
class Config:
    name: str = "cityseg"
    seed: int = 0
    output_dir: Optional[str] = None  # null = runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
