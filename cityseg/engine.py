"""The training loop on accelerate: one flat loop from batch to optimizer.step(), validation at the training size."""
from __future__ import annotations

import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, broadcast_object_list, set_seed
from safetensors.torch import load_file

from cityseg import checkpoint
from cityseg.config import ConfigError, save_config
from cityseg.data.cityscapes import skipped_samples
from cityseg.data.device_augment import augment_batch
from cityseg.data.loaders import eval_dataset, eval_loader, train_dataset, train_loader
from cityseg.labels import class_names
from cityseg.losses import build_loss
from cityseg.metrics import new_confusion, summarize, update_confusion
from cityseg.model import ModelError, average_batchnorm_stats, build_model
from cityseg.preflight import check_batch_share, check_mixed_precision, check_output_dir
from cityseg.preemption import EXIT_INTERRUPTED, EXIT_REQUEUE, StopFlag, sum_across_ranks, write_requeue_marker
from cityseg.tracking import DataWait, RunConsole, append_jsonl, drop_records_after
from cityseg.wandb_run import WandbRun


class TrainingError(RuntimeError):
    """A one-line, user-facing reason the run stopped (NaN loss, ...)."""


def make_accelerator(cfg) -> Accelerator:
    check_mixed_precision(cfg.train.mixed_precision, torch.cuda.is_available())
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


