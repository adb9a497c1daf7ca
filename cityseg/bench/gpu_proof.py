"""`bash bench/gpu_proof.sh`: on one lent GPU, in one go under one deadline: the training step eager, profiled,
compiled (default, CUDA graphs, max-autotune), swept (batch, class padding, precisions), then the loader, the loop,
whole train.py runs and full-size evaluation; one JSON, rewritten atomically after every section, and a table."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from cityseg.bench.gpu_diagnose import diagnosis_rows
from cityseg.bench.gpu_measure import STEP_VARIANTS
from cityseg.bench.proof_runner import Proof, Section, machine_record

REPO = Path(__file__).resolve().parents[2]
# epoch_train: a Cityscapes epoch (2,975 images) on one GPU; share_steps: one GPU's share of it among 8 (11 steps
# of 32); tiles: distinct training-size pairs the epoch trees link to, cycled.
FULL = {"source": [1024, 2048], "train": 160, "val": 32, "size": [256, 512], "batch": 32, "workers": 8,
        "steps": 30, "warmup": 3, "run_epochs": 6, "loader_epochs": 2, "eval_images": 8,
        "profile_steps": 5, "sweep": [16, 32, 64, 128], "sweep_repeats": 3, "sweep_steps": 10, "tiles": [64, 16],
        "epoch_train": 2975, "epoch_val": 500, "share_steps": 11, "log_every": 10, "cap_scale": 1.0}
QUICK = {"source": [64, 128], "train": 16, "val": 4, "size": [32, 64], "batch": 4, "workers": 2,
         "steps": 2, "warmup": 1, "run_epochs": 2, "loader_epochs": 1, "eval_images": 2,
         "profile_steps": 5, "sweep": [2, 4], "sweep_repeats": 3, "sweep_steps": 1, "tiles": [8, 4],
         "epoch_train": 24, "epoch_val": 8, "share_steps": 2, "log_every": 2, "cap_scale": 0.5}
NEEDS_CUDA = "skipped: needs CUDA"


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


# ---- in children: the synthetic data

def make_data(work: Path, sizes: dict) -> dict:
    from cityseg.data.synthetic import write_synthetic

    height, width = sizes["source"]
    write_synthetic(work / "data", n_train=sizes["train"], n_val=sizes["val"], height=height, width=width,
                    seed=0, workers=os.cpu_count() or 1)
    pngs = sorted((work / "data" / "leftImg8bit").rglob("*.png"))
    return {"train": sizes["train"], "val": sizes["val"], "size": sizes["source"],
            "mean_png_mb": statistics.mean(p.stat().st_size for p in pngs) / 1e6}


def epoch_counts(sizes: dict) -> dict:
    """The two training runs' trees: a Cityscapes-sized epoch, and one GPU's share of it among 8."""
    return {"epoch": {"train": sizes["epoch_train"], "val": sizes["epoch_val"]},
            "gpu_share": {"train": sizes["share_steps"] * sizes["batch"], "val": -(-sizes["epoch_val"] // 8)}}


def make_epoch_data(work: Path, sizes: dict) -> dict:
    """Tiles at the training size, and trees of links to them (cycled) as long as each run's epoch."""
    from cityseg.bench.gpu_diagnose import tile_tree
    from cityseg.data.synthetic import write_synthetic

    write_synthetic(work / "tiles", n_train=sizes["tiles"][0], n_val=sizes["tiles"][1], height=sizes["size"][0],
                    width=sizes["size"][1], seed=1, workers=os.cpu_count() or 1)
    return {name: tile_tree(work / "tiles", work / f"data_{name}", counts)
            for name, counts in epoch_counts(sizes).items()}


# ---- the driver: configs, sections in order, report

def write_config(work: Path, name: str, tree: dict) -> Path:
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


def loader_summary(output_dir: Path, log: str) -> dict:
    """A train.py run's data wait, images/s and mIoU per evaluation, as the user sees them (its output files)."""
    records = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    verdicts = [line for line in log.splitlines() if "-bound:" in line]
    last_epoch = [r for r in records if r["epoch"] == records[-1]["epoch"]] or records
    waits = [float(line.split(": ")[2].split("%")[0]) / 100 for line in verdicts]
    epoch_speeds = [float(line.split(" img/s over the epoch")[0].rsplit(" ", 1)[1]) for line in verdicts]
    return {"data_wait_last_epoch": waits[-1] if waits else None, "data_wait_per_epoch": waits,
            # the whole last epoch (its first batch's wait included), not a median of logging windows
            "images_per_s": epoch_speeds[-1] if epoch_speeds else None, "verdicts": verdicts,
            "mIoU": [m["mIoU"] for m in metrics], "steps": records[-1]["step"],
            "mfu": statistics.median(r["mfu"] for r in last_epoch) if "mfu" in records[-1] else None,
            "peak_allocated_gb": records[-1].get("mem_allocated_gb")}


