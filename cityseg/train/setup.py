"""A run built in one place: accelerator, data, model, loss, optimizer, LR schedule, EMA, trackers, the resume point."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from cityseg import checkpoint
from cityseg.config.load import save_config
from cityseg.config.schema import compile_mode
from cityseg.data.loaders import eval_dataset, eval_loader, train_dataset, train_stream
from cityseg.data.normalization import resolve_normalization
from cityseg.data.transforms import padding_note
from cityseg.distributed import run_lock
from cityseg.distributed.runtime import make_accelerator
from cityseg.labels import class_names
from cityseg.model.build import (
    build_model,
    convert_sync_batchnorm,
    training_logits_as_computed,
    unwrap_for_eval,
)
from cityseg.observe.console import RunConsole
from cityseg.observe.records import (
    CONFIG_CHANGES,
    METRICS_LOG,
    TRAIN_LOG,
    append_jsonl,
    drop_records_after,
)
from cityseg.observe.trackers import Trackers, build_trackers
from cityseg.train import resume as resume_check
from cityseg.train.ema import attach_ema
from cityseg.train.losses import build_loss
from cityseg.train.optim import Schedule, build_optimizer
from cityseg.train.preflight import (
    check_batch_share,
    check_data_files,
    check_output_dir,
    check_train_shape,
    check_weights,
)


@dataclass
class Training:
    """What train_step needs, as train.py runs it; `cityseg bench` and the GPU proof time these same parts."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    schedule: Schedule
    loader: object = None  # the training stream; None where the caller feeds its own batches
    steps_per_epoch: int | None = None
    ema: object = None  # cityseg.train.ema.WeightEMA when train.ema_decay is set


def prepare_model(model_cfg, train_cfg, accelerator, num_classes: int) -> torch.nn.Module:
    """The model as trained: sync-BN across CUDA ranks when asked, channels_last memory, cuDNN autotuning."""
    model = build_model(model_cfg, num_classes)
    if model_cfg.sync_bn:
        if accelerator.device.type == "cuda" and accelerator.num_processes > 1:
            model = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
        elif accelerator.is_main_process:
            print("warning: model.sync_bn needs more than one CUDA device; training with plain BatchNorm",
                  file=sys.stderr)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training shapes are fixed: autotune each convolution once
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores, as cuDNN's convolutions
    return model


def run_length(train_cfg, loader) -> tuple[int | None, int]:
    """(optimizer steps per epoch, the schedule's total steps). Without a loader (the caller's own batches) the
    schedule spans train.max_steps, or one step."""
    if loader is None:
        return None, train_cfg.max_steps or 1
    # optimizer steps; len(loader) is per rank and accelerate also steps on an epoch's last, shorter window
    steps_per_epoch = math.ceil(len(loader) / train_cfg.grad_accum)
    # train.epochs null: iteration-based, train.max_steps alone is the schedule (epochs follow from the data)
    total_steps = train_cfg.max_steps if train_cfg.epochs is None else train_cfg.epochs * steps_per_epoch
    if train_cfg.max_steps is not None:
        total_steps = min(total_steps, train_cfg.max_steps)
    return steps_per_epoch, total_steps


