"""Run under `accelerate launch` (2 CPU ranks): is DDP's no_sync / sync still in force after an evaluation's unwrap
of a compiled model? Prints one JSON line per rank with the micro-step gradient gaps between ranks."""
import json
import sys

import torch
import torch.distributed as dist

from cityseg.config.schema import Config
from cityseg.distributed.runtime import make_accelerator
from cityseg.model.build import unwrap_for_eval


def rank_gap(accelerator, model) -> float:
    """Largest difference between this rank's gradients and rank 0's (0 when DDP averaged them)."""
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(grads) for _ in range(accelerator.num_processes)]
    dist.all_gather(gathered, grads)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def main() -> None:
    cfg = Config()
    cfg.train.grad_accum = 2
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model = torch.compile(model, backend="eager")  # as engine.setup does with train.compile (eager: no C++ build)
    bare = unwrap_for_eval(accelerator, model)  # what validate does after an evaluation
    with torch.no_grad():
        bare.eval()(torch.zeros(1, 3, 8, 8))
    model.train()
    generator = torch.Generator().manual_seed(accelerator.process_index + 1)  # each rank its own data
    gaps = []
    for _ in range(2):  # one accumulation window: a no_sync micro-step, then the synchronizing one
        with accelerator.accumulate(model):
            loss = model(torch.randn(2, 3, 8, 8, generator=generator)).square().mean()
            accelerator.backward(loss)
            gaps.append(rank_gap(accelerator, model))
            optimizer.step()
            optimizer.zero_grad()
    print(json.dumps({"rank": accelerator.process_index, "no_sync_gap": gaps[0], "sync_gap": gaps[1],
                      "ddp_kept": type(model._orig_mod).__name__}), flush=True)
    accelerator.end_training()
    sys.exit(0)


if __name__ == "__main__":
    main()
