"""Preflight: would training start? Each check is a (ok, label, detail) line; the engine reuses the raising ones."""
from __future__ import annotations

import netrc
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from cityseg import checkpoint
from cityseg.config.schema import ConfigError
from cityseg.data.cache import check_manifest, storage_size
from cityseg.data.cityscapes import DataError, find_pairs, read_pair
from cityseg.data.layout import header_errors
from cityseg.data.loaders import check_cache_options
from cityseg.data.transforms import check_divisible, padding_note, train_shape
from cityseg.distributed.runtime import check_mixed_precision
from cityseg.labels import class_names, label_lut
from cityseg.model.build import ModelError, build_model, input_multiple
from cityseg.model.weights import describe as describe_weights
from cityseg.model.weights import weights_on_disk
from cityseg.train import resume as resume_check

DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID",
            "SLURM_NNODES", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_GPUS_ON_NODE", "NCCL_SOCKET_IFNAME",
            "GLOO_SOCKET_IFNAME", "WANDB_MODE")
Check = tuple[bool, str, str]


# --- checks that raise: the engine calls these at startup, `cityseg check` turns them into lines ---------------

def check_batch_share(batch_size: int, num_samples: int, world_size: int) -> None:
    share = num_samples // world_size
    if share < batch_size:
        raise ConfigError(f"data.batch_size: {batch_size} is larger than each process's share of the "
                          f"training set ({num_samples} samples / {world_size} processes = {share})")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(output_dir: str | Path, create: bool) -> None:
    """output_dir can be created and written to (a real write: permission bits say nothing for root or on a
    read-only mount). With create=False nothing is left behind."""
    output_dir = Path(output_dir)
    try:
        if create:
            output_dir.mkdir(parents=True, exist_ok=True)
        target = output_dir if create else _existing_ancestor(output_dir)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        blocker = _existing_ancestor(output_dir)
        why = f"{blocker} is not a directory" if not blocker.is_dir() else err.strerror
        raise ConfigError(f"output_dir {output_dir}: not writable: {why}") from None


def check_data_files(data_cfg, warn) -> None:
    """The cheap part of `cityseg check` that training runs before it builds anything: both splits' image/label
    pairs and their PNG headers (~1 s for 7,000 files), so a missing, truncated or mismatched file is named now,
    not at its batch. With data.on_bad_sample=skip, training's bad files are a warning (they will be skipped)."""
    for split in dict.fromkeys((data_cfg.train_split, data_cfg.val_split)):
        errors = header_errors(find_pairs(data_cfg.root, split))
        if not errors:
            continue
        more = f" (and {len(errors) - 1} more bad pair(s); `cityseg check` counts them)" if len(errors) > 1 else ""
        if split != data_cfg.train_split or data_cfg.on_bad_sample == "error":  # evaluation never skips
            raise DataError(errors[0] + more)
        warn(f"warning: {len(errors)} bad pair(s) in split {split} will be skipped (data.on_bad_sample=skip); "
             f"first: {errors[0]}")


def check_weights(model_cfg) -> None:
    """Pretrained weights that are neither cached nor downloadable stop the start in one line (in seconds, where
    huggingface_hub alone retries for a minute)."""
    ok, detail = describe_weights(model_cfg)
    if not ok:
        raise ModelError(detail)


def check_train_shape(data_cfg, model: torch.nn.Module, model_cfg) -> None:
    check_divisible(data_cfg, input_multiple(model), f"{model_cfg.arch} / {model_cfg.encoder}")


# --- what `cityseg check` reports ------------------------------------------------------------------------------

def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Weights plus AdamW's two moments, float32: the bulk of one accelerate checkpoint."""
    return 3 * 4 * sum(p.numel() for p in model.parameters())


def disk_needed(model: torch.nn.Module, keep_last: int) -> int:
    # keep_last sealed + the one being written + best + the exported model.safetensors
    return checkpoint_bytes(model) * (keep_last + 2) + 4 * sum(p.numel() for p in model.parameters())