def run_configs(work: Path, sizes: dict, cuda: bool) -> dict:
    """Every config the sections use, written up front; earlier runs' output folders removed (not resumed)."""
    device = {"train.channels_last": cuda, "train.mixed_precision": "bf16" if cuda else "no"}
    paths = {"base": write_config(work, "base", proof_config(work, sizes, **{
        "data.cache.dir": str(work / "cache"), **device}))}
    for name in epoch_counts(sizes):
        paths[name] = write_config(work, name, proof_config(work, sizes, **{
            "data.root": str(work / f"data_{name}"), "data.cache.dir": str(work / f"cache_{name}"),
            "data.cache.device_augment": True, "train.epochs": 2, "train.log_every": sizes["log_every"],
            "output_dir": str(work / "runs" / name), **device}))
    loaders = {"cached_device_augment": {"data.cache.device_augment": True}, "cached_cpu_augment": {},
               "uncached": {"data.cache.dir": None}}
    for name, changes in loaders.items():
        miou_run = name == "cached_device_augment"  # this run also validates every epoch: its mIoU must rise
        paths[f"loader_{name}"] = write_config(work, f"loader_{name}", proof_config(work, sizes, **{
            "data.cache.dir": str(work / "cache"), "train.log_every": 2, "output_dir": str(work / "runs" / name),
            "train.epochs": sizes["run_epochs" if miou_run else "loader_epochs"],
            "train.eval_every_epochs": 1 if miou_run else 1000, **device, **changes}))
    for name in [*epoch_counts(sizes), *loaders]:
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
    return paths


def plan(work: Path, sizes: dict, cuda: bool, precisions: bool) -> list[Section]:
    """The sections, most informative first (caps in seconds on one GPU; the deadline's remainder caps each)."""
    configs = run_configs(work, sizes, cuda)
    main = {"precision": "bf16" if cuda else "no", "channels_last": cuda}
    runs = {"steps": sizes["steps"], "warmup": sizes["warmup"]}

    def child(name: str, kind: str, cap: float, config: str = "base", skip: str | None = None, **options):
        return Section(name, ["-m", "cityseg.bench.gpu_proof", "--child", kind, "--config", str(configs[config]),
                              "--options", json.dumps(options)], cap, skip=skip)

    def step(name: str, cap: float, cuda_only: bool = False, **variant):
        return child(name, "step", cap, skip=NEEDS_CUDA if cuda_only and not cuda else None,
                     variant={**main, **variant}, **runs)

    def train_py(name: str, config: str, cap: float) -> Section:
        output_dir = work / "runs" / name
        return Section(f"loaders.{name}", ["train.py", "--config", str(configs[config])], cap,
                       parse=lambda log: loader_summary(output_dir, log))

    eager = "bf16_channels_last" if cuda else "fp32"
    sections = [
        child("cuda", "cuda", 60, skip=None if cuda else "no CUDA: the quick proof runs on the CPU"),
        step(f"steps.{eager}", 120),
        child("profile", "profile", 90, profile_steps=sizes["profile_steps"], warmup=sizes["warmup"]),
        step("compile.default", 240, compile="default"),
        step("compile.reduce_overhead", 240, cuda_only=True, compile="reduce-overhead"),
        step("compile.max_autotune_no_cudagraphs", 300, cuda_only=True, compile="max-autotune-no-cudagraphs"),
        child("sweep.batch", "sweep", 150, batches=sizes["sweep"], repeats=sizes["sweep_repeats"],
              steps=sizes["sweep_steps"], warmup=sizes["warmup"]),
        step("sweep.pad_classes_24", 90, pad_classes_to=24),
        step("sweep.pad_classes_32", 90, pad_classes_to=32),
        step("sweep.pad_classes_32_compile", 240, pad_classes_to=32, compile="default"),
        *[step(f"steps.{name}", 90, **variant) for name, variant in STEP_VARIANTS.items()
          if precisions and name != eager],
        child("loss", "loss", 60, steps=sizes["sweep_steps"]),
        child("data", "data", 120, work=str(work), sizes=sizes),
        Section("cache", ["-m", "cityseg", "prepare", "--config", str(configs["base"])], 120,
                parse=lambda log: {"prepared": True}),
        child("epoch_data", "epoch_data", 60, work=str(work), sizes=sizes),
        *[Section(f"epoch_cache.{name}", ["-m", "cityseg", "prepare", "--config", str(configs[name])], 90,
                  parse=lambda log: {"prepared": True}) for name in epoch_counts(sizes)],
        child("loop_syncs", "loop", 90, config="epoch", steps=3, window=sizes["log_every"]),
        *[child(f"runs.{name}", "run", 150, config=name) for name in epoch_counts(sizes)],
        train_py("cached_device_augment", "loader_cached_device_augment", 150),
        train_py("cached_cpu_augment", "loader_cached_cpu_augment", 120),
        train_py("uncached", "loader_uncached", 120),
        child("full_resolution_eval", "eval", 90, weights=str(work / "runs" / "cached_device_augment" /
                                                              "model.safetensors"), images=sizes["eval_images"]),
    ]
    return sections


