"""`bash bench/gpu_proof.sh`: step speed, MFU, syncs, data wait and full-size evaluation on one GPU; JSON + table."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from cityseg.bench.gpu_diagnose import (
    COMPILE_VARIANTS,
    NEEDS_CUDA,
    diagnose_child,
    diagnosis_rows,
    run_child,
    tile_tree,
    variant_child,
)
from cityseg.bench.gpu_measure import eval_child, loop_child, step_child

REPO = Path(__file__).resolve().parents[2]
# epoch_train: a Cityscapes epoch (2,975 images) on one GPU; share_steps: one GPU's share of it among 8 (11 steps
# of 32); tiles: distinct training-size pairs the epoch trees link to, cycled. budget_s: the compile variants run
# last, each limited to what is left of it.
FULL = {"source": [1024, 2048], "train": 160, "val": 32, "size": [256, 512], "batch": 32, "workers": 8,
        "steps": 30, "warmup": 3, "run_epochs": 6, "loader_epochs": 2, "eval_images": 8,
        "profile_steps": 5, "sweep": [16, 32, 64, 128], "sweep_repeats": 3, "sweep_steps": 10, "tiles": [64, 16],
        "epoch_train": 2975, "epoch_val": 500, "share_steps": 11, "log_every": 10, "budget_s": 480}
QUICK = {"source": [64, 128], "train": 16, "val": 4, "size": [32, 64], "batch": 4, "workers": 2,
         "steps": 2, "warmup": 1, "run_epochs": 2, "loader_epochs": 1, "eval_images": 2,
         "profile_steps": 5, "sweep": [2, 4], "sweep_repeats": 3, "sweep_steps": 1, "tiles": [8, 4],
         "epoch_train": 24, "epoch_val": 8, "share_steps": 2, "log_every": 2, "budget_s": None}


def proof_config(work: Path, sizes: dict, **overrides) -> dict:
    """The seed recipe at the proof's sizes, as a config tree (written to YAML for the child processes)."""
    tree = yaml.safe_load((REPO / "configs" / "seed_unet_mobilenetv3.yaml").read_text())
    tree["data"].update(root=str(work / "data"), image_size=sizes["size"], batch_size=sizes["batch"],
                        num_workers=sizes["workers"])
    tree["tracking"] = {"wandb": {"mode": "disabled"}}
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def child(args: list[str], work: Path, timeout: float) -> subprocess.CompletedProcess:
    """A fresh Python process (its own Accelerator and CUDA context); its last stdout line is JSON when asked."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    (work / "logs").mkdir(exist_ok=True)
    name = "_".join(a.replace("/", "-") for a in args[:4] if not a.startswith("-"))[-80:]
    (work / "logs" / f"{name}.log").write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"gpu_proof: {' '.join(args[:6])} exited {result.returncode}: "
                           f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")
    return result


# ---- the driver: data, cache, children, report

def make_data(work: Path, sizes: dict) -> dict:
    from cityseg.data.synthetic import write_synthetic

    started = time.perf_counter()
    height, width = sizes["source"]
    write_synthetic(work / "data", n_train=sizes["train"], n_val=sizes["val"], height=height, width=width,
                    seed=0, workers=os.cpu_count() or 1)
    pngs = sorted((work / "data" / "leftImg8bit").rglob("*.png"))
    return {"train": sizes["train"], "val": sizes["val"], "size": sizes["source"],
            "mean_png_mb": statistics.mean(p.stat().st_size for p in pngs) / 1e6,
            "seconds": time.perf_counter() - started}


def write_config(work: Path, name: str, tree: dict) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def train_run(work: Path, name: str, tree: dict, timeout: float) -> dict:
    """`python train.py` with this config; its data wait, images/s and mIoU per evaluation, as the user sees them."""
    tree["output_dir"] = str(work / "runs" / name)
    shutil.rmtree(tree["output_dir"], ignore_errors=True)  # a rerun in the same --work: not a resume of the last
    result = child(["train.py", "--config", str(write_config(work, name, tree))], work, timeout)
    out = Path(tree["output_dir"])
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    verdicts = [line for line in result.stdout.splitlines() if "-bound:" in line]
    last_epoch = [r for r in records if r["epoch"] == records[-1]["epoch"]] or records
    waits = [float(line.split(": ")[2].split("%")[0]) / 100 for line in verdicts]
    epoch_speeds = [float(line.split(" img/s over the epoch")[0].rsplit(" ", 1)[1]) for line in verdicts]
    return {"data_wait_last_epoch": waits[-1] if waits else None, "data_wait_per_epoch": waits,
            # the whole last epoch (its first batch's wait included), not a median of logging windows
            "images_per_s": epoch_speeds[-1] if epoch_speeds else None, "verdicts": verdicts,
            "mIoU": [m["mIoU"] for m in metrics], "steps": records[-1]["step"],
            "mfu": statistics.median(r["mfu"] for r in last_epoch) if "mfu" in records[-1] else None,
            "peak_allocated_gb": records[-1].get("mem_allocated_gb")}


def json_child(args: list[str], work: Path, timeout: float) -> dict:
    return json.loads(child(["-m", "cityseg.bench.gpu_proof", *args], work, timeout).stdout.strip().splitlines()[-1])


def loader_tree(work: Path, sizes: dict, cuda: bool, name: str, changes: dict) -> dict:
    mIoU_run = name == "cached_device_augment"  # this run also validates every epoch: its mIoU must rise
    return proof_config(work, sizes, **{"data.cache.dir": str(work / "cache"), "train.log_every": 2,
                                        "train.channels_last": cuda,
                                        "train.epochs": sizes["run_epochs" if mIoU_run else "loader_epochs"],
                                        "train.eval_every_epochs": 1 if mIoU_run else 1000,
                                        "train.mixed_precision": "bf16" if cuda else "no", **changes})


def prepare_cache(work: Path, config: Path) -> dict:
    started = time.perf_counter()
    child(["-m", "cityseg", "prepare", "--config", str(config)], work, 600)
    return {"seconds": time.perf_counter() - started}


def measure(work: Path, sizes: dict, report: dict, stage, precisions: bool) -> None:
    """Each stage's result (or its error) lands in report under its name; one failure does not stop the rest.
    Seconds on an H100 (the 2026-11-27 run, or estimated where marked ~) after each stage: the total fits 8 min."""
    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    report["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "cuda": cuda,
                         "gpu": torch.cuda.get_device_name(0) if cuda else None}
    stage("data", lambda: make_data(work, sizes))  # 160 + 32 full-size PNGs: ~25 s
    base = write_config(work, "base", proof_config(work, sizes, **{
        "data.cache.dir": str(work / "cache"), "train.channels_last": cuda,
        "train.mixed_precision": "bf16" if cuda else "no"}))
    stage("cache", lambda: prepare_cache(work, base))  # 14 s
    trees = epoch_trees(work, sizes, cuda, stage)  # ~15 s: tiles at the training size, linked trees, their caches

    def step_stage(variant: str) -> None:
        stage(f"steps.{variant}", lambda: json_child(
            ["--child", "step", "--config", str(base), "--variant", variant, "--steps", str(sizes["steps"]),
             "--warmup", str(sizes["warmup"])], work, 400))

    # bf16 + channels_last: 51 s; fp32, bf16, fp16 (--precisions): 35 s each, measured 2026-11-27
    variants = ["bf16_channels_last"] + (["fp32", "bf16", "fp16_grad_scaler"] if precisions else []) if cuda \
        else ["fp32"]
    for variant in variants:
        step_stage(variant)
    stage("diagnosis", lambda: json_child([  # ~60 s: profiler, batch sweep (4 shapes autotuned), loss
        "--child", "diagnose", "--config", str(base), "--warmup", str(sizes["warmup"]), "--options", json.dumps(
            {"profile_steps": sizes["profile_steps"], "batches": sizes["sweep"], "repeats": sizes["sweep_repeats"],
             "steps": sizes["sweep_steps"]})], work, 400))
    stage("loop_syncs", lambda: json_child(  # 33 s
        ["--child", "loop", "--config", str(trees["epoch"]), "--steps", "3", "--options",
         json.dumps({"window": sizes["log_every"]})], work, 300))
    for name in ("epoch", "gpu_share"):  # ~40 s and ~25 s
        stage(f"runs.{name}", lambda name=name: json_child(["--child", "run", "--config", str(trees[name])], work, 600))
    loaders = {"cached_device_augment": {"data.cache.device_augment": True}, "cached_cpu_augment": {},
               "uncached": {"data.cache.dir": None}}
    for name, changes in loaders.items():  # ~28 s each
        stage(f"loaders.{name}", lambda name=name, changes=changes: train_run(
            work, name, loader_tree(work, sizes, cuda, name, changes), 600))
    weights = work / "runs" / "cached_device_augment" / "model.safetensors"
    stage("full_resolution_eval", lambda: json_child(  # 17 s
        ["--child", "eval", "--config", str(base), "--weights", str(weights), "--images",
         str(sizes["eval_images"])], work, 400))
    # last: compilation takes the longest (49 s on an H200 for the model alone), so each variant gets what is left
    for variant, (_, cuda_only) in COMPILE_VARIANTS.items():
        left = None if sizes["budget_s"] is None else sizes["budget_s"] - (time.perf_counter() - started)
        stage(f"variants.{variant}", lambda variant=variant, left=left, cuda_only=cuda_only: variant_stage(
            work, base, sizes, variant, left, cuda_only and not cuda))


def variant_stage(work: Path, base: Path, sizes: dict, variant: str, left: float | None, needs_cuda: bool) -> dict:
    """One compile variant in its own process, limited to what is left of the proof's budget."""
    if needs_cuda:
        return {"variant": variant, "skipped": NEEDS_CUDA}
    if left is not None and left < 60:
        return {"variant": variant, "skipped": f"not started: the proof's budget was spent ({left:.0f} s left)"}
    try:
        return json_child(["--child", "variant", "--config", str(base), "--variant", variant, "--steps",
                           str(sizes["steps"]), "--warmup", str(sizes["warmup"])], work, left or 900)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "skipped": f"stopped at the proof's budget after {left:.0f} s (compiling)"}


