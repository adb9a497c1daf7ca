"""W&B tracking in real offline runs: one run for 2 processes, its records read back, resume, modes, secrets."""
from __future__ import annotations

import base64
import hashlib
import math
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.process import child_env, train
from tests.helpers.runs import read_jsonl
from tests.helpers.wandb_records import config, history, read_records, run_id, summary

NUM_IMAGES = 3
FAKE_KEY = "fakesecret" * 4  # 40 characters: the shape of a real W&B API key


def wandb_env(tmp_path: Path, **extra: str) -> dict:
    """A home of the test's own: ~/.netrc, ~/.config/wandb, wandb's cache and data dirs and the temp dir all lie
    under tmp_path, so the user's real ones are neither read nor written and every file a run writes can be searched."""
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return child_env(HOME=str(home), NETRC=str(home / ".netrc"), WANDB_CONFIG_DIR=str(home / ".config" / "wandb"),
                     WANDB_CACHE_DIR=str(home / ".cache" / "wandb"), WANDB_DATA_DIR=str(home / ".local" / "wandb"),
                     TMPDIR=str(home / "tmp"), **extra)


def no_credentials_env(tmp_path: Path, **extra: str) -> dict:
    """No API key anywhere: no WANDB_API_KEY, no ~/.netrc entry, no wandb settings file, no WANDB_MODE."""
    env = wandb_env(tmp_path, **extra)
    env.pop("WANDB_MODE", None)
    env.pop("WANDB_SILENT", None)  # what users see: our one line, no wandb chatter
    return env


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"), key=lambda p: p.name)


def records_of(run_dir: Path) -> list:
    (log,) = run_dir.glob("*.wandb")
    return read_records(log)


