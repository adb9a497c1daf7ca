"""`cityseg check`: ✓ on a good setup (exit 0); each broken setup gives its ✗ line and a non-zero exit."""
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cityseg.cli import main as cityseg_main
from cityseg.config.load import load_config
from cityseg.data.cityscapes import find_pairs
from cityseg.train.preflight import run_checks
from tests.helpers.runs import tiny_overrides

LABELS = ["config", "processes", "data train", "batch size", "data val", "data cache", "pretrained weights", "model",
          "shapes", "output_dir", "resume", "W&B", "environment"]


@pytest.fixture(autouse=True)
def no_launcher_or_wandb_key(monkeypatch, tmp_path):
    for name in ("WORLD_SIZE", "RANK", "WANDB_API_KEY", "WANDB_MODE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a W&B key


def check(capsys, *args) -> tuple[int, dict]:
    code = cityseg_main(["check", "--config", "configs/demo.yaml", *map(str, args)])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, {line[2:].split(": ", 1)[0]: line for line in lines}


def test_a_good_setup_passes_every_check(synth_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    code, lines = check(capsys, *tiny_overrides(synth_root, tmp_path / "run"), "tracking.wandb.mode=auto")
    assert code == 0, lines
    assert list(lines) == LABELS and all(line.startswith("✓ ") for line in lines.values()), lines
    assert lines["data train"] == f"✓ data train: 16 image/label pairs in {synth_root}; PNG headers read: sizes match"
    assert lines["data cache"] == "✓ data cache: none (data.cache.dir null): samples decoded from the PNG files"
    assert lines["shapes"] == ("✓ shapes: training samples 64x128 (any size suits Unet / "
                               "tu-tf_mobilenetv3_small_minimal_100)")
    assert lines["processes"] == "✓ processes: 1 process(es); CPU (gloo between processes); mixed precision no"
    assert "GiB free, checkpoints need about" in lines["output_dir"]
    assert lines["pretrained weights"] == "✓ pretrained weights: none needed (model.encoder_weights is null or a local file)"
    assert lines["resume"] == "✓ resume: no checkpoint in output_dir: starting fresh"
    assert lines["W&B"] == "✓ W&B: offline (auto: no API key; `wandb sync` later)"
    assert "SLURM_JOB_ID=4242" in lines["environment"]
    assert not (tmp_path / "run").exists()  # a check writes nothing


def test_a_prepared_cache_passes(synth_root, tmp_path, capsys):
    overrides = [*tiny_overrides(synth_root, tmp_path / "run"), f"data.cache.dir={tmp_path / 'cache'}"]
    assert cityseg_main(["prepare", "--config", "configs/demo.yaml", *overrides, "--splits", "train"]) == 0
    code, lines = check(capsys, *overrides)
    assert code == 0, lines
    assert lines["data cache"] == f"✓ data cache: {tmp_path / 'cache'}: train prepared from these files at 64x128"


def test_the_python_api_for_submit(synth_root, tmp_path):
    cfg = load_config("configs/demo.yaml", tiny_overrides(synth_root, tmp_path / "run", data__batch_size=8))
    checks = run_checks(cfg, world_size=4)
    assert [label for _, label, _ in checks] == LABELS
    failed = [(label, detail) for ok, label, detail in checks if not ok]
    assert failed == [("batch size", "data.batch_size: 8 is larger than each process's share of the training set "
                                     "(16 samples / 4 processes = 4)")]


def test_png_headers_are_read_and_deep_decodes_every_file(synth_root, tmp_path, capsys):
    root = tmp_path / "cs"
    shutil.copytree(synth_root, root)
    pairs = find_pairs(root, "train")
    pairs[2][1].write_bytes(np.random.default_rng(0).bytes(3000))  # not a PNG: its header says so
    overrides = tiny_overrides(root, tmp_path / "run")
    code, lines = check(capsys, *overrides)
    assert code == 1
    assert lines["data train"] == (f"✗ data train: 1 of 16 pairs unreadable; first: {pairs[2][1]}: cannot decode label "
                                   "(not a PNG file: no PNG signature and IHDR header)")
    shutil.copy(synth_root / pairs[2][1].relative_to(root), pairs[2][1])
    image = pairs[5][0]
    data = bytearray(image.read_bytes())
    data[60:120] = bytes(60)  # pixel data broken, header and end intact: only decoding finds it
    image.write_bytes(bytes(data))
    code, lines = check(capsys, *overrides)
    assert code == 0 and lines["data train"].startswith("✓")
    code, lines = check(capsys, "--deep", *overrides)
    assert code == 1
    assert lines["data train"] == (f"✗ data train: 1 of 16 pairs unreadable; first: {image}: cannot decode image "
                                   "(corrupt, truncated or not an image)")
    assert lines["data val"] == "✓ data val: 7 pairs decoded: sizes match, label ids known"


def partial_checkpoint(tmp_path):
    broken = tmp_path / "step_00000009"
    broken.mkdir()
    (broken / "trainer_state.json").write_text('{"step": 9}')
    save_file({"w": torch.zeros(1000)}, str(broken / "model.safetensors"))
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    return broken


@pytest.mark.parametrize("breakage, label, message", [
    ("no_root", "data train", "directory not found; expected the Cityscapes layout"),
    ("fp16", "processes", "train.mixed_precision: fp16 needs a CUDA GPU"),
    ("sync_bn", None, None),
    ("batch", "batch size", "data.batch_size: 17 is larger than each process's share"),
    ("output_dir", "output_dir", "is not a directory"),
    ("resume", "resume", "model.safetensors: corrupt"),
    ("wandb_online", "W&B", "online (no API key (WANDB_API_KEY or ~/.netrc))"),
    ("no_cache", "data cache", "cache: directory not found; run `cityseg prepare --config <config>` first"),
    ("stale_cache", "data cache", "cache holds data.label_scheme trainid19 but the config asks for seed20"),
    ("indivisible", "shapes", "data.crop_size: training samples of 64x100 are not divisible by 32, which Segformer / "
                              "mit_b0 needs"),
])
def test_each_broken_setup_fails_its_line(synth_root, tmp_path, capsys, breakage, label, message):
    root, out = synth_root, tmp_path / "run"
    extra = []
    if breakage == "no_root":
        root = tmp_path / "nowhere"
    elif breakage == "fp16":
        extra = ["train.mixed_precision=fp16"]
    elif breakage == "sync_bn":
        extra = ["model.sync_bn=true"]
    elif breakage == "batch":
        extra = ["data.batch_size=17"]
    elif breakage == "output_dir":
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "run"
    elif breakage == "resume":
        extra = [f"train.resume={partial_checkpoint(tmp_path)}"]
    elif breakage == "wandb_online":
        extra = ["tracking.wandb.mode=online"]
    elif breakage == "no_cache":
        extra = [f"data.cache.dir={tmp_path / 'cache'}"]
    elif breakage == "stale_cache":  # prepared for another label scheme
        assert cityseg_main(["prepare", "--config", "configs/demo.yaml", *tiny_overrides(root, out),
                             f"data.cache.dir={tmp_path / 'cache'}", "--splits", "train"]) == 0
        extra = [f"data.cache.dir={tmp_path / 'cache'}", "data.label_scheme=seed20"]
    elif breakage == "indivisible":
        extra = ["model.arch=Segformer", "model.encoder=mit_b0", "data.crop_size=[64,100]"]
    code, lines = check(capsys, *tiny_overrides(root, out), *extra)
    if breakage == "sync_bn":  # a warning, not a failure
        assert code == 0 and "warning: model.sync_bn needs more than one CUDA device" in lines["processes"]
        return
    assert code == 1
    failed = {name: line for name, line in lines.items() if line.startswith("✗")}
    assert list(failed) == ([label] if breakage != "no_root" else ["data train", "data val"]), lines
    assert message in failed[label], failed


def test_an_invalid_config_exits_2(capsys):
    code = cityseg_main(["check", "--config", "configs/demo.yaml", "data.batchsize=4"])
    assert code == 2
    assert capsys.readouterr().out.strip() == ("✗ config: command line override 'data.batchsize=4': unknown key "
                                               "'data.batchsize' "
                                               "(did you mean 'data.batch_size'?)")
