"""The smp factory: the seed's model by default, encoder weights from a local file (safetensors or .pth)."""
import pytest
import torch
from safetensors.torch import save_file

from cityseg.config.load import load_config
from cityseg.model.build import ModelError, build_model
from tests.helpers.files import CodeOnLoad


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_encoder_weights_from_a_local_file(tmp_path, suffix):
    cfg = load_config("configs/seed_unet_mobilenetv3.yaml")
    torch.manual_seed(1)
    source = build_model(cfg.model, 19)
    assert type(source).__name__ == "Unet"
    weights = {k: v.contiguous() for k, v in source.encoder.state_dict().items()}
    path = tmp_path / f"encoder{suffix}"
    save_file(weights, str(path)) if suffix == ".safetensors" else torch.save(weights, path)
    cfg.model.encoder_weights = str(path)
    torch.manual_seed(2)  # a different random init: only the loaded file can make the encoders equal
    loaded = build_model(cfg.model, 19)
    for key, tensor in loaded.encoder.state_dict().items():
        assert torch.equal(tensor, weights[key]), key


def test_an_unreadable_weights_file_is_one_line(tmp_path):
    cfg = load_config("configs/seed_unet_mobilenetv3.yaml")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    cfg.model.encoder_weights = str(tmp_path / "bad.pth")
    with pytest.raises(ModelError, match="model.encoder_weights: cannot read .*bad.pth"):
        build_model(cfg.model, 19)


def test_a_weights_file_whose_pickle_runs_code_is_refused_without_running_it(tmp_path):
    cfg = load_config("configs/seed_unet_mobilenetv3.yaml")
    marker = tmp_path / "payload_ran"
    torch.save({"conv.weight": torch.zeros(1), "hook": CodeOnLoad(marker)}, tmp_path / "hostile.pth")
    cfg.model.encoder_weights = str(tmp_path / "hostile.pth")
    with pytest.raises(ModelError, match=r"model.encoder_weights: cannot read .*hostile.pth: UnpicklingError"):
        build_model(cfg.model, 19)
    assert not marker.exists()
