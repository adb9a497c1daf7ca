"""Child of test_trackers.py: the run's trackers built as setup builds them (config overrides from argv), then
two steps (the first off the train.log_every=2 cadence), one evaluation, a best checkpoint and the end."""
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from cityseg.config.load import load_config
from cityseg.observe.console import RunConsole
from cityseg.observe.trackers import build_trackers

TOTAL_STEPS = 10
STEP = {"epoch": 1, "lr": 0.01, "loss": 0.5, "images_per_s": 100.0, "data_wait": 0.125, "step_time_s": 0.25,
        "grad_norm": 1.5, "nan_skipped": 0, "scaler_skipped": 0}
EVALUATION = {"epoch": 1, "epochs_done": 1, "step": 2, "mIoU": 0.25, "pixel_acc": 0.75,
              "iou": {"road": 0.5, "car": 0.0}}
STATE = {"step": 2, "epoch": 1, "nan_skipped": 0, "best_mIoU": 0.25, "best_step": 2}

if __name__ == "__main__":
    cfg = load_config("configs/demo.yaml", ["train.log_every=2", "tracking.wandb.num_images=0", *sys.argv[1:]])
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    console = RunConsole(accelerator.is_main_process, TOTAL_STEPS, cfg.train.log_every)
    trackers = build_trackers(cfg, accelerator, console, TOTAL_STEPS, resumed=False, val_set=[])
    for step in (1, 2):
        trackers.step({"step": step, **STEP})
    trackers.evaluation(EVALUATION, torch.nn.Identity(), STATE)
    trackers.best_checkpoint(Path(cfg.output_dir) / "checkpoints" / "best", STATE)  # no artifact: log_checkpoints off
    trackers.finish(STATE)
