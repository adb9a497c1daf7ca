"""`cityseg bench`: seed vs cityseg data paths, the engine's step vs a bare loop, CPU layouts, the stop vote's cost."""
from __future__ import annotations

import copy
import json
import multiprocessing
import os
import queue
import socket
import statistics
import tempfile
import time
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cityseg.bench.step_bytes import HBM_TB_PER_S, ceiling, count_training_step
from cityseg.bench.stop_vote import start_votes, vote_report
from cityseg.config.load import from_dict, to_dict
from cityseg.data.cache import CachedPairs, check_manifest, write_cache, write_manifest
from cityseg.data.cityscapes import CityscapesPairs, DataError, collate, find_pairs
from cityseg.data.device_augment import augment_batch
from cityseg.data.synthetic import write_synthetic
from cityseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform
from cityseg.distributed.runtime import make_accelerator
from cityseg.labels import label_lut, num_classes
from cityseg.model.build import unwrap_for_eval
from cityseg.train.optim import build_optimizer
from cityseg.train.setup import build_training
from cityseg.train.step import StepStats, train_step

# ---- the seed recipe's data path, re-implemented faithfully: PIL, per-sample albumentations, in-loop encoding

class SeedStyleDataset(Dataset):
    """The blog recipe's dataset: PIL open → np.array → Resize + HorizontalFlip + Normalize + ToTensorV2."""

    def __init__(self, pairs, size):
        self.pairs = pairs
        self.transform = A.Compose([A.Resize(size[0], size[1]), A.HorizontalFlip(),
                                    A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, label_path = self.pairs[index]
        image = np.array(Image.open(image_path).convert("RGB"))
        mask = np.array(Image.open(label_path))
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"]


def seed_encode_segmap(mask: torch.Tensor) -> torch.Tensor:
    """The recipe's encode_segmap, run in its training loop on each batch: one masked assignment per class."""
    ignore_index = 255
    void_classes = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, -1]
    valid_classes = [ignore_index, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    class_map = dict(zip(valid_classes, range(len(valid_classes))))
    for void in void_classes:
        mask[mask == void] = ignore_index
    for valid in valid_classes:
        mask[mask == valid] = class_map[valid]
    return mask


# ---- loaders: img/s of one loader process (num_workers=0) over the same files

def bench_pairs(cfg, count: int, workdir: Path, quick: bool):
    """The first `count` training pairs of data.root, or synthetic full-resolution (1024x2048) ones."""
    if not quick:
        try:
            return find_pairs(cfg.data.root, cfg.data.train_split)[:count], Path(cfg.data.root), "data.root"
        except DataError:
            pass
    height, width = (128, 256) if quick else (1024, 2048)
    root = workdir / "synthetic"
    write_synthetic(root, n_train=count, n_val=0, height=height, width=width, seed=0)
    return find_pairs(root, "train"), root, f"synthetic {height}x{width}"


def time_pass(loader, after=None, min_seconds: float = 0.0) -> float:
    """Images per second of whole passes over the loader, repeated until min_seconds have passed."""
    images, start = 0, time.perf_counter()
    while True:
        for batch in loader:
            if after is not None:
                after(batch)
            images += len(batch[0])
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return images / elapsed


def loader_pipelines(cfg, pairs, root: Path, workdir: Path, batch: int) -> dict:
    size = list(cfg.data.image_size)
    lut = label_lut(cfg.data.label_scheme)
    split_dir = workdir / "cache" / "train"
    plan = write_cache(pairs, root, split_dir, size, cfg.data.label_scheme, lut)
    write_manifest(split_dir, root, pairs, size, cfg.data.label_scheme, plan)
    manifest = check_manifest(split_dir, root, pairs, size, cfg.data.label_scheme)

    def loader(dataset):
        return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0,
                          collate_fn=collate if not isinstance(dataset, SeedStyleDataset) else None)

    def seed_encode(batch_):
        seed_encode_segmap(batch_[1].long())

    def device_augment(batch_):
        augment_batch(batch_[0], batch_[1], batch_[2], cfg.data, cfg.seed, 0)

    return {
        "seed": (loader(SeedStyleDataset(pairs, size)), seed_encode),
        "uncached": (loader(CityscapesPairs(pairs, lut, train_transform(cfg.data), seed=cfg.seed)), None),
        "cached": (loader(CachedPairs(split_dir, manifest, train_transform(cfg.data), seed=cfg.seed)), None),
        "cached_uint8": (loader(CachedPairs(split_dir, manifest, None, seed=cfg.seed, raw=True)), None),
        "cached_batch_augment_cpu": (loader(CachedPairs(split_dir, manifest, None, seed=cfg.seed, raw=True)),
                                     device_augment),
    }


def bench_loaders(cfg, pairs, root, workdir, batch: int, repeats: int, min_seconds: float) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker is one thread (torch sets 1 in workers; cv2 is set to 1)
    try:
        pipelines = loader_pipelines(cfg, pairs, root, workdir, batch)
        for loader, after in pipelines.values():
            time_pass(loader, after)  # warm-up: page cache, lazy imports, albumentations set-up
        samples = {name: [] for name in pipelines}
        for repeat in range(repeats):  # alternate the pipelines so that load from others hits all alike
            names = list(pipelines) if repeat % 2 == 0 else list(reversed(pipelines))
            for name in names:
                samples[name].append(time_pass(*pipelines[name], min_seconds=min_seconds))
    finally:
        torch.set_num_threads(threads)
    result = {f"{name}_img_s": statistics.median(values) for name, values in samples.items()}
    seed = result["seed_img_s"]
    result.update({f"{name}_vs_seed": result[f"{name}_img_s"] / seed for name in pipelines if name != "seed"})
    result["samples_img_s"] = samples
    return result


# ---- training step: spawned processes (fresh threads settings, one precision each, real gloo for 2 ranks)

def _step_child(cfg_tree, precision, threads, batch, steps, repeats, rank, world, port, results, with_bare):
    os.environ.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(threads), ACCELERATE_MIXED_PRECISION="no")
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_tree)
    cfg.train.mixed_precision, cfg.train.grad_accum = precision, 1
    accelerator = make_accelerator(cfg)
    training, bare_model, bare_optimizer = step_parts(cfg, accelerator)
    stats = StepStats(accelerator.device)  # read never: the engine reads it every train.log_every steps
    generator = torch.Generator().manual_seed(rank)
    height, width = cfg.data.image_size
    images = torch.randn(batch, 3, height, width, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else images
    masks = torch.randint(0, num_classes(cfg.data.label_scheme), (batch, height, width), generator=generator)
    loss_fn = training.loss_fn
    training.model.train()
    bare_model.train()

    def engine_step():
        train_step(accelerator, training.model, training.optimizer, loss_fn, images, masks, training.schedule.lr(0),
                   cfg.optim.grad_clip, stats, 0)

    def bare_step():
        logits = bare_model(images)
        loss = loss_fn(logits, masks)
        loss.backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)

    def seconds_per_step(step) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    contenders = {"engine": engine_step, "bare": bare_step} if with_bare else {"engine": engine_step}
    for step in contenders.values():
        step()  # warm-up: allocator, oneDNN kernels, DDP buckets
    samples = {name: [] for name in contenders}
    for repeat in range(repeats):
        names = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
        for name in names:
            samples[name].append(seconds_per_step(contenders[name]))
    if rank == 0:
        results.put({name: statistics.median(values) for name, values in samples.items()} | {"samples": samples})
    accelerator.end_training()


