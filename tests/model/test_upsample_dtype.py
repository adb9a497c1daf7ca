"""Unet's decoder upsamples in the activations' dtype (exact: nearest only copies values), where CUDA autocast would
run upsample_nearest2d in fp32; the step then hands the loss the autocast dtype, evaluation still gets fp32."""
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
from torch.utils._python_dispatch import TorchDispatchMode

from cityseg.bench.step_bytes import CudaAutocastRules
from cityseg.config.load import load_config
from cityseg.distributed.runtime import make_accelerator
from cityseg.labels import num_classes
from cityseg.model.heads import SameDtypeUnetDecoderBlock
from cityseg.train.setup import build_training


class UpsampleDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.upsample_nearest2d:
            self.dtypes.append(out.dtype)
        return out


def test_nearest_upsampling_in_bf16_equals_fp32_nearest():
    values = torch.randn(2, 8, 5, 7).to(torch.bfloat16)
    exact = F.interpolate(values.float(), size=(10, 14), mode="nearest")
    assert torch.equal(F.interpolate(values, size=(10, 14), mode="nearest").float(), exact)


def test_decoder_block_gives_the_fp32_upsampling_results_without_an_fp32_upsample():
    torch.manual_seed(0)
    block = UnetDecoderBlock(8, 4, 6).eval()
    feature, skip = torch.randn(2, 8, 4, 6).bfloat16(), torch.randn(2, 4, 8, 12).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastRules():
        reference = block(feature, 8, 12, skip)  # smp's: upsample and cat in fp32, the conv casts back
        block.__class__ = SameDtypeUnetDecoderBlock
        with UpsampleDtypes() as seen:
            same = block(feature, 8, 12, skip)
    assert seen.dtypes == [torch.bfloat16]
    assert same.dtype == reference.dtype and torch.equal(same, reference)


def test_step_model_returns_autocast_logits_in_training_and_fp32_in_evaluation():
    cfg = load_config("configs/seed_unet_mobilenetv3.yaml", ["train.mixed_precision=bf16",
                                                               "data.image_size=[32,64]"])
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    training = build_training(cfg, accelerator, num_classes(cfg.data.label_scheme))
    images, masks = torch.randn(2, 3, 32, 64), torch.randint(0, 19, (2, 32, 64))
    assert all(type(block) is SameDtypeUnetDecoderBlock for block in training.model.decoder.blocks)
    training.model.train()
    with accelerator.autocast():
        logits = training.model(images)
        assert logits.dtype == torch.bfloat16
        assert torch.equal(training.loss_fn(logits, masks), training.loss_fn(logits.float(), masks))
    training.model.eval()
    with torch.no_grad():
        assert training.model(images).dtype == torch.float32
