"""Run under `accelerate launch` (2 CPU ranks) or alone: train_step on a tiny model where rank 1 (or the only rank)
gets a NaN batch at step 1 (NaN gradients too) and a NaN added to its loss at step 2 (gradients stay finite: only
the loss flag can tell). Prints one JSON line per rank: did each step change the weights / optimizer state?"""
import json
import sys

import torch

from cityseg.config.schema import Config
from cityseg.distributed.runtime import make_accelerator
from cityseg.train.optim import build_optimizer
from cityseg.train.step import StepStats, train_step


def snapshot(model, optimizer) -> list[torch.Tensor]:
    state = [v.clone() for s in optimizer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [p.detach().clone() for p in model.parameters()] + state


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class PoisonedLoss(torch.nn.Module):
    """Cross-entropy plus a constant: NaN makes the loss non-finite while the gradients stay finite."""

    def __init__(self):
        super().__init__()
        self.poison = 0.0

    def forward(self, logits, masks):
        return torch.nn.functional.cross_entropy(logits, masks) + self.poison


def main() -> None:
    cfg = Config()
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1))
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg.optim))
    stats, changed = StepStats(accelerator.device), []
    nan_rank = accelerator.num_processes - 1
    generator = torch.Generator().manual_seed(accelerator.process_index)
    loss_fn = PoisonedLoss()
    for step in range(4):
        images = torch.randn(2, 3, 8, 8, generator=generator)
        masks = torch.randint(0, 4, (2, 8, 8), generator=generator)
        if step == 1 and accelerator.process_index == nan_rank:
            images[0, 0, 0, 0] = float("nan")
        loss_fn.poison = float("nan") if step == 2 and accelerator.process_index == nan_rank else 0.0
        before = snapshot(model, optimizer)
        train_step(accelerator, model, optimizer, loss_fn, images, masks, 1e-2, None, stats, step)
        changed.append(not same(before, snapshot(model, optimizer)))
    taken = stats.take()
    print(json.dumps({"rank": accelerator.process_index, "changed": changed, **taken}), flush=True)
    accelerator.end_training()
    sys.exit(0)


if __name__ == "__main__":
    main()
