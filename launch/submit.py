"""Validate a training config, then submit slurm/train.sh with sbatch (or print the command with --dry-run);
with --sweep, one SLURM job array whose task N trains combination N of the swept values."""
from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python launch/submit.py` puts launch/, not the repository, on sys.path

from cityseg.config.load import load_config  # noqa: E402
from cityseg.config.schema import ConfigError  # noqa: E402

TRAIN_SCRIPT = "slurm/train.sh"
SLURM_TIMEOUT_S = 120  # a hung slurmctld gets an error, not a silent wait
LOG_DIR = "logs"  # matches --output/--error in the #SBATCH header of slurm/train.sh


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Submit a cityseg training run to SLURM (slurm/train.sh) after validating its config.",
        epilog="example: python launch/submit.py --config configs/demo.yaml --nodes 2 --gpus-per-node 4 "
               "--time 04:00:00 train.epochs=50")
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node (default: the #SBATCH line of slurm/train.sh); "
                             "0 = CPU-only, one process per node (ACCELERATE_USE_CPU=1)")
    parser.add_argument("--time", default=None, help="time limit, e.g. 04:00:00 (default: slurm/train.sh)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--job-name", default=None, help="default: the config's name")
    parser.add_argument("--log-dir", default=None,
                        help=f"where the job's .out/.err logs go (default: {LOG_DIR}/ as in slurm/train.sh)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the sbatch command only")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="sweep a config key over values (repeat for a grid): one job array, a task per "
                             "combination, each with its own name and output_dir, grouped in W&B")
    parser.add_argument("--max-parallel", type=int, default=None, help="sweep tasks running at once (default: all)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, passed to train.py")
    args = parser.parse_intermixed_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    if args.gpus_per_node is not None and args.gpus_per_node < 0:
        parser.error("--gpus-per-node must be 0 or more")
    return args


def repo_relative(path: str) -> str:
    """The config path as the job will see it: the job runs in the repository root."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        return str(resolved)


def script_gpus_per_node() -> int:
    """The `#SBATCH --gpus-per-node=N` of slurm/train.sh: what the job gets when --gpus-per-node is not given."""
    found = re.search(r"^#SBATCH --gpus-per-node=(\d+)", (REPO / "slurm" / "train.sh").read_text(), re.M)
    return int(found.group(1)) if found else 1


def preflight(config: str, overrides: list[str], world_size: int, gpu: bool) -> None:
    """`cityseg check` for the job's world size and devices, in this process: a sweep imports torch once and asks
    the model hub at most once (offline, every later check reads the local cache only). Exits with the check's
    lines when one fails."""
    from cityseg.train.preflight import format_checks, run_checks

    with contextlib.chdir(REPO):  # the job runs there: relative data.root, output_dir, cache are the job's
        checks = run_checks(load_config(config, overrides), world_size=world_size, cuda=True if gpu else None)
    if not all(ok for ok, _, _ in checks):
        sys.stderr.write(format_checks(checks) + "\n")
        command = shlex.join(["cityseg", "check", "--config", config, "--world-size", str(world_size),
                              *(["--gpu"] if gpu else []), *overrides])
        sys.exit(f"error: preflight `{command}` failed; nothing submitted")


