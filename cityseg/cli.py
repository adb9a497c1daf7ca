"""The `cityseg` command: train, evaluate, predict, export, check, synth, prepare, bench — argument parsing."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from cityseg.checkpoint import CheckpointError, export
from cityseg.config import ConfigError, load_config
from cityseg.data.cityscapes import DataError
from cityseg.engine import TrainingError, train
from cityseg.evaluate import evaluate
from cityseg.model import ModelError
from cityseg.preemption import EXIT_INTERRUPTED

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
    evaluate.add_argument("--mode", choices=["resized", "full"], default=None,
                          help="resized: at data.image_size (what training reports); full: logits upsampled to the "
                               "labels' resolution (the benchmark protocol). Same as eval.mode=...")
    predict = commands.add_parser("predict", help="write label-id PNGs (benchmark format), colour maps, overlays")
    _config_args(predict)
    predict.add_argument("--checkpoint", required=True, help="model.safetensors or a checkpoint directory")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="a split of data.root (leftImg8bit/<split>/<city>/*_leftImg8bit.png)")
    source.add_argument("--input", help="any folder of PNG / JPEG images (subfolders kept)")
    predict.add_argument("--output", required=True, help="writes labelIds/, color/ and overlay/ trees here")
    exporter = commands.add_parser("export", help="model.safetensors + config.yaml from a checkpoint directory")
    exporter.add_argument("--checkpoint", required=True, help="<output_dir>/checkpoints/step_<N> or .../best")
    exporter.add_argument("--out", default=None, help="directory to write to (default: the checkpoint's run "
                          "directory, i.e. <output_dir>)")
    exporter.add_argument("--force", action="store_true", help="replace an existing model.safetensors")
    check = commands.add_parser("check", help="preflight: would training start with this config? (exit 0 if so)")
    _config_args(check)
    check.add_argument("--deep", action="store_true", help="also decode every image and label")
    check.add_argument("--world-size", type=int, default=None, help="processes the run will have "
                       "(default: WORLD_SIZE, else 1)")
    check.add_argument("--gpu", action="store_true", help="judge for a run on CUDA devices even if this machine "
                       "has none (e.g. checking from a cluster's login node)")
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
    text = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", text)  # C++ source location of gloo / NCCL errors
    return text.splitlines()[0] if text else type(err).__name__


def _is_collective_failure(err: RuntimeError) -> bool:
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or any(word in str(err) for word in ("gloo", "NCCL", "ProcessGroup"))


def run_train(args) -> int:
    return train(load_config(args.config, args.overrides))


def run_evaluate(args) -> int:
    from rich.console import Console

    from cityseg.tracking import benchmark_tables

    overrides = [*args.overrides, f"eval.mode={args.mode}"] if args.mode else args.overrides
    metrics = evaluate(load_config(args.config, overrides), args.checkpoint, args.split)
    if _is_main_rank():
        title = f"{args.checkpoint} on {metrics['split']} ({metrics['images']} images, {metrics['mode']} resolution)"
        console = Console()
        console.print(title, highlight=False, soft_wrap=True)
        for table in benchmark_tables(metrics):
            console.print(table)
        if args.json:
            clean = json.loads(json.dumps(metrics, default=float).replace("NaN", "null"))
            Path(args.json).write_text(json.dumps(clean, indent=2))
    return 0


def run_check(args) -> int:
    from cityseg.preflight import format_checks, run_checks

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"✗ config: {err}")
        return 2
    checks = run_checks(cfg, deep=args.deep, world_size=args.world_size, cuda=True if args.gpu else None)
    print(format_checks(checks))
    return 0 if all(ok for ok, _, _ in checks) else 1


def run_predict(args) -> int:
    from cityseg.predict import predict

    count = predict(load_config(args.config, args.overrides), args.checkpoint, args.output, split=args.split,
                    input_dir=args.input)
    if _is_main_rank():
        print(f"wrote predictions of {count} images to {args.output} (labelIds/, color/, overlay/)")
    return 0


def run_export(args) -> int:
    source = Path(args.checkpoint)
    if not source.is_dir():
        raise CheckpointError(f"{source}: checkpoint directory not found")
    run_dir = source.resolve().parent
    if args.out is None and run_dir.name != "checkpoints":
        raise CheckpointError(f"{source}: not inside <output_dir>/checkpoints/; say where to write with --out")
    out = Path(args.out) if args.out else run_dir.parent
    written = export(source, out, overwrite=args.force)
    print(f"exported {source} -> {written} and {written.with_name('config.yaml')}")
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


COMMANDS = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict, "export": run_export,
            "check": run_check, "synth": run_synth, "prepare": run_prepare, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        prefix = "" if _is_main_rank() else f"[rank {os.environ.get('RANK')}] "
        sys.stderr.write(f"{prefix}error: {_one_line(err)}\n")  # one write: ranks sharing a pipe do not interleave
        return 2 if isinstance(err, ConfigError) else 1
    except RuntimeError as err:
        if not _is_collective_failure(err):
            raise
        sys.stderr.write(f"[rank {os.environ.get('RANK', '0')}] error: a collective failed: another process died or "
                         f"stalled past dist.timeout_minutes ({_one_line(err)}); the launcher's report names the "
                         "rank that failed first\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training installed its handler (startup, evaluation)
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
