"""The bodies of the `cityseg` commands: load the config, run the work, print what the user reads.

Heavy modules (torch, smp, accelerate, W&B) are imported inside the commands that use them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cityseg.config.load import dump_config, load_config, run_config_path
from cityseg.config.schema import ConfigError
from cityseg.data.layout import check_split_dir

EXIT_USAGE = 2  # argparse's code for a bad command line; also a bad config or override


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _config_for(args) -> object:
    path = args.config if args.config is not None else run_config_path(args.checkpoint)
    return load_config(path, args.overrides, recorded=args.config is None)  # a run's: normalization of old runs


def run_evaluate(args) -> int:
    if args.mode:
        args.overrides = [*args.overrides, f"eval.mode={args.mode}"]
    cfg = _config_for(args)
    check_split_dir(cfg.data.root, args.split or cfg.data.val_split)
    from rich.console import Console

    from cityseg.evaluation.evaluate import evaluate
    from cityseg.observe.tables import benchmark_tables

    metrics = evaluate(cfg, args.checkpoint, args.split, aug_test=args.aug_test)
    if is_main_rank():
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
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"✗ config: {err}")
        return EXIT_USAGE
    from cityseg.train.preflight import format_checks, run_checks

    checks = run_checks(cfg, deep=args.deep, world_size=args.world_size, cuda=True if args.gpu else None)
    print(format_checks(checks))
    return 0 if all(ok for ok, _, _ in checks) else 1


def run_config(args) -> int:
    sys.stdout.write(dump_config(load_config(args.config, args.overrides)))
    return 0


def run_predict(args) -> int:
    cfg = _config_for(args)
    from cityseg.evaluation.predict import predict

    count = predict(cfg, args.checkpoint, args.output, split=args.split, input_dir=args.input)
    if is_main_rank():
        print(f"wrote predictions of {count} images to {args.output} (labelIds/, color/, overlay/)")
    return 0


def run_export(args) -> int:
    from cityseg.checkpoint import CheckpointError, export

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
    cfg = load_config(args.config, args.overrides)
    from cityseg.data.cache import prepare

    splits = args.splits.split(",") if args.splits else [cfg.data.train_split, cfg.data.val_split]
    for manifest in prepare(cfg.data, splits, args.workers):
        print(f"wrote {manifest.parent} ({json.loads(manifest.read_text())['num_samples']} samples)")
    return 0


def run_bench(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from cityseg.bench.throughput import bench

    bench(cfg, json_path=args.json, quick=args.quick, images=args.images,
          batch=args.batch, repeats=args.repeats)
    return 0


def run_weights(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from cityseg.model.weights import WeightsError, cache_dir, fetch

    try:
        paths = fetch(cfg.model, args.cache_dir)
    except WeightsError as err:
        report(f"error: {err}\n")
        return 1
    if not paths:
        print(f"nothing to fetch: model.encoder_weights is {cfg.model.encoder_weights!r}")
        return 0
    where = Path(args.cache_dir).resolve() if args.cache_dir else cache_dir()
    print(f"{cfg.model.encoder} '{cfg.model.encoder_weights}' weights in {where} ({len(paths)} file(s))")
    if args.cache_dir:
        print(f"train with: export HF_HUB_CACHE={where} HF_HUB_OFFLINE=1")
    return 0


def report(line: str) -> None:
    """Write an error line; every one-line error of main() goes through here. Under torchelastic (accelerate
    launch) the launcher prints its own ~40-line failure report after the processes exit: rank 0's line is then
    repeated after it, by a detached helper that waits (at most 30 s) for the launcher to exit, so the reason is
    the last thing on the screen."""
    sys.stderr.write(line)  # one write: ranks sharing a pipe do not interleave
    sys.stderr.flush()
    if "TORCHELASTIC_RUN_ID" not in os.environ or not is_main_rank():
        return
    subprocess.Popen([sys.executable, "-c", LAUNCHER_WAITER, str(os.getppid()), line], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, start_new_session=True)


# A launcher that has exited is gone, or a zombie until its parent reaps it: a parent that reads the launcher's
# output to the end before reaping it (Python's subprocess.run(capture_output=True)) would otherwise wait 30 s.
LAUNCHER_WAITER = """import os, sys, time
def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
end = time.monotonic() + 30
while time.monotonic() < end and running(int(sys.argv[1])):
    time.sleep(0.1)
sys.stderr.write(sys.argv[2])
"""
