#!/bin/bash
# Train cityseg on one or more SLURM nodes with accelerate. Submit from the repository root:
#
#   mkdir -p logs && sbatch --nodes=2 slurm/train.sh --config configs/demo.yaml train.max_steps=2000
#
# Everything after the script name goes to train.py unchanged. Options on the sbatch command line
# override the #SBATCH lines below. launch/submit.py validates the config first and does all of this.
#
#SBATCH --job-name=cityseg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1         # one `accelerate launch` per node; it starts one process per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32          # for every data-loader worker of the node's processes
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out     # %x = job name, %j = job id; logs/ must exist before sbatch
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append          # a requeued job keeps the same id and writes on in the same files
#SBATCH --signal=B:USR1@300         # 5 min before the time limit, signal this script (B: = batch shell only)
#SBATCH --requeue                   # allow `scontrol requeue` (below) to put the job back in the queue

set -euo pipefail
say() { echo "cityseg $(date '+%F %T'): $*"; }

# --- the time-limit / preemption signal --------------------------------------------------------
# --signal=B:USR1 reaches only this shell (so do preemption signals). It is passed on with
# `scancel --signal=USR1 <job>`, which signals the processes of the job steps (the launcher and the
# training processes on every node) but not this shell. Training processes that are still starting
# up ignore USR1 until they install their handler, so it is repeated every 5 s until srun ends;
# a repeat only sets the training's stop flag again. Trapped from the first line: bash's default
# for USR1 is to die, and a signal may come before training has even started.
srun_pid=
forwarder_pid=
stop_requested=0
forward_usr1_until_srun_ends() {
    ( while kill -0 "$srun_pid" 2>/dev/null; do
          scancel --signal=USR1 "$SLURM_JOB_ID" || true
          sleep 5
      done ) &
    forwarder_pid=$!
}
on_usr1() {
    say "USR1 received (time limit or preemption): asking training to checkpoint and stop"
    if (( stop_requested )); then return; fi
    stop_requested=1
    if [[ -n "$srun_pid" ]]; then forward_usr1_until_srun_ends; fi
}
trap on_usr1 USR1

# sbatch runs a copy of this file from a spool dir; the repository is where sbatch was called.
cd "${SLURM_SUBMIT_DIR:?run this with sbatch from the repository root}"
source slurm/env.sh

# --- how many processes ------------------------------------------------------------------
# One per GPU; on CPU-only nodes one gloo process per node (`accelerate launch --cpu` would start
# only one process in total, hence ACCELERATE_USE_CPU=1 with the multi-process launcher instead).
if [[ "${ACCELERATE_USE_CPU:-0}" =~ ^(1|true|True|TRUE|yes)$ ]]; then
    procs_per_node=1
elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    procs_per_node=$SLURM_GPUS_ON_NODE
else
    procs_per_node=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if (( procs_per_node < 1 )); then
    echo "cityseg: no GPU on $(hostname): ask for --gpus-per-node, or export ACCELERATE_USE_CPU=1 for CPU nodes" >&2
    exit 2
fi
num_processes=$(( SLURM_NNODES * procs_per_node ))

# --- rendezvous ----------------------------------------------------------------------------
# Rank 0 lives on the first node of the allocation. The port comes from the job id, so two jobs
# sharing a node do not collide, and a requeued job (same id) uses the same one again.
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
main_ip=${hosts%%$'\n'*}
main_port=$(( 20000 + SLURM_JOB_ID % 20000 ))
launch_args=(--num_machines "$SLURM_NNODES" --num_processes "$num_processes"
             --main_process_ip "$main_ip" --main_process_port "$main_port" --dynamo_backend no)
if (( num_processes > 1 )); then
    launch_args+=(--multi_gpu)
fi

# --- requeue hand-shake --------------------------------------------------------------------
# On USR1/TERM the training processes checkpoint and exit; accelerate turns their exit code into 1,
# so the main process writes this file instead once the checkpoint is complete. It exists <=> requeue.
log_dir=$(realpath -m "${CITYSEG_LOG_DIR:-logs}")
mkdir -p "$log_dir"
export CITYSEG_REQUEUE_FILE="$log_dir/requeue-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
rm -f "$CITYSEG_REQUEUE_FILE"

say "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
    "$SLURM_NNODES node(s) x $procs_per_node process(es), rank 0 at $main_ip:$main_port"
if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then
    say "requeued run; train.resume=auto picks up the newest checkpoint in output_dir"
fi

# --- launch: one task per node -------------------------------------------------------------
# The single quotes matter: $SLURM_NODEID must be expanded by the bash on each node, not here
# (expanded here, every node would claim machine rank 0 and the rendezvous would hang).
# `trap "" USR1` makes the launcher ignore USR1 (Python's default for it is to die); the training
# processes inherit the ignore but install their own handler, which replaces it.
# Since SLURM 22.05 srun no longer inherits --cpus-per-task from sbatch: without it the data loaders
# of a node would share one core. --kill-on-bad-exit: one node failing stops the others (no hang).
srun_args=(--ntasks-per-node=1 --kill-on-bad-exit=1)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
srun "${srun_args[@]}" \
    bash -c 'trap "" USR1
             echo "cityseg: node $SLURMD_NODENAME is machine rank $SLURM_NODEID of $SLURM_NNODES"
             exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' launcher \
    "${launch_args[@]}" train.py "$@" &
srun_pid=$!
if (( stop_requested )); then forward_usr1_until_srun_ends; fi

# A trapped signal makes `wait` return early; keep waiting until srun itself has ended.
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" || true
done
status=0
wait "$srun_pid" || status=$?
if [[ -n "$forwarder_pid" ]]; then kill "$forwarder_pid" 2>/dev/null || true; fi

if [[ -f "$CITYSEG_REQUEUE_FILE" ]]; then
    say "checkpoint $(cat "$CITYSEG_REQUEUE_FILE") complete; requeueing job $SLURM_JOB_ID"
    rm -f "$CITYSEG_REQUEUE_FILE"
    # Ends this script: SLURM stops the job and queues it again under the same id (SLURM_RESTART_COUNT+1).
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        say "scontrol requeue failed; resubmit by hand, training resumes from the checkpoint"
        exit 1
    fi
    exit 0
fi
say "training ended with exit code $status"
exit "$status"
