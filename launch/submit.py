"""Validate a training config, then submit slurm/train.sh with sbatch (or print the command with --dry-run)."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python launch/submit.py` puts launch/, not the repository, on sys.path

from cityseg.config import ConfigError, load_config  # noqa: E402

TRAIN_SCRIPT = "slurm/train.sh"
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
    """Run `python -m cityseg check` for the job's world size and devices; exit with its message when it fails."""
    cmd = [sys.executable, "-m", "cityseg", "check", "--config", config, "--world-size", str(world_size),
           *(["--gpu"] if gpu else []), *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        sys.exit(f"error: preflight `{shlex.join(cmd[1:])}` failed (exit {result.returncode}); nothing submitted")


def sbatch_command(args: argparse.Namespace, config: str, job_name: str) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={args.nodes}"]
    if args.gpus_per_node is not None:  # train.sh runs one srun task (training process) per GPU, one on CPU nodes
        cmd += [f"--gpus-per-node={args.gpus_per_node}", f"--ntasks-per-node={max(args.gpus_per_node, 1)}"]
    exports = ["ALL"]
    if args.gpus_per_node == 0:
        exports.append("ACCELERATE_USE_CPU=1")
    if args.log_dir is not None:
        log_dir = Path(args.log_dir).resolve()
        cmd += [f"--output={log_dir}/%x-%j.out", f"--error={log_dir}/%x-%j.err"]
        exports.append(f"CITYSEG_LOG_DIR={log_dir}")  # where train.sh keeps its requeue marker
    if len(exports) > 1:
        cmd.append(f"--export={','.join(exports)}")
    for option in ("time", "partition", "account"):
        value = getattr(args, option)
        if value is not None:
            cmd.append(f"--{option}={value}")
    return [*cmd, TRAIN_SCRIPT, "--config", config, *args.overrides]


def log_paths(job_id: str, job_name: str) -> tuple[str, str]:
    """Where SLURM says the job writes (it expands %x/%j); the header's pattern if it cannot say."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
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
    preflight(config, args.overrides, world_size=args.nodes * max(gpus, 1), gpu=gpus > 0)
    job_name = args.job_name or cfg.name
    cmd = sbatch_command(args, config, job_name)
    print(f"cd {shlex.quote(str(REPO))} && {shlex.join(cmd)}")
    if args.dry_run:
        print(f"dry run: not submitted; run output goes to {cfg.output_dir}")
        return 0
    log_dir = Path(args.log_dir).resolve() if args.log_dir else REPO / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch would not create it
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: sbatch failed (exit {result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job_id = result.stdout.strip().split(";")[0]
    out, err = log_paths(job_id, job_name)
    print(f"submitted job {job_id}")
    print(f"log: {out}  (stderr: {err})")
    print(f"run: {cfg.output_dir}  (checkpoints, metrics.jsonl, model.safetensors)")
    print(f"watch: squeue -j {job_id}; tail -f {shlex.quote(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
