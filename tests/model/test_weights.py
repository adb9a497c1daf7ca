"""Pretrained weights without internet: `cityseg weights fetch` fails with one line when the hub cannot be reached;
a Hugging Face cache laid out as huggingface_hub lays it out (blobs, snapshots/<rev>, refs/main) is found by
`cityseg check`, `weights fetch` and training under HF_HUB_OFFLINE=1."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from cityseg.config.load import load_config
from cityseg.model.weights import HubFile, hub_files
from tests.helpers.process import PYTHON, child_env, cityseg, run
from tests.helpers.runs import tiny_overrides

DEMO = "configs/demo.yaml"
ENCODERS = {"tu-tf_mobilenetv3_small_minimal_100": "timm", "resnet18": "smp"}


def random_encoder_state(encoder: str) -> dict:
    """Weights of a randomly initialised encoder, keyed as the hub file keys them (timm: the full timm model)."""
    torch.manual_seed(123)
    if encoder.startswith("tu-"):
        import timm

        return timm.create_model(encoder[3:], pretrained=False).state_dict()
    from segmentation_models_pytorch.encoders import get_encoder

    return get_encoder(encoder, weights=None).state_dict()


def put_in_hub_cache(cache: Path, file: HubFile, data: bytes) -> None:
    """One file as huggingface_hub stores it: blobs/<sha256>, snapshots/<commit>/<name> -> blob, refs/main."""
    repo = cache / f"models--{file.repo_id.replace('/', '--')}"
    commit = file.revision or hashlib.sha1(file.repo_id.encode()).hexdigest()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / file.filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def build_cache(cache: Path, encoder: str) -> dict:
    state = {k: v.contiguous() for k, v in random_encoder_state(encoder).items()}
    cfg = load_config(DEMO, [f"model.encoder={encoder}", "model.encoder_weights=imagenet"])
    for file in hub_files(cfg.model):
        data = save(state, metadata={"format": "pt"}) if file.filename.endswith(".safetensors") else b"{}"
        put_in_hub_cache(cache, file, data)
    return state


def offline_env(cache: Path, **extra) -> dict:
    return child_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", **extra)


@pytest.mark.slow
@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_check_and_fetch_find_a_prepared_cache(encoder, tmp_path):
    cache = tmp_path / "hub"
    args = ["--config", DEMO, f"model.encoder={encoder}", "model.encoder_weights=imagenet", "data.root=/nowhere"]
    empty = cityseg("check", *args, env=offline_env(cache), timeout=300)
    assert "✗ pretrained weights:" in empty.stdout and "cityseg weights fetch" in empty.stdout, empty.stdout
    build_cache(cache, encoder)
    found = cityseg("check", *args, env=offline_env(cache), timeout=300)
    assert "✓ pretrained weights:" in found.stdout and str(cache) in found.stdout, found.stdout
    assert "✓ model:" in found.stdout, found.stdout  # smp / timm built it from the cache, offline
    fetched = cityseg("weights", "fetch", *args, env=offline_env(cache), timeout=300)
    assert fetched.returncode == 0 and "weights in" in fetched.stdout, fetched.stderr


@pytest.mark.slow
def test_training_offline_loads_the_cached_weights(synth_root, tmp_path):
    cache = tmp_path / "hub"
    state = build_cache(cache, "tu-tf_mobilenetv3_small_minimal_100")
    probe = ("import json, sys; from cityseg.config.load import load_config; from cityseg.model.build import build_model; "
             "m = build_model(load_config('configs/demo.yaml', ['model.encoder_weights=imagenet']).model, 19); "
             "print(json.dumps(m.encoder.model.state_dict()['conv_stem.weight'].flatten()[:8].tolist()))")
    loaded = run([PYTHON, "-c", probe], env=offline_env(cache), timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert json.loads(loaded.stdout.splitlines()[-1]) == pytest.approx(state["conv_stem.weight"].flatten()[:8].tolist())
    overrides = tiny_overrides(synth_root, tmp_path / "run", train__max_steps=1)
    result = run([PYTHON, "train.py", "--config", DEMO, *overrides, "model.encoder_weights=imagenet"],
                 env=offline_env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    missing = run([PYTHON, "train.py", "--config", DEMO, *tiny_overrides(synth_root, tmp_path / "run2"),
                   "model.encoder_weights=imagenet"], env=offline_env(tmp_path / "empty"))
    assert missing.returncode != 0 and "model.encoder_weights" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_fetch_fails_with_one_line_when_the_hub_cannot_be_reached(tmp_path):
    # the "hub" is a local port held bound but never listening: refused at once, nothing leaves this machine
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        env = child_env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=endpoint, HF_HUB_ETAG_TIMEOUT="3",
                        HF_HUB_DOWNLOAD_TIMEOUT="3")
        env.pop("HF_HUB_OFFLINE")
        args = ["weights", "fetch", "--config", "configs/segformer_b0_1024x1024_160k.yaml"]
        result = cityseg(*args, env=env, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot fetch smp-hub/mit_b0.imagenet/"), result.stderr
    assert "login node" in lines[0]
    offline = cityseg(*args, env=offline_env(tmp_path / "hub"), timeout=300)
    assert offline.returncode == 1 and offline.stderr.strip().splitlines() == [
        "error: HF_HUB_OFFLINE is set: fetching needs the hub; unset it on a machine with internet"]


@pytest.mark.slow
def test_fetch_fails_in_seconds_when_the_hub_cannot_be_reached(tmp_path):
    """huggingface_hub alone retries a refused connection with backoff for ~25 s more (32 s offline, as a user
    measured); fetch asks once. The "hub" is a local port held bound but never listening: nothing leaves this
    machine. Measured against the same command refused before any request (HF_HUB_OFFLINE: its start-up)."""
    args = ["weights", "fetch", "--config", "configs/segformer_b0_1024x1024_160k.yaml"]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        env = child_env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=f"http://127.0.0.1:{closed.getsockname()[1]}")
        env.pop("HF_HUB_OFFLINE")
        start = time.perf_counter()
        result = cityseg(*args, env=env, timeout=300)
        asked = time.perf_counter() - start
    start = time.perf_counter()
    offline = cityseg(*args, env=offline_env(tmp_path / "hub"), timeout=300)
    imports = time.perf_counter() - start
    assert result.returncode == 1 and offline.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: cannot fetch smp-hub/mit_b0.imagenet/config.json from the Hugging Face Hub (ConnectError: the hub "
        "cannot be reached or refused); run this on a machine with internet (e.g. a login node)"], result.stderr
    assert asked - imports < 5.0, f"failed after {asked:.1f} s, {asked - imports:.1f} s more than its start-up"


RECIPE = "configs/segformer_b0_1024x1024_160k.yaml"  # imagenet weights of mit_b0, not in the (empty) cache


def weights_line(lines: list[str]) -> str:
    """The check's pretrained-weights line, in the form this machine's network gives: offline (no hub reachable,
    the machine the suite is run on) or with a hub to download from."""
    line = next(line for line in lines if "pretrained weights:" in line)
    offline = ("✗ pretrained weights: model.encoder_weights: smp-hub/mit_b0.imagenet/config.json (+1 more) is not "
               "in the Hugging Face cache ")
    assert line.startswith((offline, "✓ pretrained weights: smp-hub/mit_b0.imagenet")), line
    if line.startswith("✗"):
        assert "this machine is offline (no connection to https://huggingface.co" in line, line
        assert "on a login node run `cityseg weights fetch --config <config>`" in line, line
    return line


@pytest.mark.slow  # ~4 s: building the mit_b0 model
def test_check_offline_answers_in_one_line_within_seconds(synth_root, tmp_path, monkeypatch, capsys):
    """This machine's own network (no model hub reachable) with HF_HUB_OFFLINE unset, as on a compute node: one
    short question to the hub, then the local cache only; it took ~60 s of hub retries (24 lines of them)."""
    from huggingface_hub import constants

    from cityseg.cli import main as cityseg_main
    from cityseg.model import weights

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # whatever the probe sets is undone after the test
    monkeypatch.setattr(weights, "_HUB", {})
    start = time.perf_counter()
    code = cityseg_main(["check", "--config", RECIPE, *tiny_overrides(synth_root, tmp_path / "run"),
                         "data.cache.dir=null", "model.sync_bn=false"])
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 13 and "Retry" not in captured.err, captured
    assert code == (1 if weights_line(lines).startswith("✗") else 0), lines
    assert "✓ model: Segformer / mit_b0, 3.7 M parameters, encoder random init here (weights: above)" in lines
    assert seconds < 10.0, f"{seconds:.1f} s"


@pytest.mark.slow
def test_sweep_dry_run_offline_stops_in_seconds(synth_root, tmp_path):
    """`launch/submit.py --sweep --dry-run` with this machine's network: the checks of every combination run in one
    process that asks the hub once; measured against `cityseg check` under HF_HUB_OFFLINE=1 (its start-up)."""
    env = child_env(HF_HUB_CACHE=str(tmp_path / "hub"))
    env.pop("HF_HUB_OFFLINE")
    overrides = [f"data.root={synth_root}", "data.image_size=[64,128]", "data.cache.dir=null", "data.batch_size=4",
                 f"output_dir={tmp_path / 'runs'}"]
    start = time.perf_counter()
    sweep = run([PYTHON, "launch/submit.py", "--config", RECIPE, "--gpus-per-node", "0", "--dry-run",
                 "--log-dir", tmp_path, "--sweep", "optim.lr=1e-3,3e-4", *overrides], env=env, timeout=300)
    swept = time.perf_counter() - start
    start = time.perf_counter()
    cityseg("check", "--config", RECIPE, *overrides, env=offline_env(tmp_path / "hub"), timeout=300)
    imports = time.perf_counter() - start
    assert "Retry" not in sweep.stderr, sweep.stderr
    if weights_line(sweep.stderr.splitlines() + sweep.stdout.splitlines()).startswith("✗"):
        assert sweep.returncode == 1 and sweep.stderr.strip().splitlines()[-1].startswith("error: preflight `cityseg "
                                                                                          "check --config"), sweep
    assert swept - imports < 8.0, f"{swept:.1f} s, {swept - imports:.1f} s more than a check's start-up"