def step_parts(cfg, accelerator):
    """(the engine's parts from build_training, a bare copy of its model, that copy's optimizer): the bare loop
    starts from the same weights with the same optimizer (build_optimizer's, fused as the engine's), so the
    comparison is the engine's overhead, not another kernel. Eager: the bare loop is not compiled either."""
    cfg = copy.deepcopy(cfg)
    cfg.train.compile = False
    torch.manual_seed(0)
    training = build_training(cfg, accelerator, num_classes(cfg.data.label_scheme))
    bare_model = copy.deepcopy(unwrap_for_eval(accelerator, training.model))
    return training, bare_model, build_optimizer(bare_model, cfg.optim)


def start_steps(cfg, precision: str, threads: int, world: int, batch: int, steps: int, repeats: int,
                with_bare: bool = False):
    """Start _step_child in `world` fresh processes (world > 1: data-parallel over gloo)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    children = [context.Process(target=_step_child, args=(to_dict(cfg), precision, threads, batch, steps, repeats,
                                                          rank, world, port, results, with_bare))
                for rank in range(world)]
    for child in children:
        child.start()
    return children, results


def collect_steps(started, timeout: float = 1800) -> dict:
    """Rank 0's timings of started step processes, after they exit."""
    children, results = started
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                result = results.get(timeout=2)
                break
            except queue.Empty:
                crashed = [child.exitcode for child in children if child.exitcode]
                if crashed or time.monotonic() > deadline:
                    raise RuntimeError(f"bench: a step process exited with {crashed[0]}" if crashed
                                       else f"bench: step processes still running after {timeout:.0f} s") from None
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
    failed = [child.exitcode for child in children if child.exitcode]
    if failed:
        raise RuntimeError(f"bench: a step process exited with {failed[0]}")
    return result


