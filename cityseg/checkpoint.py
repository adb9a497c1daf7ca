"""Checkpoints on disk: atomic accelerate state per step, keep-last pruning, the best by mIoU, weight export."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A one-line, user-facing problem with a checkpoint (names the path)."""


def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def save(accelerator, output_dir: str | Path, trainer_state: dict, keep_last: int) -> Path:
    """Save on every rank into a temporary directory; the main process seals it with a rename when all are done."""
    final = step_dir(output_dir, trainer_state["step"])
    tmp = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process:
        for leftover in [tmp, *final.parent.glob(".del_step_*")]:  # left by a run killed mid-save or mid-prune
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # all ranks: the main one writes model/optimizer/..., each its RNG state
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save says RuntimeError for a full disk
        raise _write_failed(output_dir, tmp, err) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            write_json_atomic(tmp / TRAINER_STATE, {**trainer_state, "files": files})
            _fsync_tree(tmp)
        except OSError as err:
            raise _write_failed(output_dir, tmp, err) from None
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune(Path(output_dir), keep_last)
    accelerator.wait_for_everyone()
    return final


def _write_failed(output_dir: str | Path, tmp: Path, err: Exception) -> CheckpointError:
    """Remove the partial directory (it holds the space a retry needs) and say what is still safe."""
    shutil.rmtree(tmp, ignore_errors=True)
    free_gib = shutil.disk_usage(tmp.parent).free / 2**30
    previous = complete_checkpoints(output_dir)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    reason = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\][ .]*", "", str(err).strip()) or type(err).__name__
    reason = reason.splitlines()[0]  # without torch's C++ source location
    return CheckpointError(f"{tmp.parent}: writing checkpoint {tmp.name[len('.tmp_'):]} failed ({reason}; "
                           f"{free_gib:.2f} GiB free there); {kept}")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Sealed step checkpoints, oldest first (temporary and unsealed directories are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def prune(output_dir: Path, keep_last: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        doomed = old.with_name(f".del_{old.name}")  # unsealed first: a kill mid-delete leaves no half checkpoint
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint ({TRAINER_STATE} missing)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / TRAINER_STATE}: unreadable ({err})") from None


def verify(path: Path) -> dict:
    """Cheap integrity check before loading: every file recorded at save time is there with its size, and the
    weights file's header parses. Catches truncation and half-copied directories without reading everything."""
    state = read_trainer_state(path)
    for name, size in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: truncated or changed ({file.stat().st_size} bytes, saved {size})")
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: {MODEL_FILE} missing")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - any failure means this checkpoint cannot be trusted
        raise CheckpointError(f"{weights}: corrupt ({type(err).__name__}: {err})") from None
    return state


def clean_state_dict(state: dict) -> dict:
    """Weights as the bare model names them: accelerate checkpoints keep DDP's 'module.' (and torch.compile's
    '_orig_mod.') prefixes."""
    cleaned = {}
    for key, tensor in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        cleaned[key] = tensor
    return cleaned


def export(step_path: Path, out_dir: Path) -> Path:
    """model.safetensors + config.yaml from a checkpoint, loadable by evaluate / predict without accelerate."""
    verify(step_path)
    run_config = step_path.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise CheckpointError(f"{run_config}: the run's config.yaml is missing (expected beside checkpoints/)")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODEL_FILE
    tmp = target.with_name(f".{MODEL_FILE}.tmp")
    save_file(clean_state_dict(load_file(str(step_path / MODEL_FILE))), str(tmp), metadata={"format": "pt"})
    tmp.replace(target)
    shutil.copyfile(run_config, out_dir / "config.yaml")
    return target


def find_resume(output_dir: str | Path, warn=print) -> Path | None:
    """The newest complete checkpoint that passes verify(); a broken newer one is reported and skipped."""
    for candidate in reversed(complete_checkpoints(output_dir)):
        try:
            verify(candidate)
            return candidate
        except CheckpointError as err:
            warn(f"warning: skipping checkpoint: {err}")
    return None


def update_best(output_dir: str | Path, source: Path, miou: float, step: int) -> bool:
    """Copy `source` to checkpoints/best if its mIoU beats the recorded best; atomic replace."""
    best = Path(output_dir) / "checkpoints" / "best"
    record = best / "best.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous["mIoU"] >= miou:
            return False
    staging = best.with_name(".tmp_best")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    write_json_atomic(staging / "best.json", {"mIoU": miou, "step": step, "source": source.name})
    old = best.with_name(".old_best")
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        best.rename(old)
    staging.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    return True
