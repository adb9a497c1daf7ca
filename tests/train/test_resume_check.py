"""Auto-resume continues a run only with a config that trains the same thing; `cityseg check` says so first."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from cityseg.config.load import load_config, to_dict
from cityseg.config.schema import Config
from cityseg.train.optim import lr_at
from cityseg.train.resume import ALLOWED, compare, flatten, upgrade_trainer_state
from tests.helpers.process import CONFIG, cityseg
from tests.helpers.runs import read_jsonl, tiny_overrides


def test_training_keys_refuse_and_running_keys_are_allowed():
    saved = to_dict(load_config("configs/demo.yaml"))
    current = to_dict(load_config("configs/demo.yaml", ["optim.lr=5e-4", "loss.name=ce", "model.arch=FPN",
                                                        "train.log_every=1", "data.num_workers=2",
                                                        "tracking.wandb.mode=offline", "train.epochs=40"]))
    refused, allowed = compare(saved, current)
    assert refused == ["loss.name 'dice+ce' -> 'ce'", "model.arch 'Unet' -> 'FPN'", "optim.lr 0.003 -> 0.0005"]
    assert allowed == ["data.num_workers 0 -> 2", "tracking.wandb.mode 'disabled' -> 'offline'",
                       "train.epochs 20 -> 40", "train.log_every 5 -> 1"]


def test_schedule_may_grow_but_not_shrink():
    saved = to_dict(load_config("configs/demo.yaml", ["train.max_steps=8"]))
    grown = to_dict(load_config("configs/demo.yaml", ["train.max_steps=16"]))
    unlimited = to_dict(load_config("configs/demo.yaml"))
    shrunk = to_dict(load_config("configs/demo.yaml", ["train.max_steps=4", "train.epochs=10"]))
    assert compare(saved, grown)[0] == [] and compare(saved, unlimited)[0] == []
    assert compare(saved, shrunk)[0] == ["train.epochs 20 -> 10", "train.max_steps 8 -> 4"]


def test_seed_data_and_label_scheme_refuse_and_a_key_added_since_counts_as_its_default():
    saved = to_dict(load_config("configs/demo.yaml"))
    current = to_dict(load_config("configs/demo.yaml", ["seed=1", "data.label_scheme=seed20", "data.hflip=false"]))
    refused, _ = compare(saved, current)
    assert [change.split()[0] for change in refused] == ["data.hflip", "data.label_scheme", "seed"]
    del saved["optim"]["grad_clip"]  # a run recorded before optim.grad_clip existed: default None then
    assert compare(saved, to_dict(load_config("configs/demo.yaml"))) == ([], [])
    assert compare(saved, to_dict(load_config("configs/demo.yaml", ["optim.grad_clip=1.0"])))[0] != []


def test_every_allowed_rule_names_a_real_key():
    keys = flatten(to_dict(Config()))
    for rule in ALLOWED:
        assert any(key == rule or (rule.endswith(".") and key.startswith(rule)) for key in keys), rule


def test_old_trainer_state_epoch_meant_epochs_done():
    assert upgrade_trainer_state({"epoch": 2, "batch_in_epoch": 0}) == {"epoch": 2, "epochs_done": 2,
                                                                         "batch_in_epoch": 0}
    assert upgrade_trainer_state({"epoch": 2, "batch_in_epoch": 3})["epoch"] == 3


@pytest.mark.slow
def test_changed_run_refuses_to_resume_and_allowed_changes_are_logged(synth_root, tmp_path):
    out = tmp_path / "run"
    base = tiny_overrides(synth_root, out, train__max_steps=2, train__epochs=2)
    first = cityseg("train", *CONFIG, *base)
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = (out / "config.yaml").read_text()

    changed = cityseg("train", *CONFIG, *base, "optim.lr=5e-4", "loss.name=ce", "model.arch=FPN")
    assert changed.returncode == 2, changed.stderr[-3000:]
    line = changed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "will not resume" in line and "step_00000002" in line
    for change in ("optim.lr 0.003 -> 0.0005", "loss.name 'dice+ce' -> 'ce'", "model.arch 'Unet' -> 'FPN'"):
        assert change in line
    assert "Mismatched" not in changed.stderr + changed.stdout
    assert "resume: from" not in changed.stdout  # refused before it is announced
    assert (out / "config.yaml").read_text() == recorded  # a refused start writes nothing
    advised = re.search(r"add (\S+) to the command", line).group(1)  # the advice, run as written
    assert advised == f"output_dir={out}-2", line
    new_run = cityseg("train", *CONFIG, *base, "optim.lr=5e-4", "loss.name=ce", "model.arch=FPN", advised)
    assert new_run.returncode == 0, new_run.stderr[-3000:]
    assert "resume: no checkpoint in output_dir, starting fresh" in new_run.stdout
    assert (tmp_path / "run-2" / "model.safetensors").is_file() and (out / "config.yaml").read_text() == recorded

    check = cityseg("check", *CONFIG, *base, "optim.lr=5e-4")
    assert check.returncode == 1 and "✗ resume:" in check.stdout and "optim.lr 0.003 -> 0.0005" in check.stdout

    extended = [*base, "train.max_steps=4", "train.log_every=2"]
    check = cityseg("check", *CONFIG, *extended)
    assert check.returncode == 0, check.stdout
    assert "✓ resume: from" in check.stdout and "train.max_steps 2 -> 4" in check.stdout

    resumed = cityseg("train", *CONFIG, *extended)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: allowed change train.log_every 1 -> 2" in resumed.stdout
    assert "resume: allowed change train.max_steps 2 -> 4" in resumed.stdout
    lr_cfg = load_config("configs/demo.yaml", extended).optim  # the finished 2-step schedule ended at LR 0
    assert (f"resume: the LR schedule is stretched from 2 to 4 steps: at the resumed step 2 the LR jumps from 0 "
            f"(the checkpoint's schedule) to {lr_at(2, 4, lr_cfg):.3g}, then follows the 4-step schedule"
            in resumed.stdout), resumed.stdout
    assert resumed.stdout.index("resume: from") < resumed.stdout.index("resume: allowed change")
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 4
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [1, 2, 4]

    # a checkpoint with no recorded config cannot be judged: loading it into another model names the first mismatch
    bare = tmp_path / "elsewhere" / "step_00000004"
    shutil.copytree(out / "checkpoints" / "step_00000004", bare)
    (bare / "config.yaml").unlink()  # as a checkpoint written before configs were recorded in them
    state = json.loads((bare / "trainer_state.json").read_text())
    del state["files"]["config.yaml"]
    (bare / "trainer_state.json").write_text(json.dumps(state))
    other = cityseg("train", *CONFIG, *tiny_overrides(synth_root, tmp_path / "other"), f"train.resume={bare}",
                    "model.arch=FPN")
    assert other.returncode == 1, other.stderr[-3000:]
    line = other.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {bare}") and " has shape (" in line and ") but the model" in line, line
    assert "Error(s) in loading state_dict" not in other.stderr + other.stdout
    assert "records no config.yaml: the config was not compared" in other.stdout


@pytest.mark.slow
def test_moved_data_root_resumes_exactly_and_a_shrunk_training_set_is_one_line(synth_root, tmp_path):
    """data.root may change on resume (the dataset moved: another mount, a node-local copy), logged; a training set
    now smaller than the samples the checkpoint already trained of its epoch is refused in one line."""
    from safetensors.torch import load_file

    from cityseg.data.synthetic import write_synthetic

    straight = tmp_path / "straight"  # 16 images / batch 4: checkpoints at steps 2 and 4
    first = cityseg("train", *CONFIG, *tiny_overrides(synth_root, straight, checkpoint__every_steps=2,
                                                      checkpoint__keep_last=4))
    assert first.returncode == 0, first.stderr[-3000:]
    step2 = straight / "checkpoints" / "step_00000002"

    moved = shutil.copytree(synth_root, tmp_path / "moved")
    resumed = cityseg("train", *CONFIG, *tiny_overrides(moved, tmp_path / "resumed", checkpoint__every_steps=2,
                                                        checkpoint__keep_last=4), f"train.resume={step2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: allowed change data.root '{synth_root}' -> '{moved}'" in resumed.stdout
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)

    shrunk = tmp_path / "shrunk"
    write_synthetic(shrunk, n_train=4, n_val=7, height=64, width=128, seed=0)
    refused = cityseg("train", *CONFIG, *tiny_overrides(shrunk, tmp_path / "refused", checkpoint__every_steps=2,
                                                        checkpoint__keep_last=4), f"train.resume={step2}")
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [
        f"error: {step2}: was saved after 8 samples of epoch 1, but the training set now has 4: point data.root at "
        "the data the run trained on, or start a new run (output_dir=<new dir>)"]
    assert not (tmp_path / "refused" / "train_log.jsonl").exists()


@pytest.mark.slow
def test_a_finished_run_says_nothing_is_left_and_config_yaml_records_what_runs_now(synth_root, tmp_path):
    """Resuming a finished run with allowed changes (a new tracker, another batch size): one line says nothing is
    left and how to train more, exit 0; config.yaml holds the config given now, config_changes.jsonl the history."""
    out = tmp_path / "run"
    base = tiny_overrides(synth_root, out)  # 1 epoch of 16 images, batch 4: 4 steps
    first = cityseg("train", *CONFIG, *base)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (out / "config_changes.jsonl").exists()  # a run never resumed with changes has no history

    again = cityseg("train", *CONFIG, *base, "tracking.tensorboard=true", "data.batch_size=2")
    assert again.returncode == 0, again.stderr[-3000:]
    said = [line for line in again.stdout.splitlines() if "nothing left to train" in line]
    assert said == [(f"resume: nothing left to train: the run in {out} finished at step 8 of 8; to train more, "
                     "raise train.epochs (now 1, e.g. train.epochs=2); trackers and logging settings act only on the "
                     "steps trained")], again.stdout  # step 4 at batch 4 is step 8 at batch 2
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["data"]["batch_size"] == 2 and recorded["tracking"]["tensorboard"] is True
    history = read_jsonl(out / "config_changes.jsonl")
    assert [(r["step"], r["resumed_from"], r["changes"]) for r in history] == [
        (8, str(out / "checkpoints" / "step_00000004"),
         ["data.batch_size 4 -> 2", "tracking.tensorboard False -> True"])]

    more = cityseg("train", *CONFIG, *base, "data.batch_size=2", "train.epochs=2")  # tensorboard back off
    assert more.returncode == 0, more.stderr[-3000:]
    assert "nothing left to train" not in more.stdout
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["data"]["batch_size"], recorded["train"]["epochs"], recorded["tracking"]["tensorboard"]) == (
        2, 2, False)
    assert [r["changes"] for r in read_jsonl(out / "config_changes.jsonl")][1:] == [
        ["data.batch_size 4 -> 2", "train.epochs 1 -> 2"]]  # against the checkpoint's own config (step 4's)


def test_class_head_padding_may_change_on_resume():
    """model.pad_classes_to keeps the weights the unpadded model's: a run may resume with it switched on or off."""
    saved = to_dict(load_config("configs/demo.yaml"))
    refused, allowed = compare(saved, to_dict(load_config("configs/demo.yaml", ["model.pad_classes_to=24"])))
    assert refused == [] and [change.split()[0] for change in allowed] == ["model.pad_classes_to"], allowed
