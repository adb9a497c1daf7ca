#!/bin/bash
# Evaluate saved weights with `cityseg evaluate` on one node, one process per GPU. From the repository root:
#
#   mkdir -p logs && sbatch slurm/eval.sh --config configs/demo.yaml --checkpoint runs/demo/model.safetensors
#
# Everything after the script name goes to `cityseg evaluate` unchanged (--split, --json, key=value ...).
#
#SBATCH --job-name=cityseg-eval
#SBATCH --nodes=1                   # evaluation is short: one node, all its GPUs
#SBATCH --ntasks-per-node=1         # one `accelerate launch`; it starts one process per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out     # %x = job name, %j = job id; logs/ must exist before sbatch
#SBATCH --error=logs/%x-%j.err

set -euo pipefail

# sbatch runs a copy of this file from a spool dir; the repository is where sbatch was called.
cd "${SLURM_SUBMIT_DIR:?run this with sbatch from the repository root}"
source slurm/env.sh

# Same rule as slurm/train.sh: one process per GPU, or one gloo process with ACCELERATE_USE_CPU=1.
if [[ "${ACCELERATE_USE_CPU:-0}" =~ ^(1|true|True|TRUE|yes)$ ]]; then
    num_processes=1
elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    num_processes=$SLURM_GPUS_ON_NODE
else
    num_processes=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if (( num_processes < 1 )); then
    echo "cityseg: no GPU on $(hostname): ask for --gpus-per-node, or export ACCELERATE_USE_CPU=1 for CPU nodes" >&2
    exit 2
fi

# A port from the job id: two jobs on one node would otherwise both take torchrun's default 29500.
launch_args=(--num_machines 1 --num_processes "$num_processes"
             --main_process_port $(( 20000 + SLURM_JOB_ID % 20000 )) --dynamo_backend no)
if (( num_processes > 1 )); then
    launch_args+=(--multi_gpu)
fi

echo "cityseg: job $SLURM_JOB_ID evaluating on $(hostname) with $num_processes process(es)"
# Since SLURM 22.05 srun no longer inherits --cpus-per-task from sbatch; pass it on for the data loaders.
srun_args=(--ntasks=1)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
srun "${srun_args[@]}" accelerate launch "${launch_args[@]}" -m cityseg evaluate "$@"