def resume_point(cfg, output_dir: Path, accelerator, say) -> Path | None:
    """The checkpoint to continue from; for `auto` the main process picks and tells the others, so ranks never
    load different ones (on a shared filesystem a fresh save may become visible to them at different times)."""
    if cfg.train.resume == "none":
        existing = checkpoint.complete_checkpoints(output_dir)
        if existing:  # a later resume=auto would pick the old run's newest checkpoint: never mix two runs
            raise checkpoint.CheckpointError(
                f"{output_dir}: holds checkpoints of an earlier run (newest {existing[-1].name}); with "
                "train.resume=none use a new output_dir, or train.resume=auto to continue that run")
        return None
    if cfg.train.resume != "auto":
        path = Path(cfg.train.resume)
        checkpoint.verify(path)
        say(f"resume: from {path}")
        return path
    chosen = [None]
    if accelerator.is_main_process:
        found = checkpoint.find_resume(output_dir, warn=say)
        say(f"resume: from {found}" if found else "resume: no checkpoint in output_dir, starting fresh")
        chosen = [str(found) if found else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    return Path(chosen[0]) if chosen[0] else None


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
    stop = StopFlag()
    stop.install(cfg.train.preempt_signals)  # first: a signal during setup must not kill the process
    accelerator = make_accelerator(cfg)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    output_dir = Path(cfg.output_dir)
    set_seed(cfg.seed)
    names = class_names(cfg.data.label_scheme)
    skipped_log = output_dir / "skipped_samples.txt"
    train_set = train_dataset(cfg, bad_sample_log=skipped_log)
    val_set = eval_dataset(cfg)
    check_batch_share(cfg.data.batch_size, len(train_set), world)
    check_output_dir(output_dir, create=True)  # the cheap preflight passed: only now write into output_dir
    if is_main:
        save_config(cfg, output_dir / "config.yaml")

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

    # the run shape says what a step and a batch position mean; the LR schedule needs no state: lr_at(step)
    shape = {"world_size": world, "batch_size": cfg.data.batch_size, "grad_accum": cfg.train.grad_accum}
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_mIoU": None, "best_step": None, "nan_skipped": 0,
             **shape}
    start_from = resume_point(cfg, output_dir, accelerator, console.print)
    if start_from is not None:
        saved = checkpoint.read_trainer_state(start_from)
        state.update(checkpoint.adapt_position(saved, start_from, shape, steps_per_epoch, console.print))
        try:  # weights, optimizer, scaler, RNG (torch.load weights_only=True)
            accelerator.load_state(str(start_from))
        except Exception as err:  # noqa: BLE001 - name the checkpoint instead of a deep accelerate traceback
            raise checkpoint.CheckpointError(f"{start_from}: cannot be loaded into this run's model/optimizer "
                                             f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
    if is_main:  # records past the starting step (from a killed attempt) are written again by this run
        for log in (output_dir / "train_log.jsonl", output_dir / "metrics.jsonl"):
            drop_records_after(log, state["step"])
    wandb_run = WandbRun(cfg, accelerator, output_dir, resumed=start_from is not None, val_set=val_set,
                         say=console.print)

    console.start(state["step"])
    train_log = output_dir / "train_log.jsonl"
    last_saved_step = state["step"] if start_from is not None else None
    latest = start_from  # the newest checkpoint of this run: its weights become model.safetensors
    while state["step"] < total_steps and state["epoch"] < cfg.train.epochs:
        epoch = state["epoch"]
        loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        skip = state["batch_in_epoch"]
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        model.train()
        tick, images_seen, data_wait = time.perf_counter(), 0, DataWait()
        window_loss, window_batches = 0.0, 0  # the logged loss: mean over ranks and the accumulation window
        for images, masks, indices in data_wait.timed(batches):
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
                      "lr": optimizer.param_groups[0]["lr"], "images_per_s": images_seen / max(elapsed, 1e-9),
                      "data_wait": data_wait.seconds / max(elapsed, 1e-9)}  # fraction of this rank's time
            if is_main and (step % cfg.train.log_every == 0 or step == total_steps):
                append_jsonl(train_log, record)
                wandb_run.log_step(record)
            console.step(step, epoch, record["loss"], record["lr"], record["images_per_s"])
            window_loss, window_batches = 0.0, 0
            if step >= total_steps:
                break  # the last step: finish normally (evaluate, save) even if a stop was asked for
            if stop_count:
                saved = checkpoint.save(accelerator, output_dir, state, cfg.checkpoint.keep_last)
                console.close()
                interrupted = stop.received == "SIGINT"  # a user's Ctrl-C: stop for good, no requeue
                code = EXIT_INTERRUPTED if interrupted else EXIT_REQUEUE
                if interrupted:
                    console.print(f"interrupted: checkpoint {saved} written at step {step}; the same command "
                                  f"resumes; exit {code}")
                else:
                    console.print(f"preempted: checkpoint {saved} written at step {step}; exit {code} (requeue)")
                if is_main:
                    if not interrupted:
                        write_requeue_marker(saved)
                    wandb_run.finish(state, exit_code=code)
                accelerator.wait_for_everyone()  # no rank exits (and makes srun stop the step) before the marker
                return code
            ends_epoch = state["batch_in_epoch"] >= len(loader)  # the epoch-end save (after validation) follows
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and not ends_epoch:
                last_saved_step = step
                latest = checkpoint.save(accelerator, output_dir, state, cfg.checkpoint.keep_last)
        epoch_done = state["batch_in_epoch"] >= len(loader)
        if epoch_done:
            state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        evaluated = (epoch_done and state["epoch"] % cfg.train.eval_every_epochs == 0) or state["step"] >= total_steps
        if evaluated:
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
            wandb_run.log_eval(record, accelerator.unwrap_model(model), state)
        if last_saved_step != state["step"] or evaluated:  # also a resumed step whose epoch ended just now
            last_saved_step = state["step"]
            latest = checkpoint.save(accelerator, output_dir, state, cfg.checkpoint.keep_last)
            if is_main and state["best_step"] == state["step"]:
                if checkpoint.update_best(output_dir, latest, state["best_mIoU"], state["step"]):
                    wandb_run.log_best_checkpoint(output_dir / "checkpoints" / "best", state)

    console.close()
    accelerator.wait_for_everyone()
    if is_main:  # the final checkpoint's weights, replaced atomically: never a half-written model.safetensors
        checkpoint.export(latest, output_dir, overwrite=True)
    console.print(f"done: {state['step']} steps; weights in {output_dir / checkpoint.MODEL_FILE}; best mIoU "
                  f"{state['best_mIoU']} at step {state['best_step']}")
    if state["nan_skipped"]:
        console.print(f"warning: {state['nan_skipped']} step(s) skipped for a NaN/Inf loss (train.on_nan=skip)")
    for line in skipped_samples(skipped_log):
        console.print(line)
    wandb_run.finish(state)
    accelerator.end_training()
    return 0

