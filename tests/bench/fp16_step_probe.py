"""fp16 + GradScaler through train_step on the CPU: steps 0 and 1 overflow under a huge loss scale (finite loss,
infinite scaled gradients: the scaler's skips), step 3 has a NaN loss (the NaN skip), steps 2 and 4 train. Prints
one JSON line: did each step change the weights, the loss scale before each, and what StepStats counted.

accelerate gives a CPU run neither a GradScaler nor fp16 autocast (accelerator.py: `mixed_precision == "fp16" and
device.type != "cpu"`), which is why `cityseg train` refuses fp16 on the CPU. Here the two pieces accelerate would
make on a GPU are set up on the CPU instead: torch.amp.GradScaler("cpu") and native autocast (torch.autocast runs
float16 on the CPU); everything else (backward, unscale, the fused AdamW step that takes found_inf, the scaler's
update) is accelerate's and torch's own code."""
import json

import torch
from accelerate import Accelerator

from cityseg.config.schema import Config
from cityseg.train.optim import build_optimizer
from cityseg.train.step import StepStats, train_step
from tests.bench.nan_step_probe import PoisonedLoss


def main() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert accelerator.scaler is None and not accelerator.native_amp  # what accelerate does on a CPU
    # 2**60 and then 2**35: the scaled backward overflows fp16; after two overflows the scale is 2**10, which trains
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2.0**-25, growth_interval=1000)
    accelerator.native_amp = True
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1))
    model, optimizer = accelerator.prepare(model, build_optimizer(model, Config().optim))
    stats, changed, scales, dtypes = StepStats(accelerator.device), [], [], set()
    model[0].register_forward_hook(lambda module, args, out: dtypes.add(str(out.dtype)))  # inside autocast
    loss_fn, generator = PoisonedLoss(), torch.Generator().manual_seed(0)
    for step in range(5):
        images, masks = torch.randn(2, 3, 8, 8, generator=generator), torch.randint(0, 4, (2, 8, 8), generator=generator)
        loss_fn.poison = float("nan") if step == 3 else 0.0
        before = [p.detach().clone() for p in model.parameters()]
        scales.append(accelerator.scaler.get_scale())
        train_step(accelerator, model, optimizer, loss_fn, images, masks, 1e-2, None, stats, step)
        changed.append(any(not torch.equal(a, b) for a, b in zip(before, model.parameters())))
    print(json.dumps({"rank": 0, "changed": changed, "scales": scales, "dtypes": sorted(dtypes), **stats.take()}),
          flush=True)


if __name__ == "__main__":
    main()
