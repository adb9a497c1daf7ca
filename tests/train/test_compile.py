"""train.compile compiles the loss as well as the model, and the Dice, CE and Dice+CE losses each trace to one graph
with no break (the whole loss fuses). Tracing only: inductor's C++ build of even the loss takes minutes on CPU."""
import pytest
import torch
from torch._dynamo.eval_frame import OptimizedModule

from cityseg.config.load import load_config
from cityseg.config.schema import LossConfig
from cityseg.distributed.runtime import make_accelerator
from cityseg.train.losses import DiceCELoss, build_loss
from cityseg.train.setup import build_training, setup
from tests.helpers.runs import tiny_overrides


@pytest.mark.parametrize("compiled", [True, False])
def test_train_compile_wraps_model_and_loss(synth_root, tmp_path, compiled):
    cfg = load_config("configs/demo.yaml", tiny_overrides(synth_root, tmp_path / "run",
                                                          train__compile=str(compiled).lower()))
    run = setup(cfg)
    assert isinstance(run.model, OptimizedModule) is compiled
    assert isinstance(run.loss_fn, OptimizedModule) is compiled
    loss = run.loss_fn._orig_mod if compiled else run.loss_fn
    assert isinstance(loss.loss, DiceCELoss)  # the demo's loss.name: dice+ce, inside OutputLoss


@pytest.mark.parametrize("written, cudagraphs, autotune", [("true", False, False), ("reduce-overhead", True, False),
                                                           ("max-autotune-no-cudagraphs", False, True)])
def test_train_compile_mode_reaches_torch_compile(written, cudagraphs, autotune):
    """build_training hands train.compile's mode to torch.compile, for the model and the loss alike (what inductor
    will do with it is the GPU proof's business: reduce-overhead captures CUDA graphs, max-autotune tunes)."""
    cfg = load_config("configs/demo.yaml", [f"train.compile={written}"])
    training = build_training(cfg, make_accelerator(cfg), 19)
    for part in (training.model, training.loss_fn):
        inductor = part.get_compiler_config()  # the inductor options torch.compile derived from the mode
        assert (inductor["triton.cudagraphs"], inductor["max_autotune"]) == (cudagraphs, autotune), written


@pytest.mark.parametrize("name", ["dice", "ce", "dice+ce", "weighted_ce"])
def test_loss_traces_to_one_graph(name):
    torch._dynamo.reset()
    logits = torch.randn(2, 19, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 19, (2, 8, 16), dtype=torch.uint8)
    target[0, :2] = 255
    explained = torch._dynamo.explain(build_loss(LossConfig(name=name), 19))(logits, target)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
