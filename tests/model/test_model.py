"""The smp factory: the seed's model by default, encoder weights from a local file (safetensors or .pth)."""
import pytest
import torch
from safetensors.torch import save_file

from cityseg.config.load import load_config
from cityseg.model.build import ModelError, build_model
from cityseg.train.losses import build_loss
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


@pytest.mark.parametrize("padded_to, aux_head", [(24, False), (32, True)])
def test_padded_class_head_gives_the_same_logits_loss_gradients_and_weights(padded_to, aux_head):
    """model.pad_classes_to: the head computes padded_to channels, the real 19 go on; with the same weights the
    logits, the loss and every gradient are those of the unpadded model, and the weights files are interchangeable."""
    cfg = load_config("configs/demo.yaml", [f"model.aux_head={str(aux_head).lower()}"])
    plain = build_model(cfg.model, 19)
    cfg.model.pad_classes_to = padded_to
    padded = build_model(cfg.model, 19)
    assert {k: v.shape for k, v in padded.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    padded.load_state_dict(plain.state_dict())  # strict: a checkpoint of either loads into the other
    head_channels = []
    padded.segmentation_head[0].register_forward_hook(lambda module, args, out: head_channels.append(out.shape[1]))
    torch.manual_seed(0)
    images, masks = torch.randn(2, 3, 32, 64), torch.randint(0, 19, (2, 32, 64))
    loss_fn = build_loss(cfg.loss, 19)
    results = []
    for model in (plain, padded):
        model.train()
        torch.manual_seed(1)  # the same dropout mask in the auxiliary head
        logits = model(images)
        loss = loss_fn(logits, masks)
        loss.backward()
        main = logits[0] if aux_head else logits
        results.append((main.detach(), loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
        model.eval()
        assert model(images).shape == (2, 19, 32, 64)  # evaluation, predict and export see 19 classes
    assert head_channels[0] == padded_to  # the conv really computed the padded channels
    (plain_logits, plain_loss, plain_grads), (padded_logits, padded_loss, padded_grads) = results
    assert padded_logits.shape[1] == 19 and torch.equal(padded_logits, plain_logits)
    assert torch.equal(padded_loss, plain_loss)
    assert all(torch.equal(padded_grads[name], grad) for name, grad in plain_grads.items())


def test_padding_below_the_class_count_is_one_line():
    cfg = load_config("configs/demo.yaml", ["model.pad_classes_to=16"])
    with pytest.raises(ModelError, match=r"^model.pad_classes_to: 16 is fewer than the 19 classes"):
        build_model(cfg.model, 19)
