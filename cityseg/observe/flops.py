"""The device a run uses, model FLOPs per training image (counted once) and dense peak FLOP/s of common GPUs."""
from __future__ import annotations

import copy
import platform

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) tensor-core peaks per GPU, TFLOP/s, from NVIDIA's datasheets. "tf32" is what an fp32 run
# gets on these GPUs (cuDNN convolutions use TF32 by default; matmuls with set_float32_matmul_precision("high")).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7, "tf32": 15.7},
}


def device_name(device: torch.device) -> str:
    """The device as a run records it: the CUDA device's name, or the CPU's type ('cpu (x86_64)')."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def gpu_model(device_name: str) -> str | None:
    """The PEAK_TFLOPS row of a CUDA device name ('NVIDIA H100 80GB HBM3' -> 'H100 SXM'), None if unknown."""
    name = device_name.upper()
    if "H200" in name or "GH200" in name:
        return "H200"
    if "H100" in name:
        if "PCIE" in name:
            return "H100 PCIe"
        return "H100 NVL" if "NVL" in name else "H100 SXM"  # SXM parts report 'H100 80GB HBM3' / 'H100 SXM5'
    tokens = set(name.replace("-", " ").split())
    return next((row for row in ("A100", "L40S", "L4", "A10", "V100") if row in tokens), None)


def precision_key(mixed_precision: str) -> str:
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def peak_flops(device: torch.device, mixed_precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device at this precision, what it is) — (None, why) on CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None, "no MFU on CPU"
    name = torch.cuda.get_device_name(device)
    row = gpu_model(name)
    key = precision_key(mixed_precision)
    if row is None or key not in PEAK_TFLOPS[row]:
        return None, f"no peak FLOP/s listed for {name} ({key}) in cityseg/observe/flops.py"
    return PEAK_TFLOPS[row][key] * 1e12, f"{row} {key} {PEAK_TFLOPS[row][key]:g} TFLOP/s"


def train_flops_per_image(model: torch.nn.Module, image_size: list[int]) -> float:
    """FLOPs of one training image (forward + backward), counted on a meta-device copy: no memory, no data."""
    meta = copy.deepcopy(model).to("meta").train()
    height, width = image_size
    images = torch.zeros(2, 3, height, width, device="meta")  # 2: BatchNorm needs more than one value
    with FlopCounterMode(display=False) as counter:
        outputs = meta(images)  # (main, aux) with model.aux_head
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        sum(out.float().sum() for out in outputs).backward()  # the loss is a rounding error next to the network
    return counter.get_total_flops() / 2
