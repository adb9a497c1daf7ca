"""The step never reads the device on the host, checked on CPU: train_step and its parts run on fake tensors
(shapes, dtypes and devices, no data), where .item() / bool() / .tolist() raise; and a spy counts the host reads of
real training steps between two log reads."""
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensor,
    FakeTensorMode,
)

from cityseg.cli import main as cityseg_main
from cityseg.config.schema import Config
from cityseg.distributed.runtime import make_accelerator
from cityseg.model.build import build_model
from cityseg.train import loop as engine
from cityseg.train.losses import build_loss
from cityseg.train.optim import build_optimizer
from cityseg.train.step import StepStats, gradient_norm, masked_update, train_step
from tests.helpers.runs import tiny_overrides


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


@pytest.mark.parametrize("precision,grad_accum,grad_clip,loss_name", [("no", 1, None, "dice"),
                                                                   ("bf16", 2, 1.0, "dice"),
                                                                   ("bf16", 1, None, "ohem_ce")])
def test_train_step_on_fake_tensors_reads_nothing_back(precision, grad_accum, grad_clip, loss_name):
    """The whole train_step through a real (CPU) Accelerator: forward (bf16 autocast: bf16 logits reach the loss),
    loss, counters, backward, the gradient norm, the masked fused update. A host read of any of them raises
    DataDependentOutputException here."""
    cfg = Config()
    cfg.train.mixed_precision, cfg.train.grad_accum = precision, grad_accum
    accelerator = make_accelerator(cfg)
    mode, model, optimizer, stats, loss_fn, images, masks = fake_training("cpu", loss_name)
    seen = []

    def recorded_loss(logits, target):  # the real loss; records what the step hands it
        seen.append((logits.dtype, target.dtype))
        return loss_fn(logits, target)

    with mode:
        for step in range(2 * grad_accum):
            train_step(accelerator, model, optimizer, recorded_loss, images, masks, 1e-3, grad_clip, stats, step)
    assert_updated_on("cpu", model, optimizer, stats)
    logits_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen == [(logits_dtype, torch.uint8)] * (2 * grad_accum)  # no fp32 / int64 copies made by the step


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


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")


@pytest.mark.slow  # seconds of CPU in this process
def test_spy_steady_state_loop_steps_make_no_host_read(synth_root, tmp_path, monkeypatch):
    """A real training run in this process (2 epochs of 4 steps, no log window inside an epoch) with every
    Tensor host read counted: between two steps that no counter read, no evaluation and no save separate, the
    loop body (next batch, step, speed, stop vote, step record) reads nothing. Where it does, the test names the
    line."""
    events = []  # ("step",) at each train_step, ("read",) at each counter read, ("host", name, where) per read

    def spy(name, original):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1)
            events.append(("host", name, f"{caller.f_code.co_filename}:{caller.f_lineno}"))
            return original(self, *args, **kwargs)
        return counted

    def marking(kind, original):
        def marked(*args, **kwargs):
            events.append((kind,))
            return original(*args, **kwargs)
        return marked

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(engine, "train_step", marking("step", engine.train_step))
    for boundary in ("read_step_stats", "validate", "save"):  # each reads on purpose
        monkeypatch.setattr(engine, boundary, marking("read", getattr(engine, boundary)))
    out = tmp_path / "run"
    code = cityseg_main(["train", "--config", "configs/demo.yaml",
                         *tiny_overrides(synth_root, out, train__epochs=2, train__log_every=100,
                                         data__num_workers=1)])
    monkeypatch.undo()
    assert code == 0
    steps = [i for i, event in enumerate(events) if event == ("step",)]
    assert len(steps) == 8, len(steps)
    steady = [events[start + 1:end] for start, end in zip(steps, steps[1:]) if ("read",) not in events[start:end]]
    assert len(steady) == 6, len(steady)  # 4 steps an epoch; the epoch end and the run end read
    reads = [event[1:] for window in steady for event in window if event[0] == "host"]
    assert reads == [], reads
    assert any(event[0] == "host" for event in events)  # the spy sees the reads the log windows make
