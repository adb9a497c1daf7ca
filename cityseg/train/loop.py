"""The training loop, read top to bottom: epochs, the step, logging, validate / save / preempt."""
from __future__ import annotations

import math
import time
from pathlib import Path

from cityseg import checkpoint
from cityseg.config.load import save_config
from cityseg.data.cityscapes import skipped_samples
from cityseg.data.sampler import epoch_sampler
from cityseg.distributed import run_lock
from cityseg.distributed.markers import write_requeue_marker
from cityseg.distributed.preemption import EXIT_INTERRUPTED, EXIT_REQUEUE, StopFlag
from cityseg.distributed.stop_vote import StopVote
from cityseg.evaluation.metrics import confusion_over, summarize
from cityseg.model.build import average_batchnorm_stats, unwrap_for_eval
from cityseg.observe.flops import peak_flops, train_flops_per_image
from cityseg.observe.profiling import StepProfiler
from cityseg.observe.speed import DataWait, Speedometer
from cityseg.train.resume import samples_in_epoch
from cityseg.train.setup import Run, setup
from cityseg.train.step import StepStats, device_batch, train_step


class TrainingError(RuntimeError):
    """A one-line, user-facing reason the run stopped (NaN loss, ...)."""


def train(cfg, phases: dict | None = None) -> int:
    """Train per the config; returns the process exit code (0 done, EXIT_REQUEUE after a preemption save).
    phases: a {"validate": [], "save": [], "epoch_start": []} the run appends its seconds of each to."""
    stop = StopFlag()
    try:
        stop.install(cfg.train.preempt_signals)  # first: a signal during setup must not kill the process
        return train_loop(cfg, stop, phases)
    finally:  # an in-process caller (a notebook, the tests) gets its signal handlers and the output_dir back
        stop.uninstall()
        run_lock.release(cfg.output_dir)


def train_loop(cfg, stop: StopFlag, phases: dict | None = None) -> int:
    run = setup(cfg, phases)
    if run.latest is not None and not steps_left(run):
        run.console.print(nothing_left(run))
    run.console.start(run.state["step"])
    while steps_left(run):
        code = train_epoch(run, stop)
        if code is not None:
            return code
        epoch_done = run.state["batch_in_epoch"] >= len(run.loader)
        if epoch_done:
            run.state["epochs_done"], run.state["batch_in_epoch"] = run.state["epochs_done"] + 1, 0
        by_epoch = not cfg.train.eval_every_steps  # else train_epoch evaluates every train.eval_every_steps
        evaluated = ((by_epoch and epoch_done and run.state["epochs_done"] % cfg.train.eval_every_epochs == 0)
                     or run.state["step"] >= run.total_steps)
        if evaluated:
            validate(run)
        # iteration-based runs with checkpoint.every_steps save on that cadence only, not at every epoch's end
        epoch_save = cfg.train.epochs is not None or not cfg.checkpoint.every_steps
        if (epoch_save and run.last_saved_step != run.state["step"]) or evaluated:  # also a resumed step's epoch end
            save(run, best_candidate=True)
        if run.stop_after_epoch:  # the checkpoint holds the epoch's end as a run never stopped has it
            return preempt(run, stop)
    return finish(run)


def steps_left(run: Run) -> bool:
    epochs = run.cfg.train.epochs
    return run.state["step"] < run.total_steps and (epochs is None or run.state["epochs_done"] < epochs)


def nothing_left(run: Run) -> str:
    """The one line of a resumed run that has nothing left to train: which limit it reached and how to go on
    (a setting that only acts while training, e.g. a new tracker, would otherwise seem ignored)."""
    train_cfg, step = run.cfg.train, run.state["step"]
    limits = [f"train.max_steps (now {train_cfg.max_steps})"] if train_cfg.max_steps is not None \
        and step >= train_cfg.max_steps else []
    if train_cfg.epochs is not None and run.state["epochs_done"] >= train_cfg.epochs:
        limits.append(f"train.epochs (now {train_cfg.epochs}, e.g. train.epochs={2 * train_cfg.epochs})")
    return (f"resume: nothing left to train: the run in {run.output_dir} finished at step {step} of "
            f"{run.total_steps}; to train more, raise {' or '.join(limits) or 'train.max_steps or train.epochs'}; "
            "trackers and logging settings act only on the steps trained")


