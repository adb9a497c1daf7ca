"""The run in Weights & Biases: one W&B run on the main process, resumable by the id kept in output_dir."""
from __future__ import annotations

import os
import secrets
import shutil
import string
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from cityseg.config.load import to_dict
from cityseg.data.transforms import normalization
from cityseg.labels import IGNORE_INDEX, class_names
from cityseg.observe.flops import device_name

RUN_ID_FILE = "wandb_run_id"
INIT_TIMEOUT_S = 30.0  # an unreachable server costs this once, then the run goes on offline (WANDB_INIT_TIMEOUT)
FINISH_TIMEOUT_S = 120.0  # what is not uploaded by then stays on disk for `wandb sync`


def resolve_mode(mode: str) -> str:
    """auto → online when credentials are configured (WANDB_API_KEY, ~/.netrc, wandb settings), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]  # the user's wandb-wide choice
    import wandb

    wandb.setup(wandb.Settings(silent=True))  # login() would otherwise announce where it found the key
    # prompt=False, verify=False: reads the configured credentials, asks nobody, touches no network
    return "online" if wandb.login(prompt=False, verify=False) else "offline"


def load_samples(dataset, count: int, data_cfg) -> list[tuple[np.ndarray, torch.Tensor, np.ndarray, str]]:
    """The first `count` samples of the validation set: (display RGB uint8, network input, mask, caption)."""
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in normalization(data_cfg))
    samples = []
    for index in range(min(count, len(dataset))):
        image, mask, _ = dataset[index]
        rgb = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        samples.append((rgb, image, mask.numpy().astype(np.int64), Path(dataset.pairs[index][0]).name))
    return samples


class WandbRun:
    """Logs steps, evaluations, images and the best checkpoint; a no-op off the main process or when disabled."""

    def __init__(self, cfg, accelerator, output_dir: Path, resumed: bool, val_set, say=print):
        self.cfg, self.accelerator, self.output_dir = cfg.tracking.wandb, accelerator, Path(output_dir)
        self.run = None
        if self.cfg.mode == "disabled":
            return
        # every rank joins this gather (it is a collective); only the main process keeps the answer
        devices = Counter(gather_object([device_name(accelerator.device)]))
        if not accelerator.is_main_process:
            return
        import wandb

        self.wandb = wandb
        self.names = class_names(cfg.data.label_scheme)
        self.class_labels = {**dict(enumerate(self.names)), IGNORE_INDEX: "ignore"}
        self.samples = load_samples(val_set, self.cfg.num_images, cfg.data)
        run_id = self._run_id(resumed)
        config = {**to_dict(cfg), "runtime": {"world_size": accelerator.num_processes, "devices": dict(devices),
                                              "mixed_precision": accelerator.mixed_precision,
                                              "distributed_type": accelerator.distributed_type.value}}
        init = dict(project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group, tags=self.cfg.tags,
                    name=self.cfg.run_name or cfg.name, id=run_id, resume="allow", dir=str(self.output_dir),
                    config=config)
        init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
        settings = wandb.Settings(silent=True, init_timeout=init_timeout, finish_timeout=FINISH_TIMEOUT_S)
        self.run = self._start(resolve_mode(self.cfg.mode), init, settings, say)
        self.run.define_metric("val/mIoU", summary="max")
        self.run.define_metric("train/loss", summary="min")

    def _start(self, mode: str, init: dict, settings, say):
        """wandb.init in the asked mode; when online fails (no network, bad entity, ...), offline instead."""
        wandb, wandb_dir = self.wandb, self.output_dir / "wandb"
        attempt_started = time.time()
        try:
            run = wandb.init(mode=mode, settings=settings, **init)
        except Exception as err:  # noqa: BLE001 - whatever went wrong, it is no reason to lose the training run
            if mode == "offline":
                raise
            wandb.teardown()  # the failed attempt still holds the run id
            for attempt_dir in wandb_dir.glob(f"run-*-{init['id']}"):
                if attempt_dir.stat().st_mtime >= attempt_started - 1:  # its 'exit' record must not reach `wandb sync`
                    shutil.rmtree(attempt_dir, ignore_errors=True)
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            say(f"W&B: cannot start the {mode} run ({reason}); logging offline instead")
            mode = "offline"
            run = wandb.init(mode=mode, settings=settings, **init)
        if mode == "offline":
            say(f"W&B: offline run {init['id']}; upload it later with: wandb sync {wandb_dir}")
        else:
            say(f"W&B: {run.url}")
        return run

    def _run_id(self, resumed: bool) -> str:
        """The id kept in output_dir when training resumes; a fresh run (step 0) gets a new W&B run."""
        path = self.output_dir / RUN_ID_FILE
        if resumed and path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
        path.write_text(run_id + "\n")
        return run_id

    def log_step(self, scalars: dict, step: int) -> None:
        """One training record's scalars; the W&B step is the global optimizer step, so a resumed run continues
        its axis."""
        if self.run is None:
            return
        self.run.log(scalars, step=step)

    def log_eval(self, record: dict, scalars: dict, model: torch.nn.Module, trainer_state: dict) -> None:
        """mIoU, pixel accuracy, per-class IoU (scalars, table, bar chart), the sample images; best in summary.

        Called on every rank after the all-reduced evaluation; the image forward runs on the main process only and
        contains no collective, so the other ranks simply go on to the next one.
        """
        if self.run is None:
            return
        wandb = self.wandb
        table = wandb.Table(columns=["class", "IoU"], data=[[name, iou] for name, iou in record["iou"].items()])
        logged = {**scalars, "val/iou_table": table, "val/iou_bar": wandb.plot.bar(table, "class", "IoU", title="IoU per class")}
        if self.samples:
            logged["val/samples"] = self._sample_images(model)
        self.run.log(logged, step=record["step"])
        if trainer_state["best_mIoU"] is not None:
            self.run.summary.update({"best_mIoU": trainer_state["best_mIoU"], "best_step": trainer_state["best_step"]})

    @torch.inference_mode()
    def _sample_images(self, model: torch.nn.Module) -> list:
        was_training = model.training
        model.eval()
        batch = torch.stack([image for _, image, _, _ in self.samples]).to(self.accelerator.device)
        with self.accelerator.autocast():
            predictions = model(batch).argmax(1).cpu().numpy()
        model.train(was_training)
        return [self.wandb.Image(rgb, caption=caption, masks={
                    "predictions": {"mask_data": prediction, "class_labels": self.class_labels},
                    "ground_truth": {"mask_data": mask, "class_labels": self.class_labels}})
                for (rgb, _, mask, caption), prediction in zip(self.samples, predictions)]

    def log_best_checkpoint(self, best_dir: Path, trainer_state: dict) -> None:
        """The weights of checkpoints/best as a `model` artifact (tracking.wandb.log_checkpoints)."""
        if self.run is None or not self.cfg.log_checkpoints:
            return
        best = {"mIoU": trainer_state["best_mIoU"], "step": trainer_state["best_step"]}
        artifact = self.wandb.Artifact(f"{self.run.id}-best", type="model", metadata=best)
        for name in ("model.safetensors", "best.json"):
            artifact.add_file(str(best_dir / name))
        artifact.add_file(str(self.output_dir / "config.yaml"))
        self.run.log_artifact(artifact, aliases=["best", f"step-{trainer_state['best_step']}"])

    def finish(self, trainer_state: dict, exit_code: int = 0) -> None:
        if self.run is None:
            return
        self.run.summary.update({"step": trainer_state["step"], "epoch": trainer_state["epoch"],
                                 "nan_skipped": trainer_state["nan_skipped"]})
        self.run.finish(exit_code=exit_code)
        self.run = None