def bench_steps(cfg, batch: int, steps: int, repeats: int, concurrently: bool = False) -> tuple[dict, dict, dict]:
    """One layout after another (timings); `concurrently` (--quick) only checks that every layout runs."""
    layouts = {"fp32": ("no", 2, 1, batch, True), "bf16": ("bf16", 2, 1, batch, False),
               "two_by_one": ("no", 1, 2, batch // 2, False)}
    started, timed = {}, {}
    for name, (precision, threads, world, per_rank, with_bare) in layouts.items():
        started[name] = start_steps(cfg, precision, threads, world, per_rank, steps, repeats, with_bare)
        if not concurrently:
            timed[name] = collect_steps(started[name])
    timed = timed or {name: collect_steps(handle) for name, handle in started.items()}
    fp32, bf16, two_by_one = timed["fp32"], timed["bf16"], timed["two_by_one"]
    step = {"engine_s": fp32["engine"], "bare_s": fp32["bare"],
            "overhead_pct": 100.0 * (fp32["engine"] / fp32["bare"] - 1.0), "batch": batch,
            "image_size": list(cfg.data.image_size), "samples_s": fp32["samples"]}
    precision = {"fp32_img_s": batch / fp32["engine"], "bf16_img_s": batch / bf16["engine"],
                 "bf16_vs_fp32": fp32["engine"] / bf16["engine"]}
    processes = {"one_by_two_img_s": batch / fp32["engine"], "two_by_one_img_s": batch / two_by_one["engine"],
                 "two_by_one_vs_one_by_two": fp32["engine"] / two_by_one["engine"],
                 "note": "same global batch: 1 process x batch B x 2 threads vs 2 gloo ranks x batch B/2 x 1 thread"}
    return step, precision, processes


# ---- report

def new_table(title: str, columns: tuple[str, ...]):
    """A rich table whose first column (the label) is left-aligned and the figures right-aligned."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    return table


def print_table(report: dict) -> None:
    from rich.console import Console

    loader, step, precision, processes = report["loader"], report["step"], report["precision"], report["processes"]
    setup = report["setup"]
    table = new_table(f"cityseg bench: {setup['images']} images ({setup['source']}, {setup['source_size'][0]}x"
                      f"{setup['source_size'][1]}) → {setup['image_size'][0]}x{setup['image_size'][1]}, "
                      f"load average {report['machine']['load_before']} → {report['machine']['load_after']}",
                      ("measurement", "value", "ratio"))
    table.add_row("loader: seed-style (PIL, per-sample albumentations, in-loop encode)",
                  f"{loader['seed_img_s']:.1f} img/s", "1.0x")
    table.add_row("loader: cityseg uncached (OpenCV, one LUT)", f"{loader['uncached_img_s']:.1f} img/s",
                  f"{loader['uncached_vs_seed']:.2f}x")
    table.add_row("loader: cityseg cached (memmap shards, albumentations)", f"{loader['cached_img_s']:.1f} img/s",
                  f"{loader['cached_vs_seed']:.1f}x")
    table.add_row("loader: cityseg cached, uint8 out (device_augment: augmentation on the GPU)",
                  f"{loader['cached_uint8_img_s']:.1f} img/s", f"{loader['cached_uint8_vs_seed']:.1f}x")
    table.add_row("loader: cityseg cached, uint8 out + augment_batch on this CPU",
                  f"{loader['cached_batch_augment_cpu_img_s']:.1f} img/s",
                  f"{loader['cached_batch_augment_cpu_vs_seed']:.1f}x")
    table.add_row(f"step: bare PyTorch loop, batch {step['batch']}", f"{step['bare_s']:.3f} s", "")
    table.add_row("step: cityseg engine (train_step)", f"{step['engine_s']:.3f} s",
                  f"{step['overhead_pct']:+.1f}% overhead")
    table.add_row("step: fp32, 1 process x 2 threads", f"{precision['fp32_img_s']:.2f} img/s", "1.0x")
    table.add_row("step: bf16 autocast, 1 process x 2 threads", f"{precision['bf16_img_s']:.2f} img/s",
                  f"{precision['bf16_vs_fp32']:.2f}x")
    table.add_row(f"step: 2 processes x 1 thread (gloo, batch {step['batch'] // 2} each)",
                  f"{processes['two_by_one_img_s']:.2f} img/s", f"{processes['two_by_one_vs_one_by_two']:.2f}x")
    vote = report["vote"]
    table.add_row(f"stop vote, 2 gloo ranks: synchronous, every step ({vote['step_ms']:g} ms host step)",
                  f"{vote['sync_us_per_step']:.1f} us/step", "")
    table.add_row(f"stop vote, 2 gloo ranks: asynchronous, read every {vote['k']} steps ({vote['interval_s']:g} s)",
                  f"{vote['async_us_per_step']:.1f} us/step", f"{vote['sync_vs_async']:.0f}x less")
    if setup.get("quick"):  # tiny sizes, one repeat, layouts run at once: the ratios are noise
        table.title = f"SMOKE TEST (--quick), not a measurement: {table.title}"
        table.caption = ("--quick only checks that every measurement runs; its numbers and ratios mean nothing. "
                         "Measure without --quick on an idle machine.")
    Console().print(table)


def counted_step(cfg, tb_per_s: float = HBM_TB_PER_S) -> dict:
    """The configured step's bytes and ops (fake tensors, CUDA autocast's rules): counted, not timed."""
    counted = count_training_step(cfg)
    counted["ceiling"] = ceiling(counted, tb_per_s)
    return counted


def print_counted(counted: dict) -> None:
    from rich.console import Console

    limit = counted["ceiling"]
    table = new_table(f"counted, not timed: one training step of {counted['model']}, {counted['loss']} loss, "
                      f"batch {counted['batch']}, {counted['image_size'][0]}x{counted['image_size'][1]}, "
                      f"{counted['mixed_precision']}, channels_last {counted['channels_last']}",
                      ("part", "GB", "ATen ops"))
    for phase, moved in counted["gb_by_phase"].items():
        table.add_row(phase.replace("_", " "), f"{moved:.2f}", str(counted["ops_by_phase"][phase]))
    table.add_row("step", f"{counted['gb_per_step']:.2f}", str(counted["ops_per_step"]))
    for top in counted["top_ops"][:5]:
        table.add_row(f"  top op: {top['op']}", f"{top['gb']:.2f}", str(top["launches"]))
    check = counted["cuda_autocast_check"]
    table.caption = (f"ceiling at {limit['tb_per_s']:g} TB/s: {limit['img_s']:.0f} img/s ({limit['step_ms']:.2f} ms "
                     f"per step moving bytes alone); forward checked against CUDA autocast: {check['agree']}/"
                     f"{check['ops']} ops agree. {counted['compiled']}")
    Console().print(table)


def bench(cfg, json_path=None, quick: bool = False, images: int | None = None, batch: int | None = None,
          repeats: int | None = None, tb_per_s: float = HBM_TB_PER_S, count_only: bool = False) -> dict:
    """Run every measurement (count_only: only the counted step), print the tables, write JSON; returns the
    report."""
    counted = counted_step(cfg, tb_per_s)  # the configured sizes, whatever --quick measures
    if count_only:
        print_counted(counted)
        if json_path:
            Path(json_path).write_text(json.dumps({"counted": counted}, indent=2))
        return {"counted": counted}
    cfg = copy.deepcopy(cfg)
    if quick:
        cfg.data.image_size = [32, 64]
    images = images or (4 if quick else 16)
    batch = batch or (2 if quick else 8)
    repeats = repeats or (1 if quick else 5)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cityseg_bench_") as tmp:
        pairs, root, source = bench_pairs(cfg, images, Path(tmp), quick)
        width, height = Image.open(pairs[0][0]).size  # the header only
        loader = bench_loaders(cfg, pairs, root, Path(tmp), batch, repeats, min_seconds=0.0 if quick else 1.0)
    step, precision, processes = bench_steps(cfg, max(2, batch), steps=1 if quick else 2, repeats=repeats,
                                             concurrently=quick)
    vote_step_s, vote_interval_s = (0.001, 0.02) if quick else (0.002, 1.0)  # k about 20 / 500 steps
    vote = vote_report(collect_steps(start_votes(vote_step_s, 3 * round(vote_interval_s / vote_step_s),
                                                 min(repeats, 3), vote_interval_s)), vote_step_s, vote_interval_s)
    report = {
        "setup": {"quick": quick, "images": len(pairs), "source": source, "source_size": [height, width], "image_size": list(cfg.data.image_size), "loader_batch": batch,
                  "repeats": repeats, "model": f"{cfg.model.arch}/{cfg.model.encoder}", "loss": cfg.loss.name},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "load_before": round(load_before, 2),
                    "load_after": round(os.getloadavg()[0], 2)},
        "loader": loader, "step": step, "precision": precision, "processes": processes, "vote": vote,
        "counted": counted,
    }
    print_table(report)
    print_counted(counted)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report
