"""May this config continue that checkpoint? Keys that change what is trained refuse; the others are listed."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from cityseg.config.load import to_dict
from cityseg.config.schema import Config, ConfigError
from cityseg.config.upgrade import upgrade_recorded
from cityseg.data.normalization import resolve_normalization
from cityseg.train.optim import lr_at, lr_scaling

# Keys (or whole sections, ending in ".") that do not change what is trained: how it is run, logged, evaluated,
# saved and tracked. Any key not matched here or below refuses a resume, so a key added later is safe by default.
ALLOWED = (
    "name", "output_dir", "data.root", "data.num_workers", "data.val_batch_size", "data.val_split", "data.on_bad_sample",
    "data.cache.dir", "train.resume", "train.preempt_signals", "train.channels_last", "train.compile",
    "train.log_every", "train.eval_every_epochs", "train.eval_every_steps", "train.on_nan", "checkpoint.", "eval.", "dist.", "tracking.",
)
# May grow (the run trains on), never shrink (a shorter schedule is another run); None means no limit.
EXTENDABLE = ("train.epochs", "train.max_steps")
# Run shape: checkpoint.adapt_position decides (an end-of-epoch checkpoint carries over, a mid-epoch one refuses).
RUN_SHAPE = ("data.batch_size", "train.grad_accum")
# data.root: the dataset moved (another mount, a node-local copy); checkpoint.adapt_position refuses a training set
# too small for the saved position. The rest — model, loss, optim, seed, data (splits, sizes, augmentation, label
# scheme), precision — refuse.


class ResumeRefused(ConfigError):
    """The resolved config trains something else than the checkpoint it would continue (the CLI exits 2)."""


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_allowed(key: str) -> bool:
    return any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in ALLOWED)


def _extended(old, new) -> bool:
    return new is None or (old is not None and new >= old)


def compare(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes as 'key old -> new'. A key the saved config lacks (added to cityseg since) counts
    as its default value then."""
    old, new = flatten(saved), flatten(current)
    defaults = flatten(to_dict(Config()))
    refused, allowed = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if before == after:
            continue
        change = f"{key} {before!r} -> {after!r}"
        if is_allowed(key) or key in RUN_SHAPE or (key in EXTENDABLE and _extended(before, after)):
            allowed.append(change)
        else:
            refused.append(change)
    return refused, allowed


def saved_config(checkpoint_dir: Path) -> tuple[dict | None, Path | None]:
    """The config a checkpoint was trained with: its own copy, else its run directory's config.yaml."""
    for path in (checkpoint_dir / "config.yaml", checkpoint_dir.parent.parent / "config.yaml"):
        if path.is_file():
            try:
                tree = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as err:
                raise ConfigError(f"{path}: cannot read the run's recorded config ({err})") from None
            return upgrade_recorded(tree if isinstance(tree, dict) else {}), path
    return None, None


def verdict(cfg, checkpoint_dir: Path) -> list[str]:
    """Raise ResumeRefused if cfg may not continue checkpoint_dir; else return the allowed changes (to log)."""
    saved, source = saved_config(Path(checkpoint_dir))
    if saved is None:
        return [f"{checkpoint_dir} records no config.yaml: the config was not compared"]
    resolved = copy.deepcopy(cfg)  # `cityseg check` compares before training resolves data.mean / std
    resolve_normalization(resolved)
    refused, allowed = compare(saved, to_dict(resolved))
    if refused:
        raise ResumeRefused(
            f"{cfg.output_dir}: will not resume {checkpoint_dir}: the config changes what is trained "
            f"({'; '.join(refused)}; recorded in {source}). To train this config as a new run, add "
            f"output_dir={free_output_dir(cfg.output_dir)} to the command; to continue the old run, undo these "
            "changes")
    return allowed


def free_output_dir(output_dir: str) -> str:
    """The first of <output_dir>-2, -3, ... that does not exist: advice that works as written (name=<new> does
    not move a run whose config sets output_dir, as configs/demo.yaml does)."""
    number = 2
    while Path(f"{output_dir}-{number}").exists():
        number += 1
    return f"{output_dir}-{number}"


def schedule_change(saved: dict, step: int, total_steps: int, cfg, lr_scale: float) -> str | None:
    """A line when the resumed run's schedule has another length than the checkpoint's (train.epochs or
    train.max_steps grew, or the steps per epoch changed): the LR is lr_at(step, total_steps), so it jumps."""
    old_total = saved.get("total_steps")
    if old_total is None or old_total == total_steps:
        return None
    old = copy.deepcopy(cfg)  # the checkpoint's run shape gave its LR factor (optim.lr_scaling)
    old.data.batch_size = saved.get("batch_size", cfg.data.batch_size)
    old.train.grad_accum = saved.get("grad_accum", cfg.train.grad_accum)
    old_scale = lr_scaling(old, saved.get("world_size", 1))[0]
    before = lr_at(saved["step"], old_total, cfg.optim) * old_scale
    after = lr_at(step, total_steps, cfg.optim) * lr_scale
    if math.isclose(before, after, rel_tol=1e-9, abs_tol=1e-15):
        return None
    word = "stretched" if total_steps > old_total else "shortened"
    return (f"resume: the LR schedule is {word} from {old_total} to {total_steps} steps: at the resumed step {step} "
            f"the LR jumps from {before:.3g} (the checkpoint's schedule) to {after:.3g}, then follows the "
            f"{total_steps}-step schedule")


def upgrade_trainer_state(saved: dict) -> dict:
    """A trainer_state written before "epochs_done" existed: its "epoch" was the count of finished epochs."""
    if "epochs_done" in saved:
        return saved
    done = saved["epoch"]
    return {**saved, "epochs_done": done, "epoch": done + 1 if saved["batch_in_epoch"] else done}
