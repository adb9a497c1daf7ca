"""The GPU proof's diagnosis: where a step's time goes (profiler), batch size, compile variants, the loss, and
what a training run spends outside its steps (epoch-start stall, validation, checkpoints)."""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from cityseg.bench.gpu_measure import build_step, memory
from cityseg.observe.flops import device_name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, stats, device, steps: int) -> dict:
    """Host seconds per step to issue `steps` steps (no wait) and wall seconds per step until the device is done."""
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    issued = time.perf_counter() - started
    stats.take()  # waits for the device
    return {"host_s_per_step": issued / steps, "wall_s_per_step": (time.perf_counter() - started) / steps}


def profile_summary(step, device: torch.device, steps: int, top: int = 20) -> dict:
    """torch.profiler over `steps` steady steps: device activities (kernels, copies) per step, the share of the
    profiled span the device was busy (union of its intervals), CPU op time per step and the costliest ops.
    On a CPU there is no device timeline: the busy/idle fields are None and the table lists CPU ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = list(prof.events())
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
    span_us = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    cpu_self_us = sum(e.self_cpu_time_total for e in cpu_ops)
    summary = {"steps": steps, "profiled_span_s": span_us / 1e6, "cpu_op_time_per_step_s": cpu_self_us / 1e6 / steps,
               "cpu_ops_per_step": len(cpu_ops) / steps}
    if not cuda:
        totals = defaultdict(lambda: [0.0, 0])
        for e in cpu_ops:
            totals[e.name][0] += e.self_cpu_time_total
            totals[e.name][1] += 1
        return {**summary, "kernels_per_step": None, "device_busy_share": None, "device_idle_share": None,
                "top_cpu_ops": _top(totals, cpu_self_us, steps, top),
                "note": "CPU: no device timeline; top_cpu_ops by self CPU time"}
    totals, intervals = defaultdict(lambda: [0.0, 0]), []
    for e in kernels:
        totals[e.name][0] += e.time_range.elapsed_us()
        totals[e.name][1] += 1
        intervals.append((e.time_range.start, e.time_range.end))
    busy_us = _union_length(intervals)
    return {**summary, "kernels_per_step": len(kernels) / steps, "device_busy_share": busy_us / span_us,
            "device_idle_share": 1 - busy_us / span_us, "device_time_per_step_s": busy_us / 1e6 / steps,
            "top_kernels": _top(totals, sum(t for t, _ in totals.values()), steps, top)}


def _top(totals: dict, total_us: float, steps: int, top: int) -> list[dict]:
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return [{"name": name[:120], "share": us / max(total_us, 1e-9), "ms_per_step": us / 1e3 / steps,
             "calls_per_step": count / steps} for name, (us, count) in ranked]


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def loss_timing(cfg, batch: int, steps: int) -> dict:
    """Forward + backward of the configured loss (build_loss(cfg.loss): whatever loss.name builds today) against
    smp's one-hot DiceLoss, on logits of the training shape: the loss's own share of a step."""
    from segmentation_models_pytorch.losses import DiceLoss

    from cityseg.labels import IGNORE_INDEX, num_classes
    from cityseg.train.losses import build_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = num_classes(cfg.data.label_scheme)
    height, width = cfg.data.image_size
    logits = torch.randn(batch, classes, height, width, device=device, requires_grad=True)
    masks = torch.randint(0, classes, (batch, height, width), device=device)
    result = {}
    for name, loss_fn in (("configured", build_loss(cfg.loss, classes).to(device)),
                          ("smp_dice_one_hot", DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX))):
        loss_fn(logits, masks).backward()  # warm-up
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            loss_fn(logits, masks).backward()
        _sync(device)
        pixel_loss = getattr(loss_fn, "loss", loss_fn)  # build_loss's OutputLoss holds the pixel loss
        result[name] = {"class": f"{type(pixel_loss).__module__}.{type(pixel_loss).__name__}",
                        "ms_per_call": 1000 * (time.perf_counter() - started) / steps}
    result["configured"]["loss.name"] = cfg.loss.name
    return {"batch": batch, **result}


def built_for(cfg_path: str, batch: int | None, warmup: int) -> tuple[dict, object]:
    """The config's eager step (its precision and memory format) at `batch`, warmed up: (build_step's dict, cfg)."""
    from cityseg.config.load import load_config

    cfg = load_config(cfg_path, [])
    built = build_step(cfg, batch or cfg.data.batch_size, bool(cfg.train.channels_last))
    for _ in range(warmup):
        built["step"]()
    built["stats"].take()
    return built, cfg


def profile_child(cfg_path: str, profile_steps: int, warmup: int) -> dict:
    """Where a step's time goes at the config's batch: the profiler's top kernels, host issue time against wall."""
    built, cfg = built_for(cfg_path, None, warmup)
    return {"device": device_name(built["device"]), "batch": cfg.data.batch_size,
            "precision": cfg.train.mixed_precision, "channels_last": bool(cfg.train.channels_last),
            "unprofiled": timed_steps(built["step"], built["stats"], built["device"], profile_steps),
            "profile": profile_summary(built["step"], built["device"], profile_steps)}


def batch_sweep_child(cfg_path: str, batches: list[int], repeats: int, steps: int, warmup: int) -> dict:
    """Step time per batch size (median of `repeats`), each batch's own peak memory."""
    sweep = {}
    for batch in batches:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        built, _ = built_for(cfg_path, batch, warmup)
        seconds = [timed_steps(built["step"], built["stats"], built["device"], steps)["wall_s_per_step"]
                   for _ in range(repeats)]
        sweep[str(batch)] = {"step_s": statistics.median(seconds), "repeats_s": seconds,
                             "images_per_s": batch / statistics.median(seconds), **memory(built["device"])}
        del built
    return {"batches": sweep}


