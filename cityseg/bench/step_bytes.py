"""Bytes and ops one training step moves, counted with fake tensors under CUDA autocast's rules (no GPU, no data)."""
from __future__ import annotations

import copy
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cityseg.distributed.runtime import make_accelerator
from cityseg.labels import num_classes
from cityseg.train.setup import build_training
from cityseg.train.step import StepStats, train_step

HBM_TB_PER_S = 2.5  # H100 SXM HBM3 at a bandwidth kernels reach in practice (3.35 TB/s peak)
PHASES = ("model_forward", "loss_forward", "loss_backward", "model_backward", "optimizer", "ema")
# ops that allocate or re-describe memory without moving data (views are found by their schema)
NO_DATA_OPS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
               torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
               torch.ops.aten.new_empty_strided.default, torch.ops.aten.lift_fresh.default,
               torch.ops.aten._unsafe_view.default}  # _unsafe_view: an alias autograd may not track
# ops that read (gather) or update in place (the rest) only the elements an index points at, not a whole tensor
GATHER = torch.ops.aten.gather
SCATTER_IN_PLACE = {torch.ops.aten.scatter_add_, torch.ops.aten.index_add_}
COMPILED_NOTE = ("compiled: not counted on CPU. Inductor's CPU graph is not the CUDA one (C++ kernels, oneDNN "
                 "convolutions, CPU autocast), and the CUDA graph cannot be built without a GPU; the GPU proof "
                 "measures the compiled step.")


def moved_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements a kernel touches: a broadcast (stride 0) dimension is read once."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


def op_bytes(func, args, kwargs, out) -> int:
    """Bytes an op reads and writes: every input and output once (an in-place op's self twice: read, written),
    an `out=` tensor once (it is also the return), and only the indexed elements of gather's source or of an
    in-place scatter's destination."""
    packet, args = func.overloadpacket, list(args)
    if packet is GATHER:  # gather(source, dim, index): the source is read where the index points
        return out.numel() * args[0].element_size() + moved_bytes(args[2]) + moved_bytes(out)
    if packet in SCATTER_IN_PLACE:  # (self, dim, index, src): src's elements land on as many of self's
        index, src = args[2], args[3]
        return moved_bytes(index) + moved_bytes(src) + 2 * src.numel() * args[0].element_size()
    outputs = () if func._overloadname.startswith("out") else out
    tensors = [t for t in tree_flatten((args, kwargs, outputs))[0] if isinstance(t, torch.Tensor)]
    return sum(moved_bytes(t) for t in tensors)


class ByteCounter(TorchDispatchMode):
    """Sums bytes read + written per ATen op and phase; views and allocations move nothing and are skipped.
    The phase is the hooks' (forward, loss, optimizer) or, while autograd runs a node, the backward's."""

    def __init__(self):
        super().__init__()
        self.phase = "optimizer"
        self.logits_grad_seen = False
        self.by_op = defaultdict(lambda: [0, 0])  # (phase, op) -> [bytes, launches]
        self.forward_ops = []  # (op, dtype of its first output) of the forward, for the autocast check

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in NO_DATA_OPS or func.namespace != "aten":
            return out
        if torch._C._current_autograd_node() is not None:
            phase = "model_backward" if self.logits_grad_seen else "loss_backward"
        else:
            phase = self.phase
        entry = self.by_op[(phase, str(func.overloadpacket.__name__))]
        entry[0] += op_bytes(func, args, kwargs or {}, out)
        entry[1] += 1
        if phase in ("model_forward", "loss_forward"):
            first = next((t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)), None)
            self.forward_ops.append((str(func), None if first is None else first.dtype))
        return out


class CudaAutocastRules(TorchFunctionMode):
    """CUDA autocast's rules where CPU autocast's differ for the ops these models use: CUDA runs every
    interpolation in float32 (upsample_* are on its fp32 list; CPU keeps the activations' dtype) and leaves cat to
    its kernel's type promotion (CPU casts each input first). The forward is checked op for op against fake CUDA
    tensors (cuda_forward_check)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        if func is F.interpolate and args[0].dtype != torch.float64:
            with torch.autocast("cpu", enabled=False):
                return func(args[0].float(), *args[1:], **kwargs)
        if func is torch.cat:  # CUDA's cat promotes inside its kernel; CPU autocast casts each input first
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def watch_phases(counter: ByteCounter, model: torch.nn.Module, loss_fn: torch.nn.Module) -> list:
    """Hooks that move the counter's phase: the model's forward, then the loss's; backward runs the loss's nodes
    until the logits' gradient exists, then the model's."""
    def model_starts(module, args):
        counter.phase = "model_forward"

    def model_ends(module, args, output):
        counter.phase = "loss_forward"
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(logits_grad)

    def logits_grad(grad):
        counter.logits_grad_seen = True

    def loss_ends(module, args, output):
        counter.phase = "optimizer"  # the step's counters, then (after backward) gradient norm and update

    return [model.register_forward_pre_hook(model_starts), model.register_forward_hook(model_ends),
            loss_fn.register_forward_hook(loss_ends)]


def fresh_accelerator(cfg):
    """The count's own accelerator: accelerate keeps one precision per process, so its state is reset around it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return make_accelerator(cfg)


