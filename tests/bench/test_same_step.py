"""`cityseg bench` and the GPU proof time the step train.py runs: for a config off the defaults, the same optimizer
(class, parameter groups, hyperparameters, fused / foreach flags), the same loss and the same LR schedule."""
import torch

from cityseg.bench.gpu_measure import build_step
from cityseg.bench.throughput import step_parts
from cityseg.config.load import load_config
from cityseg.distributed import run_lock
from cityseg.distributed.runtime import make_accelerator
from cityseg.train.losses import OhemCELoss
from cityseg.train.setup import setup
from tests.helpers.runs import tiny_overrides

OFF_DEFAULTS = ["optim.name=sgd", "optim.lr=0.02", "optim.momentum=0.7", "optim.nesterov=true",
                "optim.weight_decay=0.001", "optim.no_decay_norm_bias=true", "optim.head_lr_mult=5.0",
                "optim.grad_clip=2.0", "loss.name=ohem_ce", "loss.ohem_thresh=0.6", "loss.ohem_min_kept=123",
                "loss.aux_weight=0.25", "train.reference_global_batch=16", "optim.lr_scaling=sqrt"]


def optimizer_description(optimizer, model) -> tuple:
    """The optimizer's class, defaults (fused, foreach, ...) and each group's settings with its parameters' names."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    bare = getattr(model, "_orig_mod", model)
    names = {id(param): name.removeprefix("module.") for name, param in bare.named_parameters()}
    groups = [({key: value for key, value in group.items() if key != "params"}, [names[id(p)] for p in group["params"]])
              for group in inner.param_groups]
    return type(inner), inner.defaults, groups


def loss_description(loss_fn) -> list:
    """Every module of the loss: its class, its plain settings and its tensors (class weights, ...)."""
    loss_fn = getattr(loss_fn, "_orig_mod", loss_fn)
    described = []
    for name, module in loss_fn.named_modules():
        settings = {key: value for key, value in vars(module).items()
                    if not key.startswith("_") and key != "training" and not isinstance(value, torch.nn.Module)}
        tensors = {key: value.tolist() for key, value in module.state_dict().items()}
        described.append((name, type(module), settings, tensors))
    return described


def test_bench_and_proof_build_the_engines_optimizer_loss_and_schedule(synth_root, tmp_path):
    cfg = load_config("configs/demo.yaml", [*tiny_overrides(synth_root, tmp_path / "run"), *OFF_DEFAULTS])
    run = setup(cfg)
    run_lock.release(cfg.output_dir)
    optimizer = optimizer_description(run.optimizer, run.model)
    loss = loss_description(run.loss_fn)
    assert optimizer[0] is torch.optim.SGD and len(optimizer[2]) > 1  # the config really is off the defaults
    assert loss[1][1] is OhemCELoss and loss[1][2]["min_kept"] == 123, loss

    training, bare_model, bare_optimizer = step_parts(cfg, make_accelerator(cfg))  # `cityseg bench`
    assert optimizer_description(training.optimizer, training.model) == optimizer
    assert optimizer_description(bare_optimizer, bare_model) == optimizer  # its bare loop's, on a copy
    assert loss_description(training.loss_fn) == loss
    # the same LR rule; its length is the caller's (the benchmarks feed batches, they have no epochs)
    assert (training.schedule.optim_cfg, training.schedule.scale) == (run.schedule.optim_cfg, run.schedule.scale)
    assert run.schedule.scale == 0.5

    proof = build_step(cfg, batch=2, channels_last=False)  # the GPU proof and its diagnosis
    assert optimizer_description(proof["optimizer"], proof["model"]) == optimizer
    assert loss_description(proof["loss_fn"]) == loss