def epoch_trees(work: Path, sizes: dict, cuda: bool, stage) -> dict:
    """Configs of the two training runs: a Cityscapes-sized epoch, and one GPU's share of it among 8."""
    from cityseg.data.synthetic import write_synthetic

    trees = {"epoch": (sizes["epoch_train"], sizes["epoch_val"]),
             "gpu_share": (sizes["share_steps"] * sizes["batch"], -(-sizes["epoch_val"] // 8))}

    def make() -> dict:
        began = time.perf_counter()
        write_synthetic(work / "tiles", n_train=sizes["tiles"][0], n_val=sizes["tiles"][1], height=sizes["size"][0],
                        width=sizes["size"][1], seed=1, workers=os.cpu_count() or 1)
        for name, (train, val) in trees.items():
            tile_tree(work / "tiles", work / f"data_{name}", {"train": train, "val": val})
        return {name: {"train": train, "val": val} for name, (train, val) in trees.items()} | {
            "seconds": time.perf_counter() - began}

    stage("epoch_data", make)
    configs = {}
    for name in trees:
        shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a rerun in the same --work: not a resume
        configs[name] = write_config(work, name, proof_config(work, sizes, **{
            "data.root": str(work / f"data_{name}"), "data.cache.dir": str(work / f"cache_{name}"),
            "data.cache.device_augment": True, "train.channels_last": cuda, "train.epochs": 2,
            "train.log_every": sizes["log_every"], "train.mixed_precision": "bf16" if cuda else "no",
            "output_dir": str(work / "runs" / name)}))
        stage(f"epoch_cache.{name}", lambda path=configs[name]: prepare_cache(work, path))
    return configs


def verdict(report: dict) -> dict:
    """The issue's targets, checked: 0 syncs per step, >= 2,000 img/s bf16 with < 5% data wait, mIoU rises."""
    steps, run = report.get("steps", {}), report.get("loaders", {}).get("cached_device_augment", {})
    syncs = [s["syncs_per_step"] for s in [*steps.values(), report.get("loop_syncs", {})]
             if s.get("syncs_per_step") is not None]
    best_bf16 = max((s["images_per_s"] for name, s in steps.items() if name.startswith("bf16")), default=None)
    wait, miou = run.get("data_wait_last_epoch"), run.get("mIoU", [])
    return {"zero_syncs_per_step": all(n == 0 for n in syncs) if syncs else None,
            "bf16_2000_img_s": best_bf16 >= 2000 if best_bf16 is not None else None,
            "data_wait_under_5pct": wait < 0.05 if wait is not None else None,
            "miou_rises": len(miou) > 1 and miou[-1] > miou[0]}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cityseg GPU proof on {report['machine']['gpu'] or 'cpu'}: seed model, "
                        f"{report['setup']['size'][0]}x{report['setup']['size'][1]}, batch {report['setup']['batch']}")
    for column in ("measurement", "img/s", "MFU", "data wait", "peak mem GiB", "syncs/step"):
        table.add_column(column, justify="left" if column == "measurement" else "right")

    def cell(row: dict, key: str, form: str) -> str:
        value = row.get(key)
        return "" if value is None else form.format(100 * value if "%" in form else value)

    def add(label: str, row: dict) -> None:
        if "error" in row or "skipped" in row:
            table.add_row(label, f"failed: {row['error'][:60]}" if "error" in row else row["skipped"], "", "", "", "")
            return
        table.add_row(label, cell(row, "images_per_s", "{:.1f}"), cell(row, "mfu", "{:.1f}%"),
                      cell(row, "data_wait_last_epoch", "{:.1f}%"),
                      cell(row, "peak_allocated_gb", "{:.2f}"), cell(row, "syncs_per_step", "{}"))

    for name, row in report.get("steps", {}).items():
        add(f"step {name} (batches on the device)", row)
    add("engine loop body: cached loader + device augment + step", report.get("loop_syncs", {}))
    for name, row in report.get("loaders", {}).items():
        add(f"train.py, {name} loader, {report['setup']['workers']} workers", row)
    evaluation = report.get("full_resolution_eval", {})
    add(f"eval {evaluation.get('size')} sliding window {evaluation.get('window')} + flip", evaluation)
    for label, row in diagnosis_rows(report):
        add(label, row)
    miou = report.get("loaders", {}).get("cached_device_augment", {}).get("mIoU", [])
    table.add_row("mIoU per epoch, cached + device augment run", " ".join(f"{m:.3f}" for m in miou), "", "", "", "")
    console = Console(width=160)
    console.print(table)
    console.print(f"targets: {report['verdict']}")


def child_measurement(args) -> dict:
    """What a child process (--child) measures, as JSON for the driver."""
    options = json.loads(args.options)
    if args.child == "step":
        return step_child(args.config, args.variant, args.steps, args.warmup)
    if args.child == "loop":
        return loop_child(args.config, args.steps, **options)
    if args.child == "eval":
        return eval_child(args.config, args.weights, args.images)
    if args.child == "diagnose":
        return diagnose_child(args.config, warmup=args.warmup, **options)
    if args.child == "variant":
        return variant_child(args.config, args.variant, args.steps, args.warmup)
    return run_child(args.config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_proof.sh", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU, the test suite)")
    parser.add_argument("--work", default="runs/gpu_proof", help="scratch folder (data, cache, runs, logs)")
    parser.add_argument("--json", default=None, help="report path (default: <work>/gpu_proof.json)")
    parser.add_argument("--precisions", action="store_true",
                        help="also time the step at fp32, bf16 without channels_last and fp16 (~35 s each on a GPU)")
    parser.add_argument("--child", choices=["step", "eval", "loop", "diagnose", "variant", "run"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_measurement(args)))
        return 0
    sizes, work = (QUICK if args.quick else FULL), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json or work / "gpu_proof.json")
    started = time.perf_counter()
    report = {"setup": {"quick": args.quick, "size": sizes["size"], "batch": sizes["batch"],
                        "workers": sizes["workers"], "model": "Unet/tu-tf_mobilenetv3_small_minimal_100"}}

    def stage(name: str, measure_it) -> None:
        """Run one measurement; its result (or error) goes under report[name] (dotted: nested) and to disk."""
        begun = time.perf_counter()
        try:
            result = measure_it()
        except Exception as err:  # noqa: BLE001 - a failed stage is reported; the next ones still run
            result = {"error": f"{type(err).__name__}: {err}"}
        result["stage_s"] = time.perf_counter() - begun
        *parents, leaf = name.split(".")
        node = report
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = result
        print(f"{name}: {json.dumps(result)}", flush=True)
        json_path.write_text(json.dumps(report, indent=2))

    measure(work, sizes, report, stage, args.precisions)
    report["verdict"] = verdict(report)
    report["seconds"] = time.perf_counter() - started
    json_path.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {json_path} ({report['seconds']:.0f} s)")
    errors = [name for name, value in report.items() if isinstance(value, dict) and "error" in value]
    errors += [f"{group}.{name}" for group in ("steps", "loaders", "runs", "variants", "epoch_cache")
               for name, value in report.get(group, {}).items() if "error" in value]
    if errors:
        print(f"gpu_proof: failed stages: {', '.join(errors)}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
