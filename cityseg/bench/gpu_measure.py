"""What the GPU proof's child processes measure: one precision variant's step, the loop body, full-size evaluation."""
from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from cityseg.observe.flops import device_name

STEP_VARIANTS = {  # the eager precisions the proof times (--precisions: all; else the first)
    "bf16_channels_last": {"precision": "bf16", "channels_last": True}, "fp32": {"precision": "no"},
    "bf16": {"precision": "bf16"}, "fp16_grad_scaler": {"precision": "fp16"},
}
CUDA_ONLY_MODES = ("max-autotune-no-cudagraphs", "reduce-overhead")  # inductor's GPU code paths


# ---- in a child: the training step of one precision variant, on device-resident synthetic batches

def count_syncs(step, repeats: int) -> int | None:
    """Synchronizing CUDA calls made by `repeats` calls of step, under torch.cuda.set_sync_debug_mode("warn")."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(repeats):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # "called a synchronizing CUDA operation": one per sync (not the mode's own "prototype feature" notice)
    messages = [str(w.message) for w in caught if "synchronizing CUDA operation" in str(w.message)]
    for message in messages[:3]:
        print(f"sync: {message.splitlines()[0]}", file=sys.stderr)
    return -(-len(messages) // repeats)  # rounded up: one sync in any of the steps counts


def build_step(cfg, batch: int, channels_last: bool, compile_mode: str | None = None) -> dict:
    """train.py's step (train_step on the parts build_training makes) on one device-resident synthetic batch:
    {"step": a no-argument step, "stats", "optimizer", "loss_fn", ...}. channels_last and compile_mode set
    train.channels_last and train.compile (the model and the loss in that torch.compile mode; None: eager). On a
    CPU the compile backend is "eager": the same tracing without inductor's C++ build (minutes per graph there)."""
    from cityseg.distributed.runtime import make_accelerator
    from cityseg.labels import num_classes
    from cityseg.model.build import unwrap_for_eval
    from cityseg.observe.flops import train_flops_per_image
    from cityseg.train.setup import build_training
    from cityseg.train.step import StepStats, train_step

    cfg = copy.deepcopy(cfg)
    cfg.train.channels_last, cfg.train.compile = channels_last, compile_mode or False
    accelerator = make_accelerator(cfg)
    device, classes = accelerator.device, num_classes(cfg.data.label_scheme)
    torch.manual_seed(0)
    backend = "inductor" if device.type == "cuda" else "eager"
    training = build_training(cfg, accelerator, classes, compile_options={"backend": backend})
    flops = train_flops_per_image(unwrap_for_eval(accelerator, training.model), cfg.data.image_size)
    stats = StepStats(device)
    height, width = cfg.data.image_size
    images = torch.randn(batch, 3, height, width, device=device)
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    masks = torch.randint(0, classes, (batch, height, width), device=device)
    training.model.train()

    def step():
        train_step(accelerator, training.model, training.optimizer, training.loss_fn, images, masks,
                   training.schedule.lr(0), cfg.optim.grad_clip, stats, 0)

    return {"step": step, "stats": stats, "device": device, "flops": flops, "model": training.model, "backend":
            backend if compile_mode else None,
            "optimizer": training.optimizer, "loss_fn": training.loss_fn, "images": images, "masks": masks,
            "classes": classes}


def step_child(cfg_path: str, variant: dict, steps: int, warmup: int) -> dict:
    """The step of one variant: {"precision", "channels_last", "compile" (a train.compile mode or None), "batch"
    (None: the config's), "pad_classes_to"}, timed after `warmup` steps; on CUDA its syncs and peak memory, and under
    reduce-overhead whether inductor captured CUDA graphs or skipped them (its cudagraph_skips counter)."""
    from torch._dynamo.utils import counters

    from cityseg.config.load import load_config
    from cityseg.observe.flops import peak_flops

    precision = variant.get("precision", "no")
    cfg = load_config(cfg_path, [f"train.mixed_precision='{precision}'",  # quoted: YAML reads no as false
                                 f"model.pad_classes_to={variant.get('pad_classes_to', 0)}"])
    batch = variant.get("batch") or cfg.data.batch_size
    built = build_step(cfg, batch, variant.get("channels_last", False), variant.get("compile"))
    step, stats, device, flops = built["step"], built["stats"], built["device"], built["flops"]
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    stats.take()  # waits for the warm-up (compilation, cuDNN autotuning, CUDA graph capture)
    warmup_s = time.perf_counter() - started
    syncs = count_syncs(step, repeats=3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    loss = stats.take()["loss"]  # the only host read: after the timed steps
    seconds = (time.perf_counter() - started) / steps
    peak, peak_name = peak_flops(device, precision)
    images_per_s = batch / seconds
    graphs = {key: value for key, value in counters["inductor"].items() if "cudagraph" in key}
    return {**variant, "step_s": seconds, "images_per_s": images_per_s, "warmup_s": warmup_s,
            "mfu": flops * images_per_s / peak if peak else None, "peak": peak_name, "gflop_per_image": flops / 1e9,
            "syncs_per_step": syncs, "loss": loss, "batch": batch, "device": device_name(device),
            "compile_backend": built["backend"], "inductor_cudagraph_counters": graphs,
            "cuda_graphs_captured": cuda_graphs_captured(variant.get("compile"), device, graphs), **memory(device)}


def cuda_graphs_captured(mode: str | None, device: torch.device, graph_counters: dict) -> bool | None:
    """Under reduce-overhead on CUDA: True when inductor skipped no graph (cudagraph_skips stays 0), else False."""
    if mode != "reduce-overhead" or device.type != "cuda":
        return None
    return graph_counters.get("cudagraph_skips", 0) == 0


def cuda_child() -> dict:
    """A real kernel on the GPU and back, and what the GPU is: the proof's first section, seconds long."""
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    a = torch.randn(1024, 1024, device="cuda")
    checksum = float((a @ a).sum().item())  # launches, syncs and copies back: CUDA works end to end
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gb": props.total_memory / 2**30, "sms": props.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(), "cuda_runtime": torch.version.cuda, "checksum_finite":
            math.isfinite(checksum), "devices": torch.cuda.device_count()}