def train_epoch(run: Run, stop: StopFlag) -> int | None:
    """Steps until the epoch (or the schedule) ends; returns an exit code when a stop was agreed and saved.
    The steady-state step reads nothing back from the device: losses and NaN skips are counted there and read
    every train.log_every steps, before a save and at the epoch's end; the stop flag is agreed on the host."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    epoch = state["epochs_done"]  # 0-based: the data order's seed
    run.loader.set_epoch(epoch)  # the samples carry their epoch: the dataset augments each for its own
    # the epoch's order is the same for any run shape: a resumed epoch skips the samples trained before the stop
    epoch_sampler(run.loader).start_at(epoch, samples_in_epoch(state))  # batch_in_epoch is 0 here
    loop = loop_parts(run)
    batches = len(run.loader)  # 0 after a resume at this epoch's end: only its validation and save are left
    run.model.train()
    for images, masks, extra in epoch_batches(run):
        images, masks = device_batch(images, masks, extra, cfg.data, cfg.train.channels_last)
        loop["profiler"].before_step(state["step"])
        train_step(accelerator, run.model, run.optimizer, run.loss_fn, images, masks, run.schedule.lr(state["step"]),
                   cfg.optim.grad_clip, loop["stats"], state["step"])
        state["batch_in_epoch"] += 1
        loop["speed"].add(images.shape[0], accelerator.sync_gradients)
        if not accelerator.sync_gradients:
            continue
        loop["profiler"].after_step(state["step"])
        state["step"], state["epoch"] = state["step"] + 1, epoch + 1  # records count epochs from 1
        if run.ema is not None:
            run.ema.update(state["step"])
        last = state["step"] >= run.total_steps
        stop_agreed = loop["vote"].any(stop.received is not None)  # every rank gets the same answer
        ends_epoch = state["batch_in_epoch"] >= len(run.loader)  # the epoch-end save (after validation) follows
        evaluate_now = bool(cfg.train.eval_every_steps) and state["step"] % cfg.train.eval_every_steps == 0
        save_now = (bool(cfg.checkpoint.every_steps) and state["step"] % cfg.checkpoint.every_steps == 0
                    and not ends_epoch)
        if state["step"] % cfg.train.log_every == 0 or last or stop_agreed or evaluate_now or save_now:
            read_step_stats(run, epoch)  # raises for a NaN under train.on_nan=error: before anything is saved
        log_step(run, {"step": state["step"], "epoch": state["epoch"], "lr": run.optimizer.param_groups[0]["lr"],
                       **loop["latest"]})
        if last:
            break  # the last step: finish normally (evaluate, save) even if a stop was asked for
        if evaluate_now:
            validate(run)
            save(run, best_candidate=True)
            run.model.train()
        elif save_now:
            save(run, best_candidate=False)
        if stop_agreed:  # after this step's validation and save: the checkpoint is what a run never stopped had
            if not ends_epoch:
                return preempt(run, stop)
            run.stop_after_epoch = True  # the epoch's end (validation, save) first: train_loop then stops
    read_step_stats(run, epoch)
    if batches:
        run.console.print(loop["speed"].epoch_verdict(epoch + 1))
    return None


def epoch_batches(run: Run):
    """The epoch's batches, their wait timed; the first one's (the epoch-start stall) also kept in run.phases."""
    data_wait = run.loop["data_wait"]
    before = data_wait.seconds
    for index, batch in enumerate(data_wait.timed(run.loader)):
        if index == 0:
            run.phases["epoch_start"].append(data_wait.seconds - before)
        yield batch


def loop_parts(run: Run) -> dict:
    """Made on the first epoch, kept for the run: device counters, the stop vote, throughput, the profiler."""
    if run.loop is None:
        cfg, accelerator = run.cfg, run.accelerator
        peak, peak_name = peak_flops(accelerator.device, cfg.train.mixed_precision)
        flops = train_flops_per_image(unwrap_for_eval(accelerator, run.model), cfg.data.crop_size or
                                      cfg.data.image_size) if peak else None
        if flops:
            run.console.print(f"MFU: {flops / 1e9:.1f} GFLOP per training image (forward + backward) against "
                              f"{peak_name}")
        run.loop = {"stats": StepStats(accelerator.device), "data_wait": DataWait(),
                    "vote": StopVote(accelerator, cfg.dist.timeout_minutes, cfg.train.stop_vote_s, run.console.print),
                    "speed": Speedometer(accelerator.device, accelerator.num_processes, flops, peak),
                    "profiler": StepProfiler(cfg.train.profile_steps, run.output_dir, accelerator.process_index,
                                             accelerator.device),
                    "latest": {"loss": None, "images_per_s": None, "data_wait": None}}  # not measured yet
    return run.loop


def read_step_stats(run: Run, epoch: int) -> None:
    """Read the device counters (one device->host copy) into run.loop["latest"], the next records' numbers."""
    loop, state = run.loop, run.state
    stats = loop["stats"].take()
    if stats["first_nan_step"] is not None and run.cfg.train.on_nan == "error":
        raise TrainingError(f"loss is NaN/Inf at step {stats['first_nan_step']} (epoch {epoch + 1}); stopped "
                            "before any non-finite weights were saved (train.on_nan=skip skips such steps)")
    state["nan_skipped"] += stats["nan_skipped"]
    state["scaler_skipped"] = state.get("scaler_skipped", 0) + stats["scaler_skipped"]
    speed = loop["speed"].read(loop["data_wait"].seconds)
    loop["latest"] = {"loss": stats["loss"], **speed, "grad_norm": stats["grad_norm"],
                      "nan_skipped": state["nan_skipped"], "scaler_skipped": state["scaler_skipped"]}
    run.console.note_speed(speed)


