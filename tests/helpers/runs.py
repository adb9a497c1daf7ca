"""Read what a run wrote: its JSONL logs, checkpoints, trainer state and final weights; the overrides of a tiny run;
the assertions on a finished run (its exit code, equal to another run)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file


def tiny_overrides(root: Path, output_dir: Path, **extra) -> list[str]:
    """A run small enough for 2 CPU cores: 64x128 images, batch 4, no loader workers, W&B off."""
    values = {"data.root": root, "output_dir": output_dir, "data.image_size": "[64,128]", "data.batch_size": 4,
              "data.num_workers": 0, "train.epochs": 1, "train.log_every": 1, "tracking.wandb.mode": "disabled",
              "optim.warmup_steps": 0}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sealed_steps(out: Path) -> list[int]:
    """Steps of complete checkpoints (what resume may pick), oldest first."""
    from cityseg.checkpoint import complete_checkpoints

    return [int(path.name.split("_")[1]) for path in complete_checkpoints(out)]


def unsealed_dirs(out: Path) -> list[Path]:
    """Checkpoint directories still being written (or left by a killed save)."""
    root = out / "checkpoints"
    return sorted(root.glob(".tmp_step_*")) if root.is_dir() else []


def trainer_state(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / "trainer_state.json").read_text())


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def logged_steps(out: Path) -> list[tuple[int, int, float, float]]:
    """(step, epoch, loss, lr) of every train_log.jsonl record."""
    return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in read_jsonl(out / "train_log.jsonl")]


def assert_exit(result: subprocess.CompletedProcess, code: int) -> None:
    assert result.returncode == code, f"exit {result.returncode}, expected {code}\n{result.stdout[-2000:]}\n" \
                                      f"{result.stderr[-4000:]}"


def assert_same_run(resumed, straight) -> None:
    assert max_abs_diff(final_weights(resumed), final_weights(straight)) == 0.0
    assert logged_steps(resumed) == logged_steps(straight)  # every step's loss and LR, before and after the resume