def best_step(report: dict) -> dict | None:
    """The fastest step of any section (eager, compiled, swept), named: what the verdict and the table quote."""
    candidates = []
    for group in ("steps", "compile", "sweep"):
        for name, row in report.get(group, {}).items():
            rows = row.get("batches", {}).items() if name == "batch" else [("", row)]
            for batch, measured in rows:
                if isinstance(measured, dict) and measured.get("images_per_s"):
                    label = f"{group}.{name}" + (f".{batch}" if batch else "")
                    candidates.append({"section": label, "images_per_s": measured["images_per_s"]})
    return max(candidates, key=lambda c: c["images_per_s"], default=None)


def verdict(report: dict) -> dict:
    """The targets, checked: 0 syncs per step, >= 2,000 img/s (best variant) with < 5% data wait, mIoU rises."""
    run = report.get("loaders", {}).get("cached_device_augment", {})
    steps = [*report.get("steps", {}).values(), *report.get("compile", {}).values(), report.get("loop_syncs", {})]
    syncs = [s["syncs_per_step"] for s in steps if s.get("syncs_per_step") is not None]
    best, wait, miou = best_step(report), run.get("data_wait_last_epoch"), run.get("mIoU", [])
    return {"zero_syncs_per_step": all(n == 0 for n in syncs) if syncs else None, "best_step": best,
            "best_step_2000_img_s": best["images_per_s"] >= 2000 if best else None,
            "data_wait_under_5pct": wait < 0.05 if wait is not None else None,
            "miou_rises": len(miou) > 1 and miou[-1] > miou[0]}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    gpu = report.get("cuda", {}).get("gpu") or "cpu"
    table = Table(title=f"cityseg GPU proof on {gpu}: seed model, {report['setup']['size'][0]}x"
                        f"{report['setup']['size'][1]}, batch {report['setup']['batch']}")
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

    for group in ("steps", "compile", "sweep"):
        for name, row in report.get(group, {}).items():
            if name != "batch":
                add(f"step {group}.{name}" + (" (CUDA graphs captured)" if row.get("cuda_graphs_captured") else ""),
                    row)
    add("engine loop body: cached loader + device augment + step", report.get("loop_syncs", {}))
    for name, row in report.get("loaders", {}).items():
        add(f"train.py, {name} loader, {report['setup']['workers']} workers", row)
    evaluation = report.get("full_resolution_eval", {})
    add(f"eval {evaluation.get('size')} sliding window {evaluation.get('window')} + flip", evaluation)
    for label, row in diagnosis_rows(report):
        add(label, row)
    console = Console(width=160)
    console.print(table)
    console.print(f"targets: {report.get('verdict')}")


