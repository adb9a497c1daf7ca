"""The `cityseg` command: train, evaluate, synth, prepare, bench — argument parsing and one-line errors, nothing more."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from cityseg.checkpoint import CheckpointError, export
from cityseg.config import ConfigError, load_config
from cityseg.data.cityscapes import DataError
from cityseg.engine import TrainingError, evaluate, train
from cityseg.model import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, TrainingError)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cityseg", description="Semantic segmentation on Cityscapes.")
    commands = parser.add_subparsers(dest="command", required=True)
    _config_args(commands.add_parser("train", help="train a model (run under accelerate launch for many GPUs)"))
    evaluate = commands.add_parser("evaluate", help="mIoU / per-class IoU of saved weights")
    _config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="model.safetensors or a checkpoint directory")
    evaluate.add_argument("--split", default=None, help="dataset split (default: data.val_split)")
    evaluate.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    export = commands.add_parser("export", help="model.safetensors + config.yaml from any training checkpoint")
    export.add_argument("--checkpoint", required=True, help="a checkpoint directory, e.g. runs/x/checkpoints/step_00001000")
    export.add_argument("--output", default=None, help="where to write (default: <run>/export/<checkpoint name>)")
    prepare = commands.add_parser("prepare", help="decode the dataset once into the shard cache data.cache.dir")
    _config_args(prepare)
    prepare.add_argument("--splits", default=None, help="comma-separated (default: data.train_split,data.val_split)")
    prepare.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores / ranks)")
    bench = commands.add_parser("bench", help="loader, training-step and precision/process throughput, side by side")
    _config_args(bench)
    bench.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the bench runs")
    bench.add_argument("--images", type=int, default=None, help="images in the loader comparison")
    bench.add_argument("--batch", type=int, default=None, help="batch size of the step measurements")
    bench.add_argument("--repeats", type=int, default=None, help="alternating repeats (the median is reported)")
    synth = commands.add_parser("synth", help="write a synthetic dataset in the Cityscapes layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=24)
    synth.add_argument("--val", type=int, default=7)
    synth.add_argument("--test", type=int, default=0)
    synth.add_argument("--height", type=int, default=256)
    synth.add_argument("--width", type=int, default=512)
    synth.add_argument("--seed", type=int, default=0)
    return parser


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _one_line(err: Exception) -> str:
    """Errors re-raised from DataLoader workers carry the worker's traceback; users need its last line."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(err).__name__


def run_train(args) -> int:
    return train(load_config(args.config, args.overrides))


def run_evaluate(args) -> int:
    from rich.console import Console

    from cityseg.tracking import iou_table

    metrics = evaluate(load_config(args.config, args.overrides), args.checkpoint, args.split)
    if _is_main_rank():
        Console().print(iou_table(metrics, f"{args.checkpoint} on {metrics['split']} ({metrics['images']} images)"))
        if args.json:
            clean = json.loads(json.dumps(metrics, default=float).replace("NaN", "null"))
            Path(args.json).write_text(json.dumps(clean, indent=2))
    return 0


def run_export(args) -> int:
    step_path = Path(args.checkpoint)
    out_dir = Path(args.output) if args.output else step_path.parent.parent / "export" / step_path.name
    target = export(step_path, out_dir)
    print(f"wrote {target} and {out_dir / 'config.yaml'}; evaluate with: cityseg evaluate --config "
          f"{out_dir / 'config.yaml'} --checkpoint {target}")
    return 0


def run_synth(args) -> int:
    from cityseg.data.synthetic import write_synthetic

    counts = write_synthetic(args.out, n_train=args.train, n_val=args.val, height=args.height, width=args.width,
                             seed=args.seed, n_test=args.test)
    print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} images to {args.out}")
    return 0


def run_prepare(args) -> int:
    from cityseg.data.cache import prepare

    cfg = load_config(args.config, args.overrides)
    splits = args.splits.split(",") if args.splits else [cfg.data.train_split, cfg.data.val_split]
    for manifest in prepare(cfg, splits, args.workers):
        print(f"wrote {manifest.parent} ({json.loads(manifest.read_text())['num_samples']} samples)")
    return 0


def run_bench(args) -> int:
    from cityseg.bench import bench

    bench(load_config(args.config, args.overrides), json_path=args.json, quick=args.quick, images=args.images,
          batch=args.batch, repeats=args.repeats)
    return 0


COMMANDS = {"train": run_train, "evaluate": run_evaluate, "export": run_export, "synth": run_synth,
            "prepare": run_prepare, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        prefix = "" if _is_main_rank() else f"[rank {os.environ.get('RANK')}] "
        sys.stderr.write(f"{prefix}error: {_one_line(err)}\n")  # one write: ranks sharing a pipe do not interleave
        return 2 if isinstance(err, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
