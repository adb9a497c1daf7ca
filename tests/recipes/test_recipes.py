"""Every recipe in configs/ trains 2 steps on tiny synthetic data on CPU (random init) and states its anchor."""
import pytest
import yaml

from cityseg.config import load_config
from cityseg.optim import lr_at
from tests.conftest import PYTHON, REPO, read_jsonl, run, tiny_overrides

RECIPES = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in ("demo.yaml",))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps(recipe, synth_root, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(synth_root, out, model__encoder_weights="null", train__max_steps=2,
                               data__crop_size="[64,64]", train__mixed_precision="\"no\"", model__sync_bn="false",
                               eval__crop_size="[64,64]", eval__stride="[48,48]", checkpoint__keep_last=1)
    overrides = [o for o in overrides if not o.startswith("train.epochs=")] if "null" in _epochs(recipe) else overrides
    result = run([PYTHON, "train.py", "--config", f"configs/{recipe}", *overrides], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [1, 2]
    assert read_jsonl(out / "metrics.jsonl")[-1]["step"] == 2
    assert (out / "model.safetensors").is_file()
    reference = yaml.safe_load((REPO / "configs" / recipe).read_text())["train"].get("reference_world_size")
    if reference not in (None, 1):  # one process here: the linear scaling rule applies and says so
        assert f"is for train.reference_world_size={reference} processes" in result.stdout + result.stderr
        assert "scaled linearly" in result.stdout + result.stderr
        cfg = load_config(REPO / "configs" / recipe, overrides)
        first_lr = read_jsonl(out / "train_log.jsonl")[0]["lr"]
        assert first_lr == pytest.approx(lr_at(0, 2, cfg.optim) / reference)


def _epochs(recipe: str) -> str:
    return str(yaml.safe_load((REPO / "configs" / recipe).read_text())["train"].get("epochs", ""))


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "seed_unet_mobilenetv3.yaml"])
def test_recipe_header_cites_anchor_and_expected_miou(recipe):
    text = (REPO / "configs" / recipe).read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "Anchor:" in header and "mIoU" in header and "Expected val mIoU" in header, recipe
    assert "Global batch" in header and "reference_world_size" in header, recipe
    tree = yaml.safe_load(text)
    assert tree["train"]["epochs"] is None and tree["train"]["max_steps"] >= 80000, "iteration-based schedule"
    assert tree["train"]["reference_world_size"] >= 1