def files_holding(secret: str, *roots: Path) -> list[Path]:
    """Every file under the roots (the run's output_dir, the test's home, temp dir and logs) that contains secret."""
    return [p for root in roots for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


@pytest.fixture(scope="module")
def two_process_run(synth_root, tmp_path_factory):
    """2 processes over gloo, 2 epochs, tracking.wandb.mode=auto with no credentials (→ offline)."""
    tmp = tmp_path_factory.mktemp("wandb2")
    out = tmp / "run"
    result = train(synth_root, out, env=no_credentials_env(tmp), processes=2, train__epochs=2,
                   tracking__wandb__mode="auto", tracking__wandb__num_images=NUM_IMAGES,
                   tracking__wandb__tags="[ci,tiny]", tracking__wandb__group="tests")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_processes_write_one_offline_run(two_process_run):
    out, result = two_process_run
    runs = offline_runs(out)
    assert len(runs) == 1 and len(list(out.rglob("*.wandb"))) == 1, list(out.rglob("*.wandb"))
    records = records_of(runs[0])
    assert run_id(records) == (out / "wandb_run_id").read_text().strip()
    sync_lines = [line for line in result.stdout.splitlines() if "wandb sync" in line]
    assert "wandb:" not in result.stdout + result.stderr
    assert sync_lines == [f"W&B: offline run {run_id(records)}; upload it later with: wandb sync {out / 'wandb'}"]
    sent = config(records)
    assert sent["data"]["batch_size"] == 4 and sent["tracking"]["wandb"]["tags"] == ["ci", "tiny"]
    assert sent["runtime"]["world_size"] == 2 and sum(sent["runtime"]["devices"].values()) == 2
    assert sent["runtime"]["mixed_precision"] == "no"


@pytest.mark.slow
def test_evaluations_in_wandb_match_metrics_jsonl(two_process_run):
    out, _ = two_process_run
    records = records_of(offline_runs(out)[0])
    evaluations = read_jsonl(out / "metrics.jsonl")
    rows = {row["_step"]: row for row in history(records)}
    assert len(evaluations) == 2
    for evaluation in evaluations:
        row = rows[evaluation["step"]]
        assert same(row["val/mIoU"], evaluation["mIoU"]) and same(row["val/pixel_acc"], evaluation["pixel_acc"])
        assert len(evaluation["iou"]) == 19
        for name, iou in evaluation["iou"].items():
            assert same(row[f"val/iou/{name}"], iou), name
        assert row["val/iou_table/nrows"] == 19 and row["val/iou_table/_type"] == "table-file"
    best = max(evaluations, key=lambda e: e["mIoU"])
    final = summary(records)
    assert final["best_mIoU"] == pytest.approx(best["mIoU"]) and final["best_step"] == best["step"]


@pytest.mark.slow
def test_training_steps_in_wandb_match_train_log(two_process_run):
    out, _ = two_process_run
    rows = [row for row in history(records_of(offline_runs(out)[0])) if "train/loss" in row]
    logged = read_jsonl(out / "train_log.jsonl")
    assert [row["_step"] for row in rows] == [r["step"] for r in logged] == [1, 2, 3, 4]
    for row, record in zip(rows, logged):
        assert row["train/loss"] == pytest.approx(record["loss"]) and row["train/lr"] == pytest.approx(record["lr"])
        assert row["train/images_per_s"] > 0 and 0 <= row["train/data_wait"] <= 1


@pytest.mark.slow
def test_sample_images_carry_ground_truth_and_prediction_masks(two_process_run):
    from cityseg.checkpoint import load_weights
    from cityseg.config.load import load_config
    from cityseg.data.loaders import eval_dataset
    from cityseg.model.build import build_model

    out, _ = two_process_run
    run_dir = offline_runs(out)[0]
    records = records_of(run_dir)
    rows = [row for row in history(records) if "val/samples/count" in row]
    assert len(rows) == 2 and all(row["val/samples/count"] == NUM_IMAGES for row in rows)
    labels = config(records)["_wandb"]["mask/class_labels"]
    for layer in ("predictions", "ground_truth"):
        names = labels[f"val/samples_wandb_delimeter_{layer}"]["value"]
        assert names["0"] == "road" and names["18"] == "bicycle" and names["255"] == "ignore"

    cfg = load_config(out / "config.yaml")
    val_set = eval_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, 19)
    load_weights(model, out / "model.safetensors")  # the weights of the last evaluation
    model.eval()
    with torch.inference_mode():
        expected = model(torch.stack([val_set[i][0] for i in range(NUM_IMAGES)])).argmax(1).numpy()
    last = rows[-1]
    assert last["val/samples/captions"] == [Path(val_set.pairs[i][0]).name for i in range(NUM_IMAGES)]
    for index, masks in enumerate(last["val/samples/all_masks"]):
        truth = np.array(Image.open(run_dir / "files" / masks["ground_truth"]["path"]))
        predicted = np.array(Image.open(run_dir / "files" / masks["predictions"]["path"]))
        assert np.array_equal(truth, val_set[index][1].numpy())
        assert (predicted == expected[index]).mean() > 0.99  # the same model; argmax ties may differ by a pixel
    image = Image.open(run_dir / "files" / last["val/samples/filenames"][0])
    assert image.size == (128, 64) and image.mode == "RGB"


@pytest.mark.slow
def test_non_tty_output_has_no_progress_bar_control_characters(two_process_run):
    _, result = two_process_run
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    assert re.search(r"^step 4/4 epoch 2 loss \d", result.stdout, re.MULTILINE)  # epochs numbered from 1
    assert re.search(r"^eval step 4 epoch 2 mIoU \d", result.stdout, re.MULTILINE)


