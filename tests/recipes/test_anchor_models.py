"""The recipes build their anchors' networks: parameter counts against mmsegmentation's, written out layer by layer
from its model definitions (no mmseg here), output stride 8 and the auxiliary head of DeepLabV3+ R50-D8."""
import pytest
import torch

from cityseg.config.load import load_config
from cityseg.model.build import build_model
from cityseg.model.heads import WithAuxHead
from tests.helpers.process import REPO


def conv(cin: int, cout: int, k: int, bias: bool = False, groups: int = 1) -> int:
    return cin // groups * cout * k * k + (cout if bias else 0)


def conv_module(cin: int, cout: int, k: int) -> int:
    """mmcv ConvModule with a BatchNorm: a conv without bias (the norm has one), BN weight + bias."""
    return conv(cin, cout, k) + 2 * cout


def separable_module(cin: int, cout: int, k: int) -> int:
    """mmcv DepthwiseSeparableConvModule: depthwise ConvModule then pointwise ConvModule, each with its BN."""
    return conv(cin, cin, k, groups=cin) + 2 * cin + conv_module(cin, cout, 1)


def resnet_v1c_50() -> int:
    """mmseg ResNetV1c depth 50: deep stem (3x3 convs 3->32->32->64), bottlenecks (3, 4, 6, 3), no fc. Dilation
    and stride (D8) change no count."""
    total, cin = conv_module(3, 32, 3) + conv_module(32, 32, 3) + conv_module(32, 64, 3), 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for block in range(blocks):
            total += conv_module(cin, planes, 1) + conv_module(planes, planes, 3) + conv_module(planes, 4 * planes, 1)
            if block == 0:
                total += conv_module(cin, 4 * planes, 1)  # the downsample shortcut
            cin = 4 * planes
    return total


def depthwise_separable_aspp_head(cin=2048, channels=512, dilations=(1, 12, 24, 36), c1_in=256, c1_channels=48,
                                  classes=19) -> int:
    """mmseg DepthwiseSeparableASPPHead: image pool 1x1, ASPP (1x1 for dilation 1, separable 3x3 otherwise), a 3x3
    bottleneck over the 5 branches, c1 1x1 bottleneck, two separable 3x3 convs, conv_seg 1x1 with bias."""
    aspp = sum(conv_module(cin, channels, 1) if d == 1 else separable_module(cin, channels, 3) for d in dilations)
    return (conv_module(cin, channels, 1) + aspp + conv_module((len(dilations) + 1) * channels, channels, 3)
            + conv_module(c1_in, c1_channels, 1) + separable_module(channels + c1_channels, channels, 3)
            + separable_module(channels, channels, 3) + conv(channels, classes, 1, bias=True))


def fcn_aux_head(cin=1024, channels=256, classes=19) -> int:
    """mmseg FCNHead(num_convs=1, concat_input=False): one 3x3 ConvModule, conv_seg 1x1 with bias."""
    return conv_module(cin, channels, 3) + conv(channels, classes, 1, bias=True)


def mit_b0(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), patches=(7, 3, 3, 3)) -> int:
    """mmseg MixVisionTransformer (embed 32, heads [1, 2, 5, 8], mlp ratio 4): per stage an overlapping patch
    embedding (conv with bias + LayerNorm), blocks of LN, efficient attention (q, k, v, out projections with bias;
    spatial reduction conv + LN where sr > 1), LN, Mix-FFN (1x1, depthwise 3x3, 1x1, all with bias), a stage LN."""
    def layer_norm(c):
        return 2 * c

    total, cin = 0, 3
    for dim, depth, sr, patch in zip(dims, depths, sr_ratios, patches):
        total += conv(cin, dim, patch, bias=True) + layer_norm(dim)
        attention = 4 * (dim * dim + dim) + (conv(dim, dim, sr, bias=True) + layer_norm(dim) if sr > 1 else 0)
        hidden = 4 * dim
        ffn = conv(dim, hidden, 1, bias=True) + conv(hidden, hidden, 3, bias=True, groups=hidden) + conv(
            hidden, dim, 1, bias=True)
        total += depth * (2 * layer_norm(dim) + attention + ffn) + layer_norm(dim)
        cin = dim
    return total


def segformer_head(dims=(32, 64, 160, 256), channels=256, classes=19) -> int:
    """mmseg SegformerHead: a 1x1 ConvModule per stage, a 1x1 fusion ConvModule, conv_seg 1x1 with bias."""
    return (sum(conv_module(d, channels, 1) for d in dims) + conv_module(len(dims) * channels, channels, 1)
            + conv(channels, classes, 1, bias=True))


MMSEG_PARAMS = {  # the Unet recipe has no anchor model of its own (docs/recipes.md): nothing to count against
    "deeplabv3plus_r50_512x1024_80k.yaml": resnet_v1c_50() + depthwise_separable_aspp_head() + fcn_aux_head(),
    "segformer_b0_1024x1024_160k.yaml": mit_b0() + segformer_head(),
}


def recipe_model(recipe: str) -> torch.nn.Module:
    cfg = load_config(REPO / "configs" / recipe, ["model.encoder_weights=null"])
    return build_model(cfg.model, 19)


def test_reference_counts_are_mmsegmentations_published_sizes():
    """The formulas against the sizes known for these models: ResNet-50 is torchvision's 25,557,032 less its fc
    (2,049,000) and 7x7 stem (9,536), plus the deep stem; mmseg lists DeepLabV3+ R50-D8 at 43.58 M and MiT-B0 at
    3.3 M (+ the 0.4 M head)."""
    assert resnet_v1c_50() == 25_557_032 - 2_049_000 - 9_536 + 28_768
    assert MMSEG_PARAMS["deeplabv3plus_r50_512x1024_80k.yaml"] == 43_589_878
    assert MMSEG_PARAMS["segformer_b0_1024x1024_160k.yaml"] == 3_720_051


@pytest.mark.parametrize("recipe", sorted(MMSEG_PARAMS))
def test_parameter_count_within_one_percent_of_mmsegmentation(recipe):
    model = recipe_model(recipe)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - MMSEG_PARAMS[recipe]) / MMSEG_PARAMS[recipe] < 0.01, (recipe, count, MMSEG_PARAMS[recipe])


@pytest.mark.slow  # seconds of CPU in this process
def test_deeplabv3plus_backbone_is_resnet_v1c_at_output_stride_8_with_an_aux_head():
    model = recipe_model("deeplabv3plus_r50_512x1024_80k.yaml")
    assert sum(p.numel() for p in model.encoder.parameters()) == resnet_v1c_50()  # the deep stem, exactly
    assert isinstance(model, WithAuxHead) and sum(p.numel() for p in model.aux_head.parameters()) == fcn_aux_head()
    images = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        features = model.encoder(images)
        assert features[-1].shape[-2:] == (8, 16) and features[-2].shape[1] == 1024  # D8: stride 8, not 32
        model.train()
        main, aux = model(images)
        assert main.shape == aux.shape == (2, 19, 64, 128)
        model.eval()
        assert model(images).shape == (2, 19, 64, 128)  # evaluation / inference get the main logits only
    names = [name for name, _ in model.named_parameters()]  # smp's keys kept: weights files, LR groups
    assert names[0].startswith("encoder.") and any(n.startswith("aux_head.") for n in names)