def build_training(cfg, accelerator, num_classes: int, train_set=None,
                   compile_options: dict | None = None) -> Training:
    """Every part of a training step, built and prepared in the order resuming relies on (the RNG draws).

    train_set None: no loader, the caller feeds its own batches (the benchmarks' synthetic ones). compile_options:
    more torch.compile arguments under train.compile (the GPU proof's CPU backend); None: inductor."""
    model = prepare_model(cfg.model, cfg.train, accelerator, num_classes)
    check_train_shape(cfg.data, model, cfg.model)  # smp would refuse the first batch with a traceback
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    training_logits_as_computed(unwrap_for_eval(accelerator, model))  # no fp32 copy of the logits in the step
    # one iterator for the run: prefetches across epoch ends
    loader = None if train_set is None else train_stream(
        cfg.data, train_set, accelerator, seed=cfg.seed, epochs=cfg.train.epochs,
        preempt_signals=cfg.train.preempt_signals, channels_last=cfg.train.channels_last)
    ema = attach_ema(accelerator, accelerator.unwrap_model(model), cfg.train.ema_decay)  # before any load_state
    loss_fn = build_loss(cfg.loss, num_classes).to(accelerator.device)
    mode = compile_mode(cfg.train)
    if mode is not None:  # the loss too: its softmax, per-class sums and their backward fuse in its own graph
        model, loss_fn = (compile_module(part, mode, compile_options) for part in (model, loss_fn))
    steps_per_epoch, total_steps = run_length(cfg.train, loader)
    schedule = Schedule.for_run(cfg, accelerator.num_processes, total_steps)
    return Training(model, optimizer, loss_fn, schedule, loader, steps_per_epoch, ema)


def compile_module(module: torch.nn.Module, mode: str, options: dict | None) -> torch.nn.Module:
    """torch.compile in train.compile's mode; a backend other than inductor (options["backend"]) takes no mode."""
    options = dict(options or {})
    if options.get("backend", "inductor") == "inductor":
        options["mode"] = mode
    return torch.compile(module, **options)


@dataclass
class Run:
    """Everything one training run holds, built once by `setup` and passed to the named steps below."""
    cfg: object
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: object
    val_loader: object
    train_set: object
    loss_fn: object
    names: list[str]
    output_dir: Path
    total_steps: int
    console: RunConsole
    trackers: Trackers | None = None  # console, JSONL logs, W&B, TensorBoard, the step file
    state: dict = field(default_factory=dict)
    latest: Path | None = None  # the newest checkpoint of this run: its weights become model.safetensors
    last_saved_step: int | None = None
    ema: object = None  # cityseg.train.ema.WeightEMA when train.ema_decay is set: validated and exported instead
    schedule: Schedule | None = None  # the LR of each step, global-batch factor included
    loop: dict | None = None  # train_epoch's parts kept across epochs: device counters, stop vote, throughput
    stop_after_epoch: bool = False  # a stop agreed on an epoch's last step: leave after its validation and save
    # seconds of each validation, save and epoch's first batch (its wait): the GPU proof's diagnosis reads them
    phases: dict = field(default_factory=lambda: {"validate": [], "save": [], "epoch_start": []})


def setup(cfg, phases: dict | None = None) -> Run:
    """Accelerator, data, model, optimizer and the step count; nothing is written before the cheap checks pass."""
    accelerator = make_accelerator(cfg)
    world = accelerator.num_processes
    output_dir = Path(cfg.output_dir)
    set_seed(cfg.seed)
    resolve_normalization(cfg.data, cfg.model)  # data.mean / std null: the encoder's, recorded in config.yaml
    names = class_names(cfg.data.label_scheme)
    check_data_files(cfg.data, warn=lambda line: accelerator.is_main_process and print(line, file=sys.stderr))
    if (note := padding_note(cfg.data)) and accelerator.is_main_process:
        print(note, flush=True)  # at start: a step on mostly padding is far slower than the image size suggests
    train_set = train_dataset(cfg.data, cfg.seed, bad_sample_log=output_dir / "skipped_samples.txt")
    val_set = eval_dataset(cfg.data, cfg.seed)
    check_batch_share(cfg.data.batch_size, len(train_set), world)
    check_weights(cfg.model)  # missing and offline: one line now, not a minute of hub retries
    check_output_dir(output_dir, create=True)  # the cheap preflight passed: only now write into output_dir
    run_lock.hold(output_dir, accelerator)  # before anything is written: a second run on it stops here

    training = build_training(cfg, accelerator, len(names), train_set)
    val_loader = eval_loader(cfg.data, val_set, accelerator.process_index, world,
                             preempt_signals=cfg.train.preempt_signals)
    total_steps = training.schedule.total_steps
    console = RunConsole(accelerator.is_main_process, total_steps, cfg.train.log_every)
    global_batch = cfg.data.batch_size * world * cfg.train.grad_accum
    console.print(f"cityseg: {world} process(es) on {accelerator.device.type}, mixed precision "
                  f"{cfg.train.mixed_precision}; global batch = {cfg.data.batch_size} per process x {world} "
                  f"processes x {cfg.train.grad_accum} accumulation = {global_batch}"
                  f"; {len(train_set)} train / {len(val_set)} val images; {total_steps} steps")
    run = Run(cfg, accelerator, training.model, training.optimizer, training.loader, val_loader, train_set,
              training.loss_fn, names, output_dir, total_steps, console, ema=training.ema, schedule=training.schedule)
    if phases is not None:
        run.phases = phases
    if training.schedule.note:
        console.print(training.schedule.note)
    restore(run, training.steps_per_epoch)
    run.trackers = build_trackers(cfg, accelerator, console, total_steps, resumed=run.latest is not None,
                                  val_set=val_set)
    return run


