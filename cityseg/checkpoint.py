"""Checkpoints on disk: atomic accelerate state per step, verification, keep-last pruning, the best by mIoU, export."""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from accelerate.utils import (
    load as load_pickled_tensors,  # torch.load(weights_only=True) + numpy's RNG arrays
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"  # step, epoch, samples of it trained, best, run shape, sizes of files written
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # the EMA of the weights (train.ema_decay): what validation measured, so what is exported
EMA_RANK_FILE = "ema_buffers_{rank}.safetensors"  # each other rank's own EMA BatchNorm statistics
RANK_BUFFERS_FILE = "model_buffers_{rank}.safetensors"  # each other rank's own BatchNorm statistics and counters
CONFIG_FILE = "config.yaml"  # the run's resolved config, copied into each checkpoint: export needs nothing else


class CheckpointError(ValueError):
    """A one-line, user-facing problem with a checkpoint (names the path)."""


def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the directory's entries (new files, a rename into it) durable."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        _fsync_file(file)
    _fsync_dir(path)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def save(accelerator, output_dir: str | Path, trainer_state: dict, keep_last: int, samples_in_epoch: int,
         model=None) -> Path:
    """Save on every rank into a temporary directory; the main process seals it with a rename when all are done.
    Every other rank also writes the buffers of its bare `model` (BatchNorm statistics follow each rank's batches).
    samples_in_epoch: of the current epoch's order, trained so far (train.resume.samples_in_epoch), recorded."""
    final = step_dir(output_dir, trainer_state["step"])
    tmp = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process:
        for leftover in [tmp, *final.parent.glob(".del_step_*")]:  # left by a run killed mid-save or mid-prune
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # all ranks: the main one writes model/optimizer/..., each its RNG state
        _fsync_file(tmp / f"random_states_{accelerator.process_index}.pkl")  # on the rank (node) that wrote it
        if model is not None and not accelerator.is_main_process:
            save_rank_buffers(model, tmp / RANK_BUFFERS_FILE.format(rank=accelerator.process_index))
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save says RuntimeError for a full disk
        raise _write_failed(output_dir, tmp, err) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            run_config = Path(output_dir) / CONFIG_FILE
            if run_config.is_file():
                shutil.copyfile(run_config, tmp / CONFIG_FILE)
            # sizes of everything written: verify() tells a complete checkpoint from one truncated later
            files = {file.name: file.stat().st_size for file in sorted(tmp.iterdir()) if file.is_file()}
            write_json_atomic(tmp / TRAINER_STATE, {**trainer_state, "files": files,
                                                 "samples_in_epoch": samples_in_epoch})
            _fsync_tree(tmp)
        except OSError as err:
            raise _write_failed(output_dir, tmp, err) from None
        if final.exists():  # this step saved again (after its epoch's evaluation): swap the new one in
            stale = final.with_name(f".old_{final.name}")
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
        prune(Path(output_dir), keep_last)
    accelerator.wait_for_everyone()
    return final


def save_rank_buffers(module, path: Path, floating_only: bool = False) -> None:
    """One rank's own buffers, durable on the node that wrote them. DDP broadcasts the main rank's BatchNorm
    statistics only at the next training forward, so with the main file alone a validation right after a resume
    would average the main rank's statistics with copies of themselves instead of every rank's own."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in module.named_buffers()
             if tensor.is_floating_point() or not floating_only}
    if state:
        path.parent.mkdir(parents=True, exist_ok=True)  # the main process may not have made it yet
        save_file(state, str(path), metadata={"format": "pt"})
        _fsync_file(path)


def load_rank_buffers(module, checkpoint_dir: Path, rank: int, file_pattern: str = RANK_BUFFERS_FILE) -> bool:
    """This rank's own buffers from a checkpoint of the same world size, over the main rank's loaded before; False
    when the checkpoint has none for this rank (rank 0, another world size, or written before they were saved)."""
    path = Path(checkpoint_dir) / file_pattern.format(rank=rank)
    if rank == 0 or not path.is_file():
        return False
    try:
        state = load_file(str(path), device="cpu")
        unexpected = set(state) - {name for name, _ in module.named_buffers()}
        if unexpected:
            raise KeyError(f"unexpected {sorted(unexpected)[0]}")
        module.load_state_dict(state, strict=False)
    except Exception as err:  # noqa: BLE001 - a foreign or truncated file
        raise CheckpointError(f"{path}: cannot be loaded as this rank's buffers "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return True


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
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint ({TRAINER_STATE} missing)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / TRAINER_STATE}: unreadable ({err})") from None


def verify(path: Path) -> dict:
    """Cheap integrity check before loading: every file written is there at its size and structurally readable."""
    path = Path(path)
    state = read_trainer_state(path)
    written = state.get("files") or {MODEL_FILE: None}  # no record of sizes: the structure checks below decide
    for name, size in written.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if size is not None and file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes but {size} were written (truncated?)")
    weights = path / MODEL_FILE
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)  # reads the header entry; truncation shows up as an error
    except Exception as err:  # noqa: BLE001 - any failure means this checkpoint cannot be trusted
        raise CheckpointError(f"{weights}: corrupt ({type(err).__name__}: {err})") from None
    for name in written:
        if name.endswith((".bin", ".pkl")):  # torch.save zip archives (optimizer, RNG, scaler)
            try:
                with zipfile.ZipFile(path / name) as archive:
                    archive.namelist()  # the central directory sits at the end: truncation breaks it
            except (zipfile.BadZipFile, OSError) as err:
                raise CheckpointError(f"{path / name}: corrupt ({err})") from None
        if name.startswith("random_states_"):  # accelerate skips an unreadable one silently: an inexact resume
            try:
                load_pickled_tensors(path / name)
            except Exception as err:  # noqa: BLE001 - refused by the restricted unpickler, or damaged
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                raise CheckpointError(f"{path / name}: unreadable ({type(err).__name__}: {reason})") from None
    return state


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


def load_weights(model, path: str | Path) -> None:
    """Load model.safetensors (never a pickle) into the model; a wrong architecture or class count names the first
    mismatch."""
    path = Path(path)
    if path.is_dir():  # a checkpoint directory: the EMA weights if the run kept them (what it validated)
        path = path / EMA_FILE if (path / EMA_FILE).is_file() else path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = clean_state_dict(load_file(str(path)))
    except Exception as err:  # noqa: BLE001 - a partial or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)} but the model (model.* and "
                                  f"data.label_scheme of the config) expects {tuple(own[key].shape)}")
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise CheckpointError(f"{path}: does not match model {type(model).__name__} of the config "
                              f"({len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. {example})")
    model.load_state_dict(state)


def clean_state_dict(state: dict) -> dict:
    """Weights as the bare model names them: accelerate checkpoints keep DDP's 'module.' (and torch.compile's
    '_orig_mod.') prefixes."""
    cleaned = {}
    for key, tensor in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        cleaned[key] = tensor
    return cleaned


def export(checkpoint_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write model.safetensors + config.yaml from a checkpoint: what evaluate / predict load, no accelerate state."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    verify(checkpoint_dir)
    config = checkpoint_dir / CONFIG_FILE
    if not config.is_file():  # a checkpoint from before configs were copied in: the run's own config
        config = checkpoint_dir.parent.parent / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {CONFIG_FILE} in it or in its run directory")
    target = out_dir / MODEL_FILE
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target}: already exists (pass --force to replace it, or choose --out)")
    out_dir.mkdir(parents=True, exist_ok=True)
    ema = checkpoint_dir / EMA_FILE
    weights = load_file(str(ema if ema.is_file() else checkpoint_dir / MODEL_FILE))
    for name in (MODEL_FILE, CONFIG_FILE):
        staging = out_dir / f".{name}.tmp"
        if name == MODEL_FILE:
            save_file(clean_state_dict(weights), str(staging), metadata={"format": "pt"})
        else:
            shutil.copyfile(config, staging)  # not copy2: the checkpoint's owner-only mode is not the artefact's
        _fsync_file(staging)
        staging.replace(out_dir / name)  # atomic: a reader sees the old file or the new one, never half
    return target
