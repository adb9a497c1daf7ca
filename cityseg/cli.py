"""The `cityseg` command: train, evaluate, predict, export, check, config, synth, prepare, bench — argument parsing,
dispatch to cityseg/commands.py, one-line errors and exit codes.

Only argparse and the config are imported here: torch, smp, accelerate and W&B load inside the commands that use
them, so `--help` and config errors answer at once."""
from __future__ import annotations

import argparse
import os
import re
import sys

from cityseg import commands
from cityseg.commands import EXIT_USAGE, is_main_rank, report
from cityseg.config.load import load_config
from cityseg.config.schema import ConfigError
from cityseg.data.layout import DataError, check_split_dir


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; options show their default when there is one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and action.option_strings and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def _command(commands, name: str, summary: str, details: str, example: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=f"{summary}.\n\n{details}".rstrip(),
                               epilog=f"example:\n  {example}", formatter_class=HelpFormatter)


def _config_args(parser: argparse.ArgumentParser, example: str, from_run: bool = False) -> None:
    if from_run:
        parser.add_argument("--config", default=None, help="YAML config (default: config.yaml of the run directory "
                            "that holds --checkpoint)")
    else:
        parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted config overrides, e.g. {example}")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser, "train.epochs=2 optim.lr=5e-4")


def build_parser(prog: str = "cityseg") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Semantic segmentation on Cityscapes: train (one process or many via accelerate launch / SLURM), evaluate, "
        "predict.\n`cityseg <command> --help` describes each command."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    add_train_args(_command(
        commands, "train", "train a model (run under accelerate launch for many processes)",
        "Continues the newest checkpoint in output_dir (train.resume=auto) if the config trains the same thing.",
        "cityseg train --config configs/demo.yaml train.epochs=2"))
    _add_evaluate(commands)
    _add_predict(commands)
    exporter = _command(commands, "export", "write model.safetensors + config.yaml from a checkpoint directory",
                        "What evaluate / predict / cityseg.api load; no optimizer state.",
                        "cityseg export --checkpoint runs/demo/checkpoints/best")
    exporter.add_argument("--checkpoint", required=True, help="<output_dir>/checkpoints/step_<N> or .../best")
    exporter.add_argument("--out", default=None, help="directory to write to (default: the checkpoint's run "
                          "directory, i.e. <output_dir>)")
    exporter.add_argument("--force", action="store_true", help="replace an existing model.safetensors")
    check = _command(commands, "check", "preflight: would training start with this config? (exit 0 if so)",
                     "Data layout, batch share, model, disk, the resume verdict, W&B; nothing is written.",
                     "cityseg check --config configs/demo.yaml --world-size 8 --gpu")
    _config_args(check, "data.root=/data/cityscapes")
    check.add_argument("--deep", action="store_true", help="also decode every image and label")
    check.add_argument("--world-size", type=int, default=None, help="processes the run will have "
                       "(default: WORLD_SIZE, else 1)")
    check.add_argument("--gpu", action="store_true", help="judge for a run on CUDA devices even if this machine "
                       "has none (e.g. checking from a cluster's login node)")
    config = _command(commands, "config", "print the resolved config (file + overrides + defaults) as YAML",
                      "Exactly what training would record as config.yaml; exit 2 on a bad key or value.",
                      "cityseg config --config configs/demo.yaml optim.lr=5e-4")
    _config_args(config, "optim.lr=5e-4")
    _add_data_commands(commands)
    return parser


def _add_evaluate(commands) -> None:
    evaluate = _command(commands, "evaluate", "mIoU / per-class IoU of saved weights",
                        "Sharded over the processes of accelerate launch; the same sliding / flip / scales options "
                        "(eval.*) as cityseg.api.", "cityseg evaluate --checkpoint runs/demo/model.safetensors "
                        "--mode full eval.flip=true")
    _config_args(evaluate, "eval.sliding=true eval.flip=true", from_run=True)
    evaluate.add_argument("--checkpoint", required=True, help="model.safetensors or a checkpoint directory")
    evaluate.add_argument("--split", default=None, help="dataset split (default: data.val_split)")
    evaluate.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    evaluate.add_argument("--mode", choices=["resized", "full"], default=None,
                          help="resized: at data.image_size (what training reports); full: logits upsampled to the "
                               "labels' resolution (the benchmark protocol). Same as eval.mode=... "
                               "(default: eval.mode of the config)")
    evaluate.add_argument("--aug-test", action="store_true", help="multi-scale (0.5-1.75) + flip testing as "
                          "mmsegmentation's aug test; eval.scales=[...] eval.flip=true choose other scales")


def _add_predict(commands) -> None:
    predict = _command(commands, "predict", "write label-id PNGs (benchmark format), colour maps, overlays",
                       "Predictions at each image's own resolution, per eval.* (sliding, flip, scales).",
                       "cityseg predict --checkpoint runs/demo/model.safetensors --input photos/ --output preds/")
    _config_args(predict, "eval.flip=true", from_run=True)
    predict.add_argument("--checkpoint", required=True, help="model.safetensors or a checkpoint directory")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="a split of data.root (leftImg8bit/<split>/<city>/*_leftImg8bit.png)")
    source.add_argument("--input", help="one PNG / JPEG image, or any folder of them (subfolders kept)")
    predict.add_argument("--output", required=True, help="writes labelIds/, color/ and overlay/ trees here")


