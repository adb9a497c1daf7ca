"""The one fan-out of a run's records: console, JSONL logs, W&B, TensorBoard and the step file, called once per event."""
from __future__ import annotations

from pathlib import Path

import torch

from cityseg.config.load import dump_config
from cityseg.distributed.markers import mark_step
from cityseg.observe.console import RunConsole
from cityseg.observe.records import METRICS_LOG, TRAIN_LOG, append_jsonl
from cityseg.observe.tensorboard_run import TensorBoardRun
from cityseg.observe.wandb_run import WandbRun

SPEED_KEYS = ("step_time_s", "mfu", "mem_allocated_gb", "mem_reserved_gb", "grad_norm", "nan_skipped",
              "scaler_skipped")


def step_scalars(record: dict) -> dict:
    """A training record as tracker scalars: W&B and TensorBoard log the same names."""
    scalars = {"epoch": record["epoch"], "train/loss": record["loss"], "train/lr": record["lr"],
               "train/images_per_s": record["images_per_s"], "train/data_wait": record["data_wait"]}
    for key in SPEED_KEYS:  # what the engine measured (MFU and memory only on a GPU)
        if key in record:
            scalars[f"train/{key}"] = record[key]
    return scalars


def eval_scalars(record: dict) -> dict:
    """An evaluation record as tracker scalars: mIoU, pixel accuracy and one IoU per class."""
    return {"val/mIoU": record["mIoU"], "val/pixel_acc": record["pixel_acc"],
            **{f"val/iou/{name}": iou for name, iou in record["iou"].items()}}


class Trackers:
    """Every sink of a run's records. The loop calls it once per optimizer step, evaluation, best checkpoint and
    at the end, on every rank: the JSONL logs and the step file are written by the main process only, W&B and
    TensorBoard do nothing elsewhere or when tracking.* turns them off, other ranks' consoles are silent."""

    def __init__(self, console: RunConsole, wandb: WandbRun, tensorboard: TensorBoardRun, output_dir: Path,
                 is_main: bool, log_every: int, total_steps: int):
        self.console, self.wandb, self.tensorboard = console, wandb, tensorboard
        self.output_dir, self.is_main = Path(output_dir), is_main
        self.log_every, self.total_steps = log_every, total_steps

    def step(self, record: dict) -> None:
        """One optimizer step: the step file every step, the logs and trackers every train.log_every steps."""
        step = record["step"]
        if self.is_main:
            mark_step(step)  # $CITYSEG_STEP_FILE: slurm/train.sh and the cluster tests watch the progress
        if self.is_main and (step % self.log_every == 0 or step == self.total_steps):
            append_jsonl(self.output_dir / TRAIN_LOG, record)
            scalars = step_scalars(record)
            self.tensorboard.log(scalars, step)
            self.wandb.log_step(scalars, step)
        self.console.step(step, record["epoch"], record["loss"], record["lr"], record["images_per_s"])

    def evaluation(self, record: dict, model: torch.nn.Module, trainer_state: dict) -> None:
        """One validation's record, after the all-reduce and after trainer_state took a new best."""
        if self.is_main:
            append_jsonl(self.output_dir / METRICS_LOG, record)
        self.console.evaluation(record, record["step"], record["epoch"])
        scalars = eval_scalars(record)
        self.tensorboard.log(scalars, record["step"])
        self.wandb.log_eval(record, scalars, model, trainer_state)

    def best_checkpoint(self, best_dir: Path, trainer_state: dict) -> None:
        self.wandb.log_best_checkpoint(best_dir, trainer_state)

    def finish(self, trainer_state: dict, exit_code: int = 0) -> None:
        """Close the trackers (a preempted run's W&B run ends with its exit code); the loop closes the console."""
        self.tensorboard.finish()
        self.wandb.finish(trainer_state, exit_code=exit_code)


def build_trackers(cfg, accelerator, console: RunConsole, total_steps: int, resumed: bool, val_set) -> Trackers:
    """The run's sinks from cfg.tracking, on every rank (W&B's start gathers each rank's device). The whole config:
    W&B and TensorBoard record it."""
    output_dir, is_main = Path(cfg.output_dir), accelerator.is_main_process
    # beside W&B, whatever W&B's mode
    tensorboard = TensorBoardRun(cfg.tracking.tensorboard, is_main, output_dir, dump_config(cfg))
    wandb = WandbRun(cfg, accelerator, output_dir, resumed=resumed, val_set=val_set, say=console.print)
    return Trackers(console, wandb, tensorboard, output_dir, is_main, cfg.train.log_every, total_steps)