def counted_config(cfg, batch: int | None):
    """The step as configured, eager, on the CPU; fp16 is counted as bf16 (both 2 bytes, the same autocast
    lists; accelerate refuses fp16 without CUDA), GradScaler's scale and unscale not included."""
    cfg = copy.deepcopy(cfg)
    cfg.train.compile, cfg.train.grad_accum = False, 1
    if batch:
        cfg.data.batch_size = batch
    if cfg.train.mixed_precision == "fp16":
        cfg.train.mixed_precision = "bf16"
    return cfg


def fake_batch(cfg, fake: FakeTensorMode, device: str = "cpu"):
    """A batch as train_step takes it: float images (channels_last when configured) and long masks."""
    height, width = cfg.data.crop_size or cfg.data.image_size
    with fake:
        images = torch.empty(cfg.data.batch_size, 3, height, width, device=device)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        masks = torch.zeros(cfg.data.batch_size, height, width, dtype=torch.long, device=device)
    return images, masks


def count_training_step(cfg, batch: int | None = None) -> dict:
    """Bytes and ops of one optimizer step of build_training's parts run by train_step (and the EMA update),
    on fake tensors: nothing is computed, any size counts in seconds."""
    cfg = counted_config(cfg, batch)
    accelerator = fresh_accelerator(cfg)
    try:
        training = build_training(cfg, accelerator, num_classes(cfg.data.label_scheme))
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:
            training.model.to("cpu")  # every parameter and buffer becomes a fake tensor of the same layout
            if training.ema is not None:
                training.ema.module.to("cpu")
        images, masks = fake_batch(cfg, fake)
        training.model.train()
        with fake, CudaAutocastRules():
            stats = StepStats(torch.device("cpu"))
            step = lambda index: train_step(
                accelerator, training.model, training.optimizer, training.loss_fn, images, masks,
                training.schedule.lr(index), cfg.optim.grad_clip, stats, index)
            step(0)  # the first step also creates the optimizer's state: the count is of a steady step
            counter = ByteCounter()
            hooks = watch_phases(counter, training.model, training.loss_fn)
            with counter:
                step(1)
                if training.ema is not None:
                    counter.phase = "ema"
                    training.ema.update(2)
        for hook in hooks:
            hook.remove()
        checked = cuda_forward_check(cfg, training, counter.forward_ops)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return summary(cfg, counter, checked)


@contextmanager
def cuda_autocast(dtype):
    """torch.autocast("cuda") refuses to turn on without a GPU; fake CUDA tensors need only the dispatch state."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", False)


def cuda_forward_check(cfg, training, cpu_ops: list) -> dict:
    """The forward (model and loss) again on fake CUDA tensors under real CUDA autocast; the count's ops must be
    the same ops with the same output dtypes. (Autograd cannot run backward on CUDA tensors without a GPU, so the
    step itself is counted on CPU tensors; backward dtypes follow the forward's.)"""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        training.model.to("cuda")
        training.loss_fn.to("cuda")
    images, masks = fake_batch(cfg, fake, "cuda")
    counter = ByteCounter()
    hooks = watch_phases(counter, training.model, training.loss_fn)
    dtype = torch.bfloat16 if cfg.train.mixed_precision != "no" else None
    try:
        with fake, counter, (cuda_autocast(dtype) if dtype else nullcontext()):
            training.loss_fn(training.model(images), masks)
    finally:
        for hook in hooks:
            hook.remove()
    cuda_ops = counter.forward_ops
    agree = sum(a == b for a, b in zip(cpu_ops, cuda_ops))
    first = next((f"{a} vs CUDA {b}" for a, b in zip(cpu_ops, cuda_ops) if a != b), None)
    return {"ops": len(cuda_ops), "agree": agree if len(cpu_ops) == len(cuda_ops) else 0, "first_difference": first}


def summary(cfg, counter: ByteCounter, checked: dict) -> dict:
    """GB per phase and in all, launches, the top ops by bytes."""
    by_phase = {phase: 0 for phase in PHASES}
    ops_per_phase = {phase: 0 for phase in PHASES}
    by_op = defaultdict(lambda: [0, 0])
    for (phase, op), (moved, launches) in counter.by_op.items():
        by_phase[phase] += moved
        ops_per_phase[phase] += launches
        by_op[op][0] += moved
        by_op[op][1] += launches
    total = sum(by_phase.values())
    top = sorted(by_op.items(), key=lambda item: -item[1][0])[:10]
    height, width = cfg.data.crop_size or cfg.data.image_size
    return {"model": f"{cfg.model.arch}/{cfg.model.encoder}", "loss": cfg.loss.name,
            "batch": cfg.data.batch_size, "image_size": [height, width],
            "mixed_precision": cfg.train.mixed_precision, "channels_last": bool(cfg.train.channels_last),
            "ema": cfg.train.ema_decay is not None, "gb_per_step": total / 1e9,
            "gb_by_phase": {phase: moved / 1e9 for phase, moved in by_phase.items()},
            "ops_per_step": sum(ops_per_phase.values()), "ops_by_phase": ops_per_phase,
            "top_ops": [{"op": op, "gb": moved / 1e9, "launches": launches} for op, (moved, launches) in top],
            "cuda_autocast_check": checked, "compiled": COMPILED_NOTE}


def ceiling(report: dict, tb_per_s: float = HBM_TB_PER_S) -> dict:
    """Images per second if the step did nothing but move its bytes at tb_per_s."""
    seconds = report["gb_per_step"] / (tb_per_s * 1e3)
    return {"tb_per_s": tb_per_s, "step_ms": seconds * 1e3, "img_s": report["batch"] / seconds}
