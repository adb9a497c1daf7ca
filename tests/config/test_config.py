"""Config loading: YAML + overrides, and every user error as one line, exit 2, no traceback."""
import pytest
import yaml

from cityseg.config.load import load_config
from cityseg.config.schema import ConfigError, compile_mode
from tests.helpers.process import cityseg


def test_overrides_apply_and_types_are_checked(tmp_path):
    cfg = load_config("configs/demo.yaml", ["data.image_size=[32,64]", "optim.lr=1e-4", "train.max_steps=3",
                                           "model.encoder_weights=null", "tracking.wandb.tags=[a,b]"])
    assert cfg.data.image_size == [32, 64] and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.train.max_steps == 3 and cfg.model.encoder_weights is None
    assert cfg.tracking.wandb.tags == ["a", "b"] and cfg.output_dir == "runs/demo"
    assert load_config(None, ["name=x"]).output_dir == "runs/x"


def test_seed_config_is_the_blog_recipe():
    cfg = load_config("configs/seed_unet_mobilenetv3.yaml")
    assert (cfg.data.batch_size, cfg.data.image_size, cfg.train.epochs) == (32, [256, 512], 10)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.name, cfg.model.arch) == (1e-3, 0.005, "dice", "Unet")
    assert cfg.model.encoder == "tu-tf_mobilenetv3_small_minimal_100" and cfg.model.encoder_weights is None


@pytest.mark.parametrize("override, message", [
    ("data.batchsize=4", "unknown key 'data.batchsize' (did you mean 'data.batch_size'?)"),
    ("data.batch_size=four", "data.batch_size: expected int, got str 'four'"),
    ("data.batch_size=0", "data.batch_size: 0 is below the minimum 1"),
    ("optim.lr=-1", "optim.lr: -1.0 is below the minimum 0.0"),
    ("train.mixed_precision=fp8", "train.mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    ("data.image_size=[64]", "data.image_size: expected two positive numbers [H, W], got [64]"),
    ("train.epochs", "expected key=value"),
    # YAML reads true/false as bool, and bool is a subclass of int in Python: refused, not trained as 1 / 0
    ("data.batch_size=true", "data.batch_size: expected int, got bool True"),
    ("train.epochs=false", "train.epochs: expected int, got bool False"),
    ("optim.lr=true", "optim.lr: expected float, got bool True"),
    ("train.compile=fast", ("train.compile: 'fast' is not one of false, true, default, max-autotune-no-cudagraphs, "
                            "reduce-overhead")),
    ("train.compile=1", "train.compile: 1 is not one of false, true"),  # 1 == True in Python: not a mode
    ("model.aspp_project_kernel=true", "model.aspp_project_kernel: True is not one of 1, 3"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert message in str(err.value)


@pytest.mark.parametrize("value, message", [
    ("[512]", "data.crop_size: expected two positive numbers [H, W], got [512]"),
    ("[0,512]", "data.crop_size: expected two positive numbers [H, W], got [0, 512]"),
    ("[512,-1]", "data.crop_size: expected two positive numbers [H, W], got [512, -1]"),
    ("[512,512,512]", "data.crop_size: expected two positive numbers [H, W], got [512, 512, 512]"),
    ("big", "data.crop_size: expected a list of int, got 'big'"),
    ("[512,wide]", "data.crop_size[1]: expected int, got str 'wide'"),
])
def test_crop_size_is_two_positive_numbers(value, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [f"data.crop_size={value}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_errors_are_one_line_exit_2_no_traceback(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ndata:\n  root: [unclosed\n  batch_size: 2\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("name: x\nmodel:\n  encodr: resnet18\n")
    cases = [
        ([f"--config={broken}"], f"{broken}:4: YAML syntax error"),
        ([f"--config={unknown}"], "unknown key 'model.encodr' (did you mean 'model.encoder'?)"),
        (["--config", "configs/demo.yaml", "train.epochs=zero"], "train.epochs: expected int"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml: config file not found"),
    ]
    for args, message in cases:
        result = cityseg("train", *args, timeout=120)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_bool_for_an_int_key_in_yaml_is_one_line_naming_the_key(tmp_path, capsys):
    from cityseg.cli import main as cityseg_main

    config = tmp_path / "bool.yaml"
    config.write_text("name: x\ndata:\n  batch_size: true\n")
    code = cityseg_main(["config", "--config", str(config)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {config}: data.batch_size: expected int, got bool True"]


@pytest.mark.parametrize("written, mode", [(False, None), (True, "default"), ("default", "default"),
                                           ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
                                           ("reduce-overhead", "reduce-overhead")])
def test_train_compile_reads_old_bools_and_mode_names(tmp_path, written, mode):
    """A run directory's config.yaml from before the modes (compile: true / false) still loads and resumes:
    true means torch.compile's default mode, as it always did."""
    recorded = tmp_path / "config.yaml"
    recorded.write_text(yaml.safe_dump({"name": "old", "train": {"compile": written}}))
    cfg = load_config(recorded, recorded=True)
    assert compile_mode(cfg.train) == mode
    assert compile_mode(load_config(None, [f"train.compile={str(written).lower()}"]).train) == mode