def child_measurement(kind: str, config: str, options: dict) -> dict:
    """What a child process (--child) measures, as JSON for the driver."""
    from cityseg.bench import gpu_diagnose as diagnose
    from cityseg.bench import gpu_measure as measure

    if kind == "cuda":
        return measure.cuda_child()
    if kind == "step":
        return measure.step_child(config, options["variant"], options["steps"], options["warmup"])
    if kind == "profile":
        return diagnose.profile_child(config, options["profile_steps"], options["warmup"])
    if kind == "sweep":
        return diagnose.batch_sweep_child(config, options["batches"], options["repeats"], options["steps"],
                                          options["warmup"])
    if kind == "loss":
        return diagnose.loss_child(config, options["steps"])
    if kind == "loop":
        return measure.loop_child(config, options["steps"], options["window"])
    if kind == "eval":
        return measure.eval_child(config, options["weights"], options["images"])
    if kind in ("data", "epoch_data"):
        return (make_data if kind == "data" else make_epoch_data)(Path(options["work"]), options["sizes"])
    return diagnose.run_child(config)


def run_as_child(args) -> int:
    """One section in this process: its result JSON to --result. --fault (the tests' switch) crashes or hangs it."""
    fault = args.fault[-1] if args.fault else None
    if fault == "crash":
        raise RuntimeError("fault injected by --fault crash")
    if fault == "hang":
        time.sleep(24 * 3600)
    result = child_measurement(args.child, args.config, json.loads(args.options))
    Path(args.result).write_text(json.dumps(result))
    return 0


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="bench/gpu_proof.sh", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    parser.add_argument("--work", default="runs/gpu_proof", help="scratch folder: data, caches, runs, one log per "
                                                                 "section in <work>/logs")
    parser.add_argument("--json", default=None, help="report path, outside --work (default: <work>.json)")
    parser.add_argument("--deadline", type=float, default=480.0, metavar="SECONDS",
                        help="the whole proof's time limit; each section gets at most what is left (default 480)")
    parser.add_argument("--precisions", action="store_true",
                        help="also time the eager step at fp32, bf16 without channels_last and fp16")
    parser.add_argument("--only", default=None, metavar="SECTION,...",
                        help="run only these sections (names or their groups, e.g. steps,compile,profile)")
    parser.add_argument("--fault", action="append", default=[], help=argparse.SUPPRESS)  # SECTION=crash|hang
    for hidden in ("--child", "--config", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def selected(section: Section, only: str | None) -> bool:
    names = set(only.split(",")) if only else None
    return names is None or section.name in names or section.name.split(".")[0] in names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_as_child(args)
    sizes, work = (QUICK if args.quick else FULL), Path(args.work).resolve()
    json_path = Path(args.json).resolve() if args.json else work.with_name(work.name + ".json")
    if json_path.is_relative_to(work):
        print(f"gpu_proof: --json {json_path} is inside --work {work}; put the report outside the scratch folder "
              "(e.g. --json gpu_proof.json)", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    work.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    proof = Proof(json_path, work, args.deadline)
    proof.record("setup", {"quick": args.quick, "size": sizes["size"], "batch": sizes["batch"],
                           "workers": sizes["workers"], "model": "Unet/tu-tf_mobilenetv3_small_minimal_100"})
    proof.record("machine", machine_record())
    if not args.quick and not cuda:  # before any section: a GPU-sized proof on the CPU would only burn the lease
        proof.record("cuda", {"error": "torch.cuda.is_available() is False"})
        print(f"gpu_proof: no working CUDA (torch.cuda.is_available() is False, torch {torch.__version__} built for "
              f"CUDA {torch.version.cuda}); the full proof needs a GPU, --quick runs on the CPU; wrote {json_path}",
              file=sys.stderr)
        return 2
    faults = dict(fault.split("=", 1) for fault in args.fault)
    for section in plan(work, sizes, cuda, args.precisions):
        if not selected(section, args.only):
            continue
        section.cap_s *= sizes["cap_scale"]  # tiny sizes: a hung section is stopped sooner
        if section.name in faults:
            section.argv += ["--fault", faults[section.name]]
        result = proof.run(section)
        if section.name == "cuda" and "error" in result:
            print(f"gpu_proof: no working CUDA: {result['error']} (log {result.get('log')}); wrote {json_path}",
                  file=sys.stderr)
            return 2
    proof.record("verdict", verdict(proof.report))
    print_table(proof.report)
    failed = failed_sections(proof.report)
    print(f"wrote {json_path} ({proof.report['elapsed_s']:.0f} s of the {args.deadline:.0f} s deadline)")
    if failed:
        print(f"gpu_proof: failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def failed_sections(report: dict) -> list[str]:
    def walk(name: str) -> dict:
        node = report
        for part in name.split("."):
            node = node.get(part, {})
        return node

    return [name for name in report["order"] if "error" in walk(name)]


if __name__ == "__main__":
    sys.exit(main())