@pytest.mark.slow
def test_resume_continues_the_run_and_no_secret_is_written(synth_root, tmp_path):
    """Stopped at step 2, resumed to step 4: one W&B run id, the step axis goes on; the API key appears nowhere."""
    out = tmp_path / "run"
    env = wandb_env(tmp_path, WANDB_API_KEY=FAKE_KEY)  # WANDB_MODE stays offline: a key is set, never used or shown
    common = dict(tracking__wandb__mode="offline", tracking__wandb__num_images=1, checkpoint__every_steps=1,
                  tracking__wandb__log_checkpoints="true")
    first = train(synth_root, out, env=env, train__max_steps=2, **common)
    assert first.returncode == 0, first.stderr[-3000:]
    best_weights = (out / "checkpoints" / "best" / "model.safetensors").read_bytes()
    second = train(synth_root, out, env=env, train__max_steps=4, **common)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resume: from" in second.stdout

    runs = offline_runs(out)
    assert len(runs) == 2
    ids = [run_id(records_of(r)) for r in runs]
    assert ids[0] == ids[1] == (out / "wandb_run_id").read_text().strip()
    steps = [[row["_step"] for row in history(records_of(r)) if "train/loss" in row] for r in runs]
    assert steps == [[1, 2], [3, 4]]
    (artifact,) = [r.artifact for r in records_of(runs[0]) if r.WhichOneof("record_type") == "artifact"
                   and r.artifact.type == "model"]  # log_checkpoints: the best checkpoint of the first part
    assert artifact.name == f"{ids[0]}-best" and {"best", "step-2"} <= set(artifact.aliases)
    digests = {entry.path: entry.digest for entry in artifact.manifest.contents}
    assert set(digests) == {"model.safetensors", "best.json", "config.yaml"}
    assert digests["model.safetensors"] == base64.b64encode(hashlib.md5(best_weights).digest()).decode()

    for text in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert FAKE_KEY not in text
    assert files_holding(FAKE_KEY, tmp_path) == []  # output_dir, wandb dirs, home, temp files


@pytest.mark.slow
def test_fresh_start_in_an_old_output_dir_gets_a_new_run(synth_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "wandb_run_id").write_text("oldrun01\n")
    result = train(synth_root, out, env=wandb_env(tmp_path), train__max_steps=1, train__resume="none",
                   tracking__wandb__mode="offline", tracking__wandb__num_images=0)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = offline_runs(out)
    assert run_id(records_of(run_dir)) == (out / "wandb_run_id").read_text().strip() != "oldrun01"


@pytest.mark.slow
def test_disabled_writes_nothing(synth_root, tmp_path):
    out = tmp_path / "run"
    result = train(synth_root, out, env=no_credentials_env(tmp_path), train__max_steps=1,
                   tracking__wandb__mode="disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "wandb").exists() and not (out / "wandb_run_id").exists()
    assert "W&B" not in result.stdout
    assert [p for p in (tmp_path / "home").rglob("*") if "wandb" in p.name] == []  # no settings, cache or data


@pytest.mark.slow
def test_unreachable_server_falls_back_to_offline(synth_root, tmp_path):
    """auto + an API key → online; the server refuses connections → one line, offline run, exit 0, key unseen."""
    out = tmp_path / "run"
    with socket.socket() as refusing:  # bound, never listening: connections to it are refused while we hold it
        refusing.bind(("127.0.0.1", 0))
        env = no_credentials_env(tmp_path, WANDB_API_KEY=FAKE_KEY,
                                 WANDB_BASE_URL=f"http://127.0.0.1:{refusing.getsockname()[1]}", WANDB_INIT_TIMEOUT="3")
        result = train(synth_root, out, env=env, train__max_steps=1, tracking__wandb__mode="auto",
                       tracking__wandb__num_images=0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B: cannot start the online run" in result.stdout and "logging offline instead" in result.stdout
    assert "wandb:" not in result.stdout + result.stderr
    (run_dir,) = offline_runs(out)
    assert [p.name for p in (out / "wandb").glob("run-*")] == []  # the failed online attempt is not left to sync
    assert any("train/loss" in row for row in history(records_of(run_dir)))
    assert FAKE_KEY not in result.stdout + result.stderr
    assert files_holding(FAKE_KEY, tmp_path) == []  # output_dir, wandb dirs, home, temp files