def split_values(text: str) -> list[str]:
    """'1e-3,3e-4' -> ['1e-3', '3e-4']; commas inside [...] or {...} belong to the value ('[256,512],[512,1024]')."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def parse_sweeps(sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """[(key, values)] of the --sweep options; a malformed one exits with a one-line error."""
    parsed = []
    for text in sweeps:
        key, sep, raw = text.partition("=")
        values = split_values(raw) if sep else []
        if not key or not values or any(not v or "\t" in v or "\n" in v for v in values):
            sys.exit(f"error: --sweep {text!r}: expected KEY=V1,V2,... e.g. --sweep optim.lr=1e-3,3e-4")
        if key in (k for k, _ in parsed):
            sys.exit(f"error: --sweep {key} given twice: list all its values in one --sweep")
        parsed.append((key, values))
    return parsed


def sweep_runs(cfg, sweeps: list[tuple[str, list[str]]]) -> list[dict]:
    """One run per combination: its overrides, name and output_dir (<output_dir>/<key=value_...>), one W&B group."""
    group = cfg.tracking.wandb.group or f"{cfg.name}-sweep"
    runs, tags = [], set()
    for index, values in enumerate(itertools.product(*(v for _, v in sweeps))):
        chosen = [f"{key}={value}" for (key, _), value in zip(sweeps, values)]
        tag = "_".join(f"{key.rsplit('.', 1)[-1]}={value}" for (key, _), value in zip(sweeps, values))
        tag = re.sub(r"[^A-Za-z0-9._=+-]+", "-", tag).strip("-")
        tag = tag if tag not in tags else f"{index}-{tag}"  # two combinations that read alike: keep both apart
        tags.add(tag)
        output_dir = str(Path(cfg.output_dir) / tag)
        runs.append({"overrides": [*chosen, f"name={cfg.name}-{tag}", f"output_dir={output_dir}",
                                   f"tracking.wandb.group={group}"], "output_dir": output_dir, "group": group})
    return runs


def sbatch_command(args: argparse.Namespace, config: str, job_name: str) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={args.nodes}"]
    if args.gpus_per_node is not None:  # train.sh runs one srun task (training process) per GPU, one on CPU nodes
        cmd += [f"--gpus-per-node={args.gpus_per_node}", f"--ntasks-per-node={max(args.gpus_per_node, 1)}"]
    exports = ["ALL"]
    if args.gpus_per_node == 0:
        exports.append("ACCELERATE_USE_CPU=1")
    if args.log_dir is not None:
        log_dir = Path(args.log_dir).resolve()
        pattern = "%x-%A_%a" if args.sweep else "%x-%j"  # array tasks: array id _ task index
        cmd += [f"--output={log_dir}/{pattern}.out", f"--error={log_dir}/{pattern}.err"]
        exports.append(f"CITYSEG_LOG_DIR={log_dir}")  # where train.sh keeps its requeue marker
    if getattr(args, "sweep_file", None):
        cmd.append(f"--array=0-{args.sweep_count - 1}" + (f"%{args.max_parallel}" if args.max_parallel else ""))
        exports.append(f"CITYSEG_SWEEP_FILE={args.sweep_file}")  # train.sh: task N appends line N+1's overrides
    if len(exports) > 1:
        cmd.append(f"--export={','.join(exports)}")
    for option in ("time", "partition", "account"):
        value = getattr(args, option)
        if value is not None:
            cmd.append(f"--{option}={value}")
    return [*cmd, TRAIN_SCRIPT, "--config", config, *args.overrides]


def sbatch(cmd: list[str]) -> str:
    """Submit; the job id. A failed or unanswered sbatch exits with a one-line error (sbatch's exit status)."""
    try:
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"error: sbatch gave no answer in {SLURM_TIMEOUT_S} s (slurmctld down?); check squeue before "
              "submitting again", file=sys.stderr)
        sys.exit(1)
    if result.returncode != 0:
        print(f"error: sbatch failed (exit {result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        sys.exit(result.returncode)
    return result.stdout.strip().split(";")[0]


def log_paths(job_id: str, job_name: str) -> tuple[str, str]:
    """Where SLURM says the job writes (it expands %x/%j); the header's pattern if it cannot say."""
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                               timeout=SLURM_TIMEOUT_S).stdout
    except subprocess.TimeoutExpired:
        shown = ""
    fields = dict(re.findall(r"(\w+)=(\S*)", shown))
    default = f"{LOG_DIR}/{job_name}-{job_id}"
    return fields.get("StdOut", f"{default}.out"), fields.get("StdErr", f"{default}.err")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = repo_relative(args.config)
    try:
        cfg = load_config(REPO / config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gpus = args.gpus_per_node if args.gpus_per_node is not None else script_gpus_per_node()
    job_name = args.job_name or cfg.name
    if args.sweep:
        return submit_sweep(args, config, cfg, job_name, world_size=args.nodes * max(gpus, 1), gpu=gpus > 0)
    preflight(config, args.overrides, world_size=args.nodes * max(gpus, 1), gpu=gpus > 0)
    cmd = sbatch_command(args, config, job_name)
    print(f"cd {shlex.quote(str(REPO))} && {shlex.join(cmd)}")
    if args.dry_run:
        print(f"dry run: not submitted; run output goes to {cfg.output_dir}")
        return 0
    log_dir = Path(args.log_dir).resolve() if args.log_dir else REPO / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch would not create it
    job_id = sbatch(cmd)
    out, err = log_paths(job_id, job_name)
    print(f"submitted job {job_id}")
    print(f"log: {out}  (stderr: {err})")
    print(f"run: {cfg.output_dir}  (checkpoints, metrics.jsonl, model.safetensors)")
    print(f"watch: squeue -j {job_id}; tail -f {shlex.quote(out)}")
    return 0


def submit_sweep(args, config: str, cfg, job_name: str, world_size: int, gpu: bool) -> int:
    """Validate and preflight every combination, write the sweep file, submit one job array."""
    runs = sweep_runs(cfg, parse_sweeps(args.sweep))
    for index, one in enumerate(runs):  # every combination's config first: a typo in any value costs no preflight
        try:
            load_config(REPO / config, [*args.overrides, *one["overrides"]])
        except ConfigError as err:
            print(f"error: sweep task {index}: {err}", file=sys.stderr)
            return 2
    for one in runs:
        preflight(config, [*args.overrides, *one["overrides"]], world_size=world_size, gpu=gpu)
    log_dir = Path(args.log_dir).resolve() if args.log_dir else REPO / LOG_DIR
    args.sweep_file = log_dir / f"{job_name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}.tsv"
    args.sweep_count = len(runs)
    cmd = sbatch_command(args, config, job_name)
    print(f"sweep: {len(runs)} runs as job array tasks 0-{len(runs) - 1}, W&B group {runs[0]['group']}")
    for index, one in enumerate(runs):
        print(f"  task {index}: {' '.join(one['overrides'][:-3])} -> {one['output_dir']}")
    print(f"cd {shlex.quote(str(REPO))} && {shlex.join(cmd)}")
    if args.dry_run:
        print(f"dry run: not submitted; {args.sweep_file} not written")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    args.sweep_file.write_text("".join("\t".join(one["overrides"]) + "\n" for one in runs))
    job_id = sbatch(cmd)
    print(f"submitted job array {job_id} ({len(runs)} tasks: {job_id}_0 ... {job_id}_{len(runs) - 1})")
    print(f"sweep file: {args.sweep_file}")
    print(f"runs: {Path(cfg.output_dir)}/<key=value_...>  (one output_dir per task)")
    print(f"watch: squeue -j {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