def loss_child(cfg_path: str, steps: int) -> dict:
    from cityseg.config.load import load_config

    cfg = load_config(cfg_path, [])
    return loss_timing(cfg, cfg.data.batch_size, steps)


# ---- in a child: a whole training run (train.py's engine), its time outside the steps measured separately

def run_child(cfg_path: str) -> dict:
    """engine.train on the config, end to end, with the seconds the loop itself records outside its steps
    (validations, saves, each epoch's first batch): steady-state windows, the epoch-start stall, totals."""
    from cityseg.config.load import load_config
    from cityseg.train import loop as engine

    cfg = load_config(cfg_path, [])
    phases = {"validate": [], "save": [], "epoch_start": []}
    started = time.perf_counter()
    code = engine.train(cfg, phases=phases)
    wall = time.perf_counter() - started
    return {"exit_code": code, **run_summary(Path(cfg.output_dir), cfg, phases, wall)}


def run_summary(output_dir: Path, cfg, phases: dict, wall: float) -> dict:
    import json

    records = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    log_every = cfg.train.log_every
    first_in_epoch = {min(r["step"] for r in records if r["epoch"] == epoch) for epoch in {r["epoch"] for r in records}}
    # steady: a full window that is not the first of its epoch (that one holds the epoch-start stall)
    steady = [r for r in records if r["step"] not in first_in_epoch and r["step"] % log_every == 0] or records
    steps, epochs = records[-1]["step"], records[-1]["epoch"]
    images = steps * cfg.data.batch_size * cfg.train.grad_accum
    return {"steps": steps, "epochs": epochs, "steps_per_epoch": steps // max(epochs, 1), "log_every": log_every,
            "steady_images_per_s": statistics.median(r["images_per_s"] for r in steady),
            "steady_data_wait": statistics.median(r["data_wait"] for r in steady),
            "steady_step_s": statistics.median(r["step_time_s"] for r in steady),
            "first_window_images_per_s": [r["images_per_s"] for r in records if r["step"] in first_in_epoch],
            "epoch_start_stall_s": phases["epoch_start"], "validation_s": phases["validate"],
            "checkpoint_s": phases["save"], "wall_s": wall, "end_to_end_images_per_s": images / wall,
            "mfu": statistics.median(r["mfu"] for r in steady) if "mfu" in steady[0] else None}


def tile_tree(source: Path, target: Path, counts: dict) -> dict:
    """A Cityscapes-layout tree of counts[split] pairs made of symlinks to `source`'s pairs, cycled: an epoch of
    real length (2,975) without writing or caching that many distinct files. Same bytes, so it times; it does not
    train to any mIoU."""
    from cityseg.data.cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX, find_pairs

    for split, count in counts.items():
        pairs = find_pairs(source, split)
        for i in range(count):
            image, label = pairs[i % len(pairs)]
            stem = f"tile_{i:06d}_000019"
            for src, kind, suffix in ((image, "leftImg8bit", IMAGE_SUFFIX), (label, "gtFine", LABEL_SUFFIX)):
                link = target / kind / split / "tile" / f"{stem}{suffix}"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(src.resolve())
    return dict(counts)


def _seconds(values) -> str:
    return "/".join(f"{v:.2f}" for v in values or []) or "-"


def diagnosis_rows(report: dict) -> list[tuple[str, dict]]:
    """The proof table's rows for the diagnosis: (label, a row with the table's keys, or error / skipped)."""
    rows = []
    profile = report.get("profile", {}).get("profile")
    if profile:
        busy = profile["device_busy_share"]
        rows.append((f"profile, {profile['steps']} steps: {profile['cpu_ops_per_step']:.0f} CPU ops and "
                     f"{profile['kernels_per_step'] or 0:.0f} kernels per step, device busy "
                     f"{'n/a (CPU)' if busy is None else f'{100 * busy:.0f}%'}, CPU op time "
                     f"{1000 * profile['cpu_op_time_per_step_s']:.1f} ms/step", {}))
    elif "profile" in report:
        rows.append(("profile", report["profile"]))
    sweep = report.get("sweep", {}).get("batch", {})
    for batch, row in sweep.get("batches", {}).items():
        rows.append((f"step at batch {batch} (median of {len(row['repeats_s'])})", row))
    if "error" in sweep or "skipped" in sweep:
        rows.append(("batch sweep", sweep))
    loss = report.get("loss", {})
    if "configured" in loss:
        rows.append((f"loss fwd+bwd at batch {loss['batch']}: configured {loss['configured']['class'].split('.')[-1]}"
                     f" {loss['configured']['ms_per_call']:.1f} ms, smp one-hot Dice "
                     f"{loss['smp_dice_one_hot']['ms_per_call']:.1f} ms", {}))
    elif loss:
        rows.append(("loss timing", loss))
    for name, run in report.get("runs", {}).items():
        if "error" in run or "skipped" in run:
            rows.append((f"train.py run {name}", run))
            continue
        rows.append((f"train.py run {name}: {run['steps_per_epoch']} steps/epoch x {run['epochs']}, end to end "
                     f"(stall {_seconds(run['epoch_start_stall_s'])} s, val {_seconds(run['validation_s'])} s, "
                     f"ckpt {_seconds(run['checkpoint_s'])} s)",
                     {"images_per_s": run["end_to_end_images_per_s"], "mfu": run["mfu"]}))
        rows.append((f"train.py run {name}: steady-state windows of {run['log_every']} steps",
                     {"images_per_s": run["steady_images_per_s"], "data_wait_last_epoch": run["steady_data_wait"]}))
    return rows
