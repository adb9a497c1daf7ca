"""The training and evaluation loops on accelerate: one flat loop from batch to optimizer.step()."""
from __future__ import annotations

import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from safetensors.torch import load_file

from cityseg import checkpoint
from cityseg.config import ConfigError, save_config
from cityseg.data.device_augment import augment_batch
from cityseg.data.loaders import eval_dataset, eval_loader, train_dataset, train_loader
from cityseg.labels import class_names
from cityseg.losses import build_loss
from cityseg.metrics import new_confusion, summarize, update_confusion
from cityseg.model import ModelError, average_batchnorm_stats, build_model
from cityseg.preemption import EXIT_REQUEUE, StopFlag, sum_across_ranks, write_requeue_marker
from cityseg.tracking import RunConsole, append_jsonl, rewind_jsonl


class TrainingError(RuntimeError):
    """A one-line, user-facing reason the run stopped (NaN loss, ...)."""


def make_accelerator(cfg) -> Accelerator:
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU (accelerate would silently run fp32 on "
                          "the CPU); use bf16 on the CPU")
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        # shuffle of epoch e = permutation seeded by (seed + e): the same on every rank, for any world size, replayable
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist.timeout_minutes))],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise ConfigError(f"the launcher started {launched} processes but accelerate found no GPU, so each would "
                          "train alone on all the data: set ACCELERATE_USE_CPU=1 to train on CPU processes over gloo")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_precision not in ("no", cfg.train.mixed_precision) and accelerator.is_main_process:
        print(f"warning: the launcher's mixed precision '{launcher_precision}' is ignored; the config's "
              f"train.mixed_precision '{cfg.train.mixed_precision}' applies", file=sys.stderr)
    return accelerator


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load model.safetensors (never a pickle); a wrong architecture or class count names the first mismatch."""
    path = Path(path)
    if path.is_dir():
        path = path / checkpoint.MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        state = checkpoint.clean_state_dict(load_file(str(path)))
    except Exception as err:  # noqa: BLE001 - a partial or foreign file
        raise ModelError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise ModelError(f"{path}: {key} has shape {tuple(tensor.shape)} but the model (model.* and "
                             f"data.label_scheme of the config) expects {tuple(own[key].shape)}")
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise ModelError(f"{path}: does not match model {type(model).__name__} of the config "
                         f"({len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. {example})")
    model.load_state_dict(state)


def lr_at(step: int, total_steps: int, optim_cfg) -> float:
    """Warmup then poly decay, a pure function of the step: resuming the step resumes the schedule."""
    if step < optim_cfg.warmup_steps:
        return optim_cfg.lr * (step + 1) / optim_cfg.warmup_steps
    if optim_cfg.schedule == "constant":
        return optim_cfg.lr
    progress = min(1.0, (step - optim_cfg.warmup_steps) / max(1, total_steps - optim_cfg.warmup_steps))
    return optim_cfg.lr * (1.0 - progress) ** optim_cfg.poly_power


@torch.inference_mode()
def evaluate_loader(model, loader, accelerator, num_classes: int, predict=None) -> torch.Tensor:
    """This rank's confusion matrix over its shard, summed over all ranks (each sample counted once)."""
    model.eval()
    confusion = new_confusion(num_classes, accelerator.device)
    for images, masks, _ in loader:
        images, masks = images.to(accelerator.device), masks.to(accelerator.device)
        with accelerator.autocast():
            logits = predict(images, masks.shape[-2:]) if predict else model(images)
        update_confusion(confusion, logits.argmax(1), masks)
    return accelerator.reduce(confusion, reduction="sum") if accelerator.num_processes > 1 else confusion


def resume_point(cfg, output_dir: Path, say) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        found = checkpoint.find_resume(output_dir, warn=say)
        say(f"resume: from {found}" if found else "resume: no checkpoint in output_dir, starting fresh")
        return found
    path = Path(cfg.train.resume)
    checkpoint.verify(path)
    say(f"resume: from {path}")
    return path