def wandb_mode(wandb_cfg) -> tuple[str, str]:
    """The mode W&B will run in, and why (never the key itself)."""
    if wandb_cfg.mode == "disabled":
        return "disabled", "tracking.wandb.mode=disabled"
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("offline", "disabled", "dryrun"):
        return "offline" if env_mode == "dryrun" else env_mode, f"WANDB_MODE={env_mode}"
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            pass
    if wandb_cfg.mode == "online":
        return ("online", "API key found") if has_key else ("online", "no API key (WANDB_API_KEY or ~/.netrc)")
    if wandb_cfg.mode == "offline":
        return "offline", "tracking.wandb.mode=offline; `wandb sync` uploads later"
    return ("online", "auto: API key found") if has_key else ("offline", "auto: no API key; `wandb sync` later")


def deep_scan(pairs, lut, workers: int) -> tuple[int, list[str]]:
    """Decode every pair (sizes, ids, corruption); returns the count and the errors, in file order."""
    def one(pair):
        try:
            read_pair(*pair, lut)
            return None
        except DataError as err:
            return str(err)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # OpenCV decodes without the GIL
        errors = [e for e in pool.map(one, pairs) if e is not None]
    return len(pairs), errors


def _guard(checks: list[Check], label: str, func) -> object:
    """Run one check; a user-facing error becomes a ✗ line instead of stopping the others."""
    try:
        ok, detail, value = func()
    except (ConfigError, DataError, ModelError, checkpoint.CheckpointError) as err:
        checks.append((False, label, str(err)))
        return None
    checks.append((ok, label, detail))
    return value


def run_checks(cfg, deep: bool = False, world_size: int | None = None, cuda: bool | None = None) -> list[Check]:
    """Everything training needs before it starts; world_size defaults to the launcher's WORLD_SIZE (or 1),
    cuda to what this machine has (True: judge for GPU nodes from a machine without one)."""
    checks: list[Check] = [(True, "config", f"valid; name {cfg.name}, output_dir {cfg.output_dir}")]
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    here = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "") not in ("1", "true", "True")
    cuda = here if cuda is None else cuda
    device = (f"{torch.cuda.device_count()} CUDA device(s) visible" if here else "CUDA devices of the run's nodes"
              ) if cuda else "CPU (gloo between processes)"

    def launch():
        check_mixed_precision(cfg.train.mixed_precision, cuda)
        detail = f"{world} process(es); {device}; mixed precision {cfg.train.mixed_precision}"
        if cfg.model.sync_bn and not (cuda and world > 1):
            detail += "; warning: model.sync_bn needs more than one CUDA device, plain BatchNorm will be used"
        return True, detail, None
    _guard(checks, "processes", launch)

    _data_checks(checks, cfg, deep, world)

    built = _model_checks(checks, cfg)

    def output():
        check_output_dir(cfg.output_dir, create=False)
        free = shutil.disk_usage(_existing_ancestor(Path(cfg.output_dir))).free
        detail = f"writable; {free / 2**30:.1f} GiB free"
        if built is None:
            return True, detail, None
        needed = disk_needed(built, cfg.checkpoint.keep_last)
        detail += f", checkpoints need about {needed / 2**30:.2f} GiB (keep_last {cfg.checkpoint.keep_last})"
        return free >= needed, detail, None
    _guard(checks, "output_dir", output)

    _guard(checks, "resume", lambda: resume_plan(cfg))

    mode, why = wandb_mode(cfg.tracking.wandb)
    checks.append((not (mode == "online" and "no API key" in why), "W&B", f"{mode} ({why})"))
    seen = [f"{name}={os.environ[name]}" for name in DIST_ENV if name in os.environ]
    checks.append((True, "environment", " ".join(seen) if seen else "no launcher or SLURM variables set"))
    return checks


def _model_checks(checks: list[Check], cfg) -> torch.nn.Module | None:
    """The pretrained weights, the model (returned where it builds) and the training shapes it can take."""
    def pretrained():  # before the model: offline, building it with missing weights would retry for a minute
        ok, detail = describe_weights(cfg.model)
        return ok, detail, None
    _guard(checks, "pretrained weights", pretrained)

    def model():  # without the weights on disk: the architecture alone (check downloads nothing)
        weights = cfg.model.encoder_weights if weights_on_disk(cfg.model) else None
        built = build_model(replace(cfg.model, encoder_weights=weights), len(class_names(cfg.data.label_scheme)))
        params = sum(p.numel() for p in built.parameters())
        encoder = weights or ("random init" if cfg.model.encoder_weights is None else "random init here (weights: above)")
        return True, f"{cfg.model.arch} / {cfg.model.encoder}, {params / 1e6:.1f} M parameters, encoder {encoder}", built
    built = _guard(checks, "model", model)

    def shapes():
        crop = train_shape(cfg.data)
        detail = f"training samples {crop[0]}x{crop[1]}"
        if built is not None:
            check_train_shape(cfg.data, built, cfg.model)
            multiple = input_multiple(built)
            detail += (f", divisible by {multiple} as {cfg.model.arch} / {cfg.model.encoder} needs" if multiple > 1
                       else f" (any size suits {cfg.model.arch} / {cfg.model.encoder})")
        note = padding_note(cfg.data)
        return True, detail + (f"; {note}" if note else ""), None
    _guard(checks, "shapes", shapes)
    return built


