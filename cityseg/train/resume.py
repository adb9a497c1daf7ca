"""Resuming: may this config continue that checkpoint (what is trained must match), and where the run goes on."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml
from accelerate.utils import broadcast_object_list

from cityseg.checkpoint import CheckpointError, complete_checkpoints, verify
from cityseg.config.load import to_dict
from cityseg.config.schema import Config, ConfigError
from cityseg.config.upgrade import upgrade_recorded
from cityseg.data.normalization import resolve_normalization
from cityseg.train.optim import Schedule

# Keys (or whole sections, ending in ".") that do not change what is trained: how it is run, logged, evaluated,
# saved and tracked. Any key not matched here or below refuses a resume, so a key added later is safe by default.
ALLOWED = (
    "name", "output_dir", "data.root", "data.num_workers", "data.val_batch_size", "data.val_split", "data.on_bad_sample",
    "data.cache.dir", "model.pad_classes_to", "train.resume", "train.preempt_signals", "train.channels_last",
    "train.compile",
    "train.log_every", "train.eval_every_epochs", "train.eval_every_steps", "train.on_nan", "checkpoint.", "eval.", "dist.", "tracking.",
)
# May grow (the run trains on), never shrink (a shorter schedule is another run); None means no limit.
EXTENDABLE = ("train.epochs", "train.max_steps")
# The config keys of the run shape: adapt_position maps the saved position to the new shape by samples seen.
SHAPE_CONFIG_KEYS = ("data.batch_size", "train.grad_accum")
# data.root: the dataset moved (another mount, a node-local copy); adapt_position refuses a training set
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
        if is_allowed(key) or key in SHAPE_CONFIG_KEYS or (key in EXTENDABLE and _extended(before, after)):
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
    resolve_normalization(resolved.data, resolved.model)
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


def schedule_change(saved: dict, step: int, schedule: Schedule, cfg) -> str | None:
    """A line when the resumed run's schedule has another length than the checkpoint's (train.epochs or
    train.max_steps grew, or the steps per epoch changed): the LR is schedule.lr(step), so it jumps."""
    old_total, total_steps = saved.get("total_steps"), schedule.total_steps
    if old_total is None or old_total == total_steps:
        return None
    old = copy.deepcopy(cfg)  # the checkpoint's run shape gave its LR factor (optim.lr_scaling)
    old.data.batch_size = saved.get("batch_size", cfg.data.batch_size)
    old.train.grad_accum = saved.get("grad_accum", cfg.train.grad_accum)
    before = Schedule.for_run(old, saved.get("world_size", 1), old_total).lr(saved["step"])
    after = schedule.lr(step)
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


# The trainer_state keys that say what one step and one batch mean in samples (a checkpoint records them).
SHAPE_STATE_KEYS = ("world_size", "batch_size", "grad_accum")


def samples_in_epoch(state: dict) -> int:
    """Samples of the current epoch's shuffled order already trained: those before this pass over the epoch
    began (a resume mid-epoch, "resumed_at" = [epochs_done, samples]) and this pass's batches on all ranks."""
    resumed_epoch, resumed_samples = state.get("resumed_at") or (None, 0)
    before = resumed_samples if resumed_epoch == state["epochs_done"] else 0
    return before + state["batch_in_epoch"] * state["batch_size"] * state["world_size"]


def adapt_position(saved: dict, path: Path, shape: dict, steps_per_epoch: int, total_steps: int,
                   warn=print, epoch_samples: int | None = None) -> dict:
    """The saved position in this run's units. The epoch's order is the same for any run shape, so the run
    continues at the sample where the checkpoint stopped (the sampler skips the samples trained). With the same
    shape the step is kept (bit-identical resume); with another one it is mapped by samples seen: finished epochs
    x this run's steps per epoch + the samples trained in this epoch // this run's samples per step."""
    before = {key: saved.get(key, shape[key]) for key in SHAPE_STATE_KEYS}
    consumed = saved.get("samples_in_epoch")
    if consumed is None:  # a checkpoint written before "samples_in_epoch" was recorded (then never resumed)
        consumed = samples_in_epoch({**saved, **before})
    if epoch_samples is not None and consumed > epoch_samples:  # the data shrank (files removed, data.root moved)
        raise CheckpointError(f"{path}: was saved after {consumed} samples of epoch {saved['epochs_done'] + 1}, but "
                              f"the training set now has {epoch_samples}: point data.root at the data the run "
                              "trained on, or start a new run (output_dir=<new dir>)")
    kept = {key: value for key, value in saved.items() if key not in ("files", "samples_in_epoch")}
    position = {"batch_in_epoch": 0, "resumed_at": [saved["epochs_done"], consumed], "total_steps": total_steps}
    if before == shape:
        return {**kept, **position}
    per_step = shape["batch_size"] * shape["world_size"] * shape["grad_accum"]
    step = saved["epochs_done"] * steps_per_epoch + consumed // per_step
    changes = ", ".join(f"{key} {before[key]} -> {shape[key]}" for key in SHAPE_STATE_KEYS if before[key] != shape[key])
    old_total = saved.get("total_steps")
    old_at = f"{saved['step']} of {old_total}" if old_total else f"{saved['step']}"
    warn(f"warning: {path} was saved with {changes}: epoch {saved['epochs_done'] + 1} continues after the "
         f"{consumed} samples of its order already trained, the rest shared by {shape['world_size']} process(es); "
         f"step {old_at} maps by samples seen to step {step} of {total_steps} ({saved['epochs_done']} epochs x "
         f"{steps_per_epoch} steps + {consumed} // {per_step} samples per step); the LR is lr_at(step, "
         f"total_steps) of this run (the result will differ from an uninterrupted run)")
    return {**kept, **shape, **position, "step": step}


def find_resume(output_dir: str | Path, warn=print) -> Path | None:
    """The newest complete checkpoint that passes verify(); a broken newer one is reported and skipped."""
    for candidate in reversed(complete_checkpoints(output_dir)):
        try:
            verify(candidate)
            return candidate
        except CheckpointError as err:
            warn(f"warning: skipping checkpoint: {err}")
    return None


def resume_point(cfg, output_dir: Path, accelerator, say) -> Path | None:
    """The checkpoint to continue from; for `auto` the main process picks and tells the others, so ranks never
    load different ones (on a shared filesystem a fresh save may become visible to them at different times)."""
    if cfg.train.resume == "none":
        existing = complete_checkpoints(output_dir)
        if existing:  # a later resume=auto would pick the old run's newest checkpoint: never mix two runs
            raise CheckpointError(
                f"{output_dir}: holds checkpoints of an earlier run (newest {existing[-1].name}); with "
                "train.resume=none use a new output_dir, or train.resume=auto to continue that run")
        return None
    if cfg.train.resume != "auto":
        path = Path(cfg.train.resume)
        verify(path)
        return path
    chosen = [None]
    if accelerator.is_main_process:
        found = find_resume(output_dir, warn=say)
        if not found:
            say("resume: no checkpoint in output_dir, starting fresh")
        chosen = [str(found) if found else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    return Path(chosen[0]) if chosen[0] else None
