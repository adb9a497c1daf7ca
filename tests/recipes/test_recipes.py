"""Every recipe in configs/ trains 2 steps from its decode-once cache on tiny synthetic data on CPU (random init),
keeps its anchor's LR on another global batch (and says how to match it), and states its anchor honestly."""
import pytest
import yaml

from cityseg.config.load import load_config
from cityseg.train.optim import lr_at
from tests.helpers.process import PYTHON, REPO, run
from tests.helpers.runs import read_jsonl, tiny_overrides

RECIPES = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in ("demo.yaml",))
ANCHORED = [r for r in RECIPES if r != "seed_unet_mobilenetv3.yaml"]
# single-scale anchor, then multi-scale + flip (mmsegmentation's model zoo); the Unet recipe has none of its own
QUOTED = {"deeplabv3plus_r50_512x1024_80k.yaml": ("80.09", "81.13"),
          "segformer_b0_1024x1024_160k.yaml": ("76.54", "78.22"),
          "unet_mobilenetv3_512x1024_320k.yaml": ("none of this model", "64.11")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps(recipe, synth_root, tmp_path):
    out, tree = tmp_path / "run", yaml.safe_load((REPO / "configs" / recipe).read_text())
    overrides = tiny_overrides(synth_root, out, model__encoder_weights="null", train__max_steps=2,
                               data__crop_size="[64,64]", train__mixed_precision="\"no\"", model__sync_bn="false",
                               eval__crop_size="[64,64]", eval__stride="[48,48]", checkpoint__keep_last=1)
    overrides = [o for o in overrides if not o.startswith("train.epochs=")] if "null" in _epochs(recipe) else overrides
    if tree["data"].get("cache", {}).get("dir"):  # the recipe trains from the cache: `cityseg prepare` it first
        overrides.append(f"data.cache.dir={tmp_path / 'cache'}")
        prepared = run([PYTHON, "-m", "cityseg", "prepare", "--config", f"configs/{recipe}", *overrides])
        assert prepared.returncode == 0, prepared.stderr[-3000:]
    result = run([PYTHON, "train.py", "--config", f"configs/{recipe}", *overrides], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [1, 2]
    assert read_jsonl(out / "metrics.jsonl")[-1]["step"] == 2
    assert (out / "model.safetensors").is_file()
    cfg = load_config(REPO / "configs" / recipe, overrides)
    recorded = load_config(out / "config.yaml", recorded=True)
    assert recorded.data.mean is not None and recorded.data.std is not None  # what evaluate / predict will use
    if cfg.model.encoder.startswith("tu-tf_"):
        assert recorded.data.mean == recorded.data.std == [0.5, 0.5, 0.5]  # timm's tf_ weights, not ImageNet's
    reference = cfg.train.reference_global_batch
    if reference not in (None, 4):  # one process x batch 4 here: the LR stays the anchor's, and a warning says so
        assert (f"warning: global batch 4 (data.batch_size 4 x 1 processes x train.grad_accum 1) differs from the "
                f"recipe's train.reference_global_batch {reference}") in result.stdout
        assert f"set data.batch_size={reference} train.grad_accum=1" in result.stdout
        first_lr = read_jsonl(out / "train_log.jsonl")[0]["lr"]
        assert first_lr == pytest.approx(lr_at(0, 2, cfg.optim))


def _epochs(recipe: str) -> str:
    return str(yaml.safe_load((REPO / "configs" / recipe).read_text())["train"].get("epochs", ""))


@pytest.mark.parametrize("recipe", ANCHORED)
def test_recipe_header_cites_anchor_and_expected_miou(recipe):
    text = (REPO / "configs" / recipe).read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "Anchor:" in header and "mIoU" in header and "Expected val mIoU" in header, recipe
    assert "Global batch" in header and "reference_global_batch" in header, recipe
    assert all(quote in header for quote in QUOTED[recipe]), recipe
    tree = yaml.safe_load(text)
    assert tree["train"]["epochs"] is None and tree["train"]["max_steps"] >= 80000, "iteration-based schedule"
    assert tree["train"]["reference_global_batch"] >= 1 and tree["train"]["channels_last"] is True
    assert tree["data"]["cache"]["dir"] and tree["data"]["cat_max_ratio"] == 0.75
    assert tree["optim"]["lr_scaling"] == "none"  # as mmsegmentation: the LR is not rescaled behind the user's back