def loop_child(cfg_path: str, steps: int, window: int = 0) -> dict:
    """Syncs per steady-state step of the engine's loop body: the cached loader (pinned, non_blocking, theta drawn
    in the workers), device augmentation, channels_last, train_step and the stop vote; and over one whole logging
    window of `window` steps with its read at the end (the step counters and the Speedometer), as train.py runs it.
    The loader must hold 2 + steps + window batches."""
    from cityseg.config.load import load_config
    from cityseg.data.loaders import train_dataset
    from cityseg.distributed.runtime import make_accelerator
    from cityseg.distributed.stop_vote import StopVote
    from cityseg.labels import num_classes
    from cityseg.observe.speed import Speedometer
    from cityseg.train.setup import build_training
    from cityseg.train.step import StepStats, device_batch, train_step

    cfg = load_config(cfg_path, ["data.cache.device_augment=true", "train.channels_last=true"])
    accelerator = make_accelerator(cfg)
    train_set = train_dataset(cfg.data, cfg.seed)
    training = build_training(cfg, accelerator, num_classes(cfg.data.label_scheme), train_set)
    stats, vote = StepStats(accelerator.device), StopVote(accelerator, 1.0)
    batches = iter(training.loader)
    training.model.train()

    def step():
        images, masks = device_batch(*next(batches), cfg.data, cfg.train.channels_last)
        train_step(accelerator, training.model, training.optimizer, training.loss_fn, images, masks,
                   training.schedule.lr(0), cfg.optim.grad_clip, stats, 0)
        vote.any(False)

    speed = Speedometer(accelerator.device, 1, None, None)

    def logging_window():
        for _ in range(window):
            step()
            speed.add(cfg.data.batch_size, True)
        stats.take()
        speed.read(0.0)

    for _ in range(2):
        step()
    stats.take()
    speed.restart(0.0)
    per_step = count_syncs(step, repeats=steps)
    return {"syncs_per_step": per_step, "steps": steps, "window_steps": window,
            "syncs_per_window": count_syncs(logging_window, repeats=1) if window else None}


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}


# ---- in a child: full-resolution evaluation (sliding window + flip) of the trained run's weights

def eval_child(cfg_path: str, weights: str, images: int) -> dict:
    from cityseg.checkpoint import load_weights
    from cityseg.config.load import load_config
    from cityseg.data.loaders import eval_dataset
    from cityseg.distributed.runtime import make_accelerator
    from cityseg.evaluation.inference import segment_logits
    from cityseg.labels import num_classes
    from cityseg.model.build import build_model

    cfg = load_config(cfg_path, ["eval.mode=full", "eval.sliding=true", "eval.flip=true",
                                 "train.mixed_precision=bf16" if torch.cuda.is_available() else "train.mixed_precision='no'"])
    accelerator = make_accelerator(cfg)
    model = build_model(cfg.model, num_classes(cfg.data.label_scheme))
    load_weights(model, Path(weights))
    model = model.to(accelerator.device).eval()
    dataset = eval_dataset(cfg.data, cfg.seed, full_resolution=True)
    batch = [dataset[i][0] for i in range(min(images, len(dataset)))]
    height, width = batch[0].shape[-2:]
    net_size = [height, width]  # full resolution: the network sees the source size through the sliding window
    crop = [min(cfg.eval.crop_size[0], height), min(cfg.eval.crop_size[1], width)]
    cfg.eval.crop_size, cfg.eval.stride = crop, [max(1, c * 2 // 3) for c in crop]
    with torch.no_grad(), accelerator.autocast():
        segment_logits(model, batch[0][None].to(accelerator.device), net_size, cfg.eval)  # warm-up
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for image in batch:
            segment_logits(model, image[None].to(accelerator.device), net_size, cfg.eval).argmax(1).cpu()
    seconds = time.perf_counter() - started
    return {"images": len(batch), "size": [height, width], "window": crop, "flip": True,
            "images_per_s": len(batch) / seconds, **memory(accelerator.device)}