def _data_checks(checks: list[Check], cfg, deep: bool, world: int) -> None:
    """Both splits' layout and PNG headers (decoded when deep), the batch share of each process, the cache."""
    lut = label_lut(cfg.data.label_scheme)
    found = {}
    for split in (cfg.data.train_split, cfg.data.val_split):
        def layout(split=split):
            pairs = find_pairs(cfg.data.root, split)
            count, errors = deep_scan(pairs, lut, workers=os.cpu_count() or 1) if deep else (
                len(pairs), header_errors(pairs))
            if errors:
                return False, f"{len(errors)} of {count} pairs unreadable; first: {errors[0]}", pairs
            if deep:
                return True, f"{count} pairs decoded: sizes match, label ids known", pairs
            return True, f"{count} image/label pairs in {cfg.data.root}; PNG headers read: sizes match", pairs
        found[split] = pairs = _guard(checks, f"data {split}", layout)
        if split == cfg.data.train_split and pairs is not None:
            def share(pairs=pairs):
                check_batch_share(cfg.data.batch_size, len(pairs), world)
                return True, f"{cfg.data.batch_size} per process <= {len(pairs) // world} samples per process", None
            _guard(checks, "batch size", share)
    _guard(checks, "data cache", lambda: cache_plan(cfg.data, found))


def cache_plan(data_cfg, pairs: dict) -> tuple[bool, str, None]:
    """Where training reads its samples: the PNG files, or data.cache.dir, which must hold the training split as
    built from these very files at this size (the val split is read from it where prepared, else from the files)."""
    check_cache_options(data_cfg)
    if not data_cfg.cache.dir:
        return True, "none (data.cache.dir null): samples decoded from the PNG files", None
    root = Path(data_cfg.cache.dir)
    if not root.is_dir():
        raise DataError(f"data.cache.dir {root}: directory not found; run `cityseg prepare --config <config>` first "
                        "(with the same data.* settings)")
    served = list(dict.fromkeys(split for split in (data_cfg.train_split, data_cfg.val_split)
                                if split == data_cfg.train_split or (root / split).is_dir()))
    for split in served:
        if pairs.get(split) is not None:
            check_manifest(root / split, data_cfg.root, pairs[split], storage_size(data_cfg), data_cfg.label_scheme)
    height, width = storage_size(data_cfg)
    return True, f"{root}: {' and '.join(served)} prepared from these files at {height}x{width}", None


def resume_plan(cfg) -> tuple[bool, str, None]:
    """What training will start from, with the same verdict the engine gives (a refusal raises ResumeRefused)."""
    if cfg.train.resume == "none":
        existing = checkpoint.complete_checkpoints(cfg.output_dir)
        if existing:
            return False, (f"{cfg.output_dir} holds checkpoints of an earlier run (newest {existing[-1].name}); with "
                           "train.resume=none use a new output_dir, or train.resume=auto to continue that run"), None
        return True, "train.resume=none: starting fresh", None
    skipped = []
    if cfg.train.resume != "auto":
        found = Path(cfg.train.resume)
        checkpoint.verify(found)
    else:
        found = resume_check.find_resume(cfg.output_dir, warn=skipped.append)
    if found is None:
        return True, "no checkpoint in output_dir: starting fresh", None
    allowed = resume_check.verdict(cfg, found)
    note = f" ({len(skipped)} broken newer checkpoint(s) skipped)" if skipped else ""
    changes = f"; allowed changes: {', '.join(allowed)}" if allowed else "; config unchanged"
    return True, f"from {found}{note}{changes}", None


def format_checks(checks: list[Check]) -> str:
    return "\n".join(f"{'✓' if ok else '✗'} {label}: {detail}" for ok, label, detail in checks)