def restore(run: Run, steps_per_epoch: int) -> None:
    """The starting state: fresh, or weights/optimizer/RNG and the batch position of the chosen checkpoint."""
    cfg, accelerator = run.cfg, run.accelerator
    # the run shape says what a step and a batch position mean; the LR schedule needs no state: schedule.lr(step)
    shape = {"world_size": accelerator.num_processes, "batch_size": cfg.data.batch_size,
             "grad_accum": cfg.train.grad_accum}
    # "epoch": the epoch (1-based) the latest step belongs to, as every record labels it; "epochs_done": position
    run.state = {"step": 0, "epoch": 0, "epochs_done": 0, "batch_in_epoch": 0, "best_mIoU": None,
                 "best_step": None, "nan_skipped": 0, **shape, "total_steps": run.total_steps}
    start_from = resume_check.resume_point(cfg, run.output_dir, accelerator, run.console.print)
    changes = []
    if start_from is not None:
        changes = resume_check.verdict(cfg, start_from)  # refuses a config that trains something else
        run.console.print(f"resume: from {start_from}")
        for change in changes:
            run.console.print(f"resume: allowed change {change}")
        saved = resume_check.upgrade_trainer_state(checkpoint.read_trainer_state(start_from))
        run.state.update(resume_check.adapt_position(saved, start_from, shape, steps_per_epoch, run.total_steps,
                                                   run.console.print, len(run.train_set)))
        if note := resume_check.schedule_change(saved, run.state["step"], run.schedule, cfg):
            run.console.print(note)
        try:  # weights, optimizer, scaler, RNG (torch.load weights_only=True)
            accelerator.load_state(str(start_from))
        except Exception as err:  # noqa: BLE001 - name the checkpoint instead of a deep accelerate traceback
            checkpoint.load_weights(accelerator.unwrap_model(run.model), start_from)  # names the first mismatch
            raise checkpoint.CheckpointError(f"{start_from}: cannot be loaded into this run's model/optimizer "
                                             f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
        if saved.get("world_size") == accelerator.num_processes:  # each rank's own BatchNorm statistics
            checkpoint.load_rank_buffers(unwrap_for_eval(accelerator, run.model), start_from,
                                         accelerator.process_index)
        accelerator.step = 0  # the resumed pass opens an accumulation window (its micro-batch count was restored)
        run.latest, run.last_saved_step = start_from, run.state["step"]
    if accelerator.is_main_process:  # the run really starts: record its config; drop a killed attempt's records
        save_config(cfg, run.output_dir / "config.yaml")  # what runs now; the resumes that changed it, below
        if changes:
            append_jsonl(run.output_dir / CONFIG_CHANGES, {"step": run.state["step"], "resumed_from": str(start_from),
                                                          "changes": changes, "time": time.time()})
        for log in (run.output_dir / TRAIN_LOG, run.output_dir / METRICS_LOG):
            drop_records_after(log, run.state["step"])