def train_step(accelerator, model, optimizer, loss_fn, images, masks, lr: float, grad_clip: float | None,
               stop_requested: bool) -> list[float]:
    """One forward / backward / update in accelerate's accumulation and autocast contexts (also what
    `cityseg bench` times). Returns [nonfinite, stop_count, loss_sum] agreed by all ranks; a non-finite loss
    skips the update on every rank."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), masks.long())
        agreed = sum_across_ranks(accelerator, [~torch.isfinite(loss.detach()), stop_requested, loss.detach()])
        if agreed[0]:
            optimizer.zero_grad(set_to_none=True)
            return agreed
        accelerator.backward(loss)
        if accelerator.sync_gradients and grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return agreed


def train(cfg) -> int:
    """Train per the config; returns the process exit code (0 done, EXIT_REQUEUE after a preemption save)."""
    accelerator = make_accelerator(cfg)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    output_dir = Path(cfg.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    set_seed(cfg.seed)
    names = class_names(cfg.data.label_scheme)
    train_set = train_dataset(cfg, bad_sample_log=output_dir / "skipped_samples.txt")
    val_set = eval_dataset(cfg)
    share = len(train_set) // world
    if share < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than each process's share of the "
                          f"training set ({len(train_set)} samples / {world} processes = {share})")

    model = build_model(cfg.model, len(names))
    if cfg.model.sync_bn:
        if accelerator.device.type == "cuda" and world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif is_main:
            print("warning: model.sync_bn needs more than one CUDA device; training with plain BatchNorm",
                  file=sys.stderr)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loader = train_loader(cfg, train_set, accelerator.process_index)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if cfg.train.compile:
        model = torch.compile(model)
    val_loader = eval_loader(cfg, val_set, accelerator.process_index, world)
    loss_fn = build_loss(cfg.loss.name)

    # optimizer steps; len(loader) is per rank and accelerate also steps on an epoch's last, shorter window
    steps_per_epoch = math.ceil(len(loader) / cfg.train.grad_accum)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    console = RunConsole(is_main, total_steps, cfg.train.log_every)
    console.print(f"cityseg: {world} process(es) on {accelerator.device.type}, mixed precision "
                  f"{cfg.train.mixed_precision}; global batch = {cfg.data.batch_size} per process x {world} "
                  f"processes x {cfg.train.grad_accum} accumulation = {cfg.data.batch_size * world * cfg.train.grad_accum}"
                  f"; {len(train_set)} train / {len(val_set)} val images; {total_steps} steps")

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_mIoU": None, "best_step": None, "nan_skipped": 0}
    start_from = resume_point(cfg, output_dir, console.print)
    if start_from is not None:
        try:
            accelerator.load_state(str(start_from))
        except Exception as err:  # noqa: BLE001 - name the checkpoint instead of a deep accelerate traceback
            raise checkpoint.CheckpointError(f"{start_from}: cannot be loaded into this run's model/optimizer "
                                             f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
        state.update(checkpoint.read_trainer_state(start_from))
        state.pop("files", None)
        if is_main:
            for log in ("train_log.jsonl", "metrics.jsonl"):
                rewind_jsonl(output_dir / log, state["step"])

    stop = StopFlag()
    stop.install(cfg.train.preempt_signals)
    console.start(state["step"])
    train_log = output_dir / "train_log.jsonl"
    last_saved_step = state["step"] if start_from is not None else None
    while state["step"] < total_steps and state["epoch"] < cfg.train.epochs:
        epoch = state["epoch"]
        loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        skip = state["batch_in_epoch"]
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        model.train()
        tick, images_seen = time.perf_counter(), 0
        window_loss, window_batches = 0.0, 0  # the logged loss: mean over ranks and the accumulation window
        for images, masks, indices in batches:
            if cfg.data.cache.dir and cfg.data.cache.device_augment:  # the loader sent uint8 samples
                images, masks = augment_batch(images, masks, indices, cfg.data, cfg.seed, epoch)
            if cfg.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            nonfinite, stop_count, loss_sum = train_step(
                accelerator, model, optimizer, loss_fn, images, masks, lr_at(state["step"], total_steps, cfg.optim),
                cfg.optim.grad_clip, stop.received is not None)
            if nonfinite:
                if cfg.train.on_nan == "error":
                    raise TrainingError(f"loss is NaN/Inf at step {state['step']} (epoch {epoch}); stopped "
                                        "before any non-finite weights were saved (train.on_nan=skip skips such steps)")
                state["nan_skipped"] += 1
            else:
                window_loss, window_batches = window_loss + loss_sum, window_batches + 1
            state["batch_in_epoch"] += 1
            images_seen += images.shape[0] * world
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            step = state["step"]
            elapsed = time.perf_counter() - tick
            mean_loss = window_loss / (world * window_batches) if window_batches else math.nan
            record = {"step": step, "epoch": epoch, "loss": mean_loss,
                      "lr": optimizer.param_groups[0]["lr"], "images_per_s": images_seen / max(elapsed, 1e-9)}
            if is_main and (step % cfg.train.log_every == 0 or step == total_steps):
                append_jsonl(train_log, record)
            console.step(step, epoch, record["loss"], record["lr"], record["images_per_s"])
            window_loss, window_batches = 0.0, 0
            if step >= total_steps:
                break  # the last step: finish normally (evaluate, save) even if a stop was asked for
            if stop_count:
                saved = checkpoint.save(accelerator, output_dir, state, cfg.checkpoint.keep_last)
                console.close()
                console.print(f"preempted: checkpoint {saved} written at step {step}; exit {EXIT_REQUEUE} (requeue)")
                if is_main:
                    write_requeue_marker(saved)
                accelerator.wait_for_everyone()  # no rank exits (and makes srun stop the step) before the marker
                return EXIT_REQUEUE
            ends_epoch = state["batch_in_epoch"] >= len(loader)  # the epoch-end save (after validation) follows
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and not ends_epoch:
                last_saved_step = step
                checkpoint.save(accelerator, output_dir, state, cfg.checkpoint.keep_last)
        epoch_done = state["batch_in_epoch"] >= len(loader)
        if epoch_done:
            state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        if (epoch_done and state["epoch"] % cfg.train.eval_every_epochs == 0) or state["step"] >= total_steps:
            average_batchnorm_stats(accelerator.unwrap_model(model), accelerator)  # ranks validate the saved model
            metrics = summarize(evaluate_loader(accelerator.unwrap_model(model), val_loader, accelerator,
                                                len(names)), names)
            record = {"epoch": state["epoch"], "step": state["step"], **metrics}
            if is_main:
                append_jsonl(output_dir / "metrics.jsonl", record)
            console.evaluation(metrics, state["step"], state["epoch"])
            is_best = state["best_mIoU"] is None or metrics["mIoU"] > state["best_mIoU"]
            if is_best and not math.isnan(metrics["mIoU"]):
                state["best_mIoU"], state["best_step"] = metrics["mIoU"], state["step"]
        if last_saved_step != state["step"]:
            last_saved_step = state["step"]
            saved = checkpoint.save(accelerator, output_dir, state, cfg.checkpoint.keep_last)
            if is_main and state["best_step"] == state["step"]:
                checkpoint.update_best(output_dir, saved, state["best_mIoU"], state["step"])

    console.close()
    accelerator.wait_for_everyone()
    accelerator.save_model(model, str(output_dir), safe_serialization=True)
    console.print(f"done: {state['step']} steps; weights in {output_dir / checkpoint.MODEL_FILE}; best mIoU "
                  f"{state['best_mIoU']} at step {state['best_step']}")
    accelerator.end_training()
    return 0


def evaluate(cfg, weights: str | Path, split: str | None = None) -> dict:
    """Metrics of saved weights on a split, sharded over the launched processes, at the training size."""
    accelerator = make_accelerator(cfg)
    names = class_names(cfg.data.label_scheme)
    dataset = eval_dataset(cfg, split)
    model = build_model(cfg.model, len(names))
    load_weights(model, weights)
    model.to(accelerator.device)
    loader = eval_loader(cfg, dataset, accelerator.process_index, accelerator.num_processes)
    confusion = evaluate_loader(model, loader, accelerator, len(names))
    return {"split": split or cfg.data.val_split, "images": len(dataset), **summarize(confusion, names)}