def log_step(run: Run, record: dict) -> None:
    """Every step, on every rank: the step file, the console and, at the logging cadence, the logs and trackers."""
    run.trackers.step(record)


def validate(run: Run) -> None:
    """Evaluate (record_validation), its seconds kept in run.phases."""
    started = time.perf_counter()
    record_validation(run)
    run.phases["validate"].append(time.perf_counter() - started)


def record_validation(run: Run) -> None:
    """mIoU of the model as it will be saved: BatchNorm statistics averaged first, one all-reduced confusion."""
    accelerator, state = run.accelerator, run.state
    bare = run.ema.module if run.ema is not None else unwrap_for_eval(accelerator, run.model)  # never rewires compile
    average_batchnorm_stats(bare, accelerator)  # ranks validate the saved model
    metrics = summarize(confusion_over(bare, run.val_loader, accelerator, len(run.names)), run.names)
    record = {"epoch": state["epoch"], "epochs_done": state["epochs_done"], "step": state["step"], **metrics}
    is_best = state["best_mIoU"] is None or metrics["mIoU"] > state["best_mIoU"]
    if is_best and not math.isnan(metrics["mIoU"]):
        state["best_mIoU"], state["best_step"] = metrics["mIoU"], state["step"]
    run.trackers.evaluation(record, bare, state)


def save(run: Run, best_candidate: bool) -> Path:
    """A checkpoint of the current step on all ranks; after a validation it may also become checkpoints/best.
    Every validation is followed by a save: the next throughput window starts here. Its seconds go to run.phases."""
    started, state = time.perf_counter(), run.state
    run.last_saved_step = state["step"]
    run.latest = checkpoint.save(run.accelerator, run.output_dir, state, run.cfg.checkpoint.keep_last,
                                 samples_in_epoch(state),
                                 model=unwrap_for_eval(run.accelerator, run.model))
    if best_candidate and run.accelerator.is_main_process and state["best_step"] == state["step"]:
        if checkpoint.update_best(run.output_dir, run.latest, state["best_mIoU"], state["step"]):
            run.trackers.best_checkpoint(run.output_dir / "checkpoints" / "best", state)
    run.loop["speed"].restart(run.loop["data_wait"].seconds)  # img/s windows leave out saves and validations
    run.phases["save"].append(time.perf_counter() - started)
    return run.latest


def preempt(run: Run, stop: StopFlag) -> int:
    """Checkpoint now and leave: exit 75 (requeue) for SIGTERM/USR1, exit 130 (stop for good) for Ctrl-C."""
    step = run.state["step"]
    saved = run.latest if run.last_saved_step == step else save(run, best_candidate=False)
    run.console.close()
    interrupted = stop.received == "SIGINT"  # a user's Ctrl-C: stop for good, no requeue
    code = EXIT_INTERRUPTED if interrupted else EXIT_REQUEUE
    if interrupted:
        run.console.print(f"interrupted: checkpoint {saved} written at step {step}; the same command resumes; "
                          f"exit {code}")
    else:
        run.console.print(f"preempted: checkpoint {saved} written at step {step}; exit {code} (requeue)")
    if run.accelerator.is_main_process:
        if not interrupted:
            write_requeue_marker(saved)
        run.trackers.finish(run.state, exit_code=code)
    run.accelerator.wait_for_everyone()  # no rank exits (and makes srun stop the step) before the marker
    return code


def _rounded(miou: float | None) -> str:
    return "n/a" if miou is None or math.isnan(miou) else f"{miou:.4f}"


def finish(run: Run) -> int:
    """Export the final checkpoint's weights as model.safetensors and close the trackers."""
    state, output_dir = run.state, run.output_dir
    run.console.close()
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:  # replaced atomically: never a half-written model.safetensors
        checkpoint.export(run.latest, output_dir, overwrite=True)
        # what runs now, not the exported checkpoint's: a resume with nothing left to train saves no new one
        save_config(run.cfg, output_dir / "config.yaml")
    run.console.print(f"done: {state['step']} steps; weights in {output_dir / checkpoint.MODEL_FILE}; best mIoU "
                      f"{_rounded(state['best_mIoU'])} at step {state['best_step']}")
    if state["nan_skipped"]:
        run.console.print(f"warning: {state['nan_skipped']} step(s) skipped for a NaN/Inf loss (train.on_nan=skip)")
    for line in skipped_samples(output_dir / "skipped_samples.txt"):
        run.console.print(line)
    run.trackers.finish(state)
    run.accelerator.end_training()
    return 0