def _add_data_commands(commands) -> None:
    prepare = _command(commands, "prepare", "decode the dataset once into the shard cache data.cache.dir",
                       "Training then reads memmap shards instead of decoding PNGs every epoch.",
                       "cityseg prepare --config configs/demo.yaml data.cache.dir=cache/demo")
    _config_args(prepare, "data.cache.dir=cache/demo")
    prepare.add_argument("--splits", default=None, help="comma-separated (default: data.train_split,data.val_split)")
    prepare.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores / ranks)")
    bench = _command(commands, "bench", "loader, training-step and precision/process throughput, side by side",
                     "--quick is a smoke test (tiny sizes, one repeat): it checks the bench runs, its numbers "
                     "measure nothing.", "cityseg bench --config configs/demo.yaml --json bench.json")
    _config_args(bench, "data.batch_size=8")
    bench.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, one repeat; not a measurement")
    bench.add_argument("--images", type=int, default=None, help="images in the loader comparison (default: 16)")
    bench.add_argument("--batch", type=int, default=None, help="batch size of the step measurements (default: 8)")
    bench.add_argument("--repeats", type=int, default=None, help="alternating repeats, the median is reported "
                       "(default: 5)")
    bench.add_argument("--count-only", action="store_true", help="only the counted step: bytes and ATen ops of "
                       "the configured training step on fake tensors (seconds, no GPU, no data)")
    bench.add_argument("--tb-per-s", type=float, default=2.5, help="memory bandwidth of the counted step's "
                       "ceiling in TB/s (default: 2.5, an H100's HBM3 in practice)")
    synth = _command(commands, "synth", "write a synthetic dataset in the Cityscapes layout",
                     "Generated images with gtFine labels, no download needed: for demos and tests.",
                     "cityseg synth --out data/synth --train 24 --val 7")
    synth.add_argument("--out", required=True, help="root to write leftImg8bit/ and gtFine/ under")
    synth.add_argument("--train", type=int, default=24, help="training images")
    synth.add_argument("--val", type=int, default=7, help="validation images")
    synth.add_argument("--test", type=int, default=0, help="test images (no labels are used)")
    synth.add_argument("--height", type=int, default=256, help="image height in pixels")
    synth.add_argument("--width", type=int, default=512, help="image width in pixels")
    synth.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    weights = _command(commands, "weights", "pretrained encoder weights for clusters whose nodes are offline",
                       "`weights fetch` (on a login node) puts model.encoder's model.encoder_weights into the Hugging "
                       "Face cache; training with HF_HUB_OFFLINE=1 then finds them.",
                       "cityseg weights fetch --config configs/deeplabv3plus_r50_512x1024_80k.yaml")
    fetch = weights.add_subparsers(dest="action", required=True, metavar="<action>").add_parser(
        "fetch", help="download the encoder weights of a config into the Hugging Face cache")
    _config_args(fetch, "model.encoder=resnet50")
    fetch.add_argument("--cache-dir", default=None, help="a cache directory of your own (default: HF_HUB_CACHE, "
                       "else ~/.cache/huggingface/hub); training then needs HF_HUB_CACHE set to it")


def _one_line(err: Exception) -> str:
    """Errors re-raised from DataLoader workers carry the worker's traceback; users need its last line."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", text)  # C++ source location of gloo / NCCL errors
    return text.splitlines()[0] if text else type(err).__name__


def run_train(args) -> int:
    """The product's main path, kept here: train.py -> cli.py -> train/loop.py -> train/step.py."""
    cfg = load_config(args.config, args.overrides)  # before the heavy imports: a config error answers at once
    for split in (cfg.data.train_split, cfg.data.val_split):  # so does a wrong data.root
        check_split_dir(cfg.data.root, split)
    from cityseg.train.loop import train

    return train(cfg)


COMMANDS = {"train": run_train, "evaluate": commands.run_evaluate, "predict": commands.run_predict,
            "export": commands.run_export, "check": commands.run_check, "config": commands.run_config,
            "synth": commands.run_synth, "prepare": commands.run_prepare, "bench": commands.run_bench,
            "weights": commands.run_weights}


def user_errors() -> tuple[type, ...]:
    """The one-line error classes of the heavy modules, imported only now: a command that raised one loaded it."""
    from cityseg.checkpoint import CheckpointError
    from cityseg.model.build import ModelError
    from cityseg.train.loop import TrainingError

    return ConfigError, DataError, ModelError, CheckpointError, TrainingError


def _is_collective_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or any(word in str(err) for word in ("gloo", "NCCL", "ProcessGroup"))


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    prefix = "" if is_main_rank() else f"[rank {os.environ.get('RANK')}] "
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        report(f"{prefix}error: {_one_line(err)}\n")
        return EXIT_USAGE
    except DataError as err:  # before user_errors(): a data.root checked before torch loaded stays fast
        report(f"{prefix}error: {_one_line(err)}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training installed its handler (startup, evaluation)
        from cityseg.distributed.preemption import EXIT_INTERRUPTED

        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as err:
        if isinstance(err, user_errors()):
            report(f"{prefix}error: {_one_line(err)}\n")
            return 1
        if not (isinstance(err, RuntimeError) and _is_collective_failure(err)):
            raise
        report(f"[rank {os.environ.get('RANK', '0')}] error: a collective failed: another process died or stalled "
               f"past dist.timeout_minutes ({_one_line(err)}); the launcher's report names the rank that failed "
               "first\n")
        return 1


def train_main(argv: list[str] | None = None) -> int:
    """`python train.py --config x.yaml [key=value ...]`: the train command with its own name in the help."""
    parser = argparse.ArgumentParser(prog="train.py", formatter_class=HelpFormatter, description=(
        "Train a model; the same as `cityseg train` (run under accelerate launch for many processes)."),
        epilog="example:\n  accelerate launch train.py --config configs/demo.yaml train.epochs=2")
    add_train_args(parser)
    parser.set_defaults(command="train")
    return main(argv, parser)


if __name__ == "__main__":
    sys.exit(main())
