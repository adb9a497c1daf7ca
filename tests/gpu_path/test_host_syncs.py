"""The step never reads the device on the host, checked on CPU: train_step and its parts run on fake tensors
(shapes, dtypes and devices, no data), where .item() / bool() / .tolist() raise; and a spy counts the host reads of
real training steps between two log reads."""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode

from cityseg.config import Config
from cityseg.losses import build_loss
from cityseg.model import build_model
from cityseg.optim import build_optimizer
from cityseg.runtime import make_accelerator
from cityseg.step import StepStats, gradient_norm, masked_update, train_step


def fake_training(device: str, loss_name: str = "dice"):
    """Model (the seed's Unet), fused AdamW, loss, counters and a batch made under a FakeTensorMode on device."""
    cfg = Config()
    mode = FakeTensorMode()
    with mode, torch.device(device):
        model = build_model(cfg.model, 19)
        optimizer = build_optimizer(model, cfg.optim)  # fused: a NaN step is skipped by a device-side found_inf
        stats = StepStats(torch.device(device))
        images = torch.randn(2, 3, 64, 64)
        masks = torch.randint(0, 19, (2, 64, 64), dtype=torch.uint8)
        masks[:, :4] = 255
        loss_fn = build_loss(loss_name, 19)
    return mode, model, optimizer, stats, loss_fn, images, masks


def assert_updated_on(device: str, model, optimizer, stats) -> None:
    """The step ran to its end: every parameter has optimizer state, the counters moved, all fake on device."""
    assert len(optimizer.state) == len(list(model.parameters()))
    for state in optimizer.state.values():
        assert all(isinstance(v, FakeTensor) and v.device.type == device for v in state.values()), state
    assert isinstance(stats.totals, FakeTensor) and stats.totals.device.type == device


@pytest.mark.parametrize("grad_accum,grad_clip", [(1, None), (2, 1.0)])
def test_train_step_on_fake_tensors_reads_nothing_back(grad_accum, grad_clip):
    """The whole train_step through a real (CPU) Accelerator: forward, loss, counters, backward, the gradient norm,
    the masked fused update. A host read of any of them raises DataDependentOutputException here."""
    cfg = Config()
    cfg.train.grad_accum = grad_accum
    accelerator = make_accelerator(cfg)
    mode, model, optimizer, stats, loss_fn, images, masks = fake_training("cpu")
    with mode:
        for step in range(2 * grad_accum):
            train_step(accelerator, model, optimizer, loss_fn, images, masks, 1e-3, grad_clip, stats, step)
    assert_updated_on("cpu", model, optimizer, stats)


def test_step_parts_on_fake_cuda_tensors_read_nothing_back():
    """The same parts with the parameters, batch and counters faked as CUDA tensors (the fused CUDA AdamW, CUDA
    meta kernels). Autograd cannot run backward for a CUDA device on a machine without one: the gradients are
    made, not computed; train_step's own order of calls is covered on CPU above."""
    accelerator = make_accelerator(Config())
    mode, model, optimizer, stats, loss_fn, images, masks = fake_training("cuda")
    with mode:
        for step in range(2):
            loss = loss_fn(model(images), masks)
            assert loss.device.type == "cuda" and loss.dtype == torch.float32
            stats.add_micro_batch(loss.detach())
            for param in model.parameters():
                param.grad = torch.randn_like(param)
            nonfinite = stats.agree_window(accelerator)
            norm = gradient_norm(accelerator, model, 1.0 if step else None)
            skip = nonfinite | ~torch.isfinite(norm)
            masked_update(accelerator, optimizer, skip)
            stats.end_step(skip, torch.zeros_like(skip), norm, step)
    assert_updated_on("cuda", model, optimizer, stats)


def test_a_host_read_on_a_fake_tensor_raises():
    """What the two tests above rely on."""
    with FakeTensorMode(), torch.device("cuda"):
        loss = torch.randn(())
        for read in (loss.item, loss.tolist, lambda: bool(torch.isfinite(loss)), lambda: float(loss)):
            with pytest.raises(DataDependentOutputException):
                read()
