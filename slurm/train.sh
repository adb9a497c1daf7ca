#!/bin/bash
# Train cityseg on one or more SLURM nodes: srun starts one training process per GPU (no launcher agent in
# between), each told its rank by SLURM. Submit from the repository root:
#
#   sbatch --nodes=2 slurm/train.sh --config configs/demo.yaml train.max_steps=2000
#
# Everything after the script name goes to train.py unchanged. Options on the sbatch command line override the
# #SBATCH lines below; launch/submit.py validates the config first. Guide: docs/slurm.md.
#
#SBATCH --job-name=cityseg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4         # one training process per GPU (keep equal to --gpus-per-node)
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8           # for the data-loader workers of each process
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out     # %x = job name, %j = job id (logs/ ships with the repository)
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append          # a requeued job keeps its id and writes on in the same files
#SBATCH --signal=B:USR1@300         # 5 min before the time limit: checkpoint, requeue
#SBATCH --requeue                   # a node failure requeues the job; so may this script (exit 75 below)

set -euo pipefail
say() { echo "cityseg $(date '+%F %T'): $*"; }

# --- stop signals ---------------------------------------------------------------------------------
# USR1 (--signal=B:USR1@300, or PreemptParameters=send_user_signal) and SIGTERM (scancel --signal=TERM --full)
# reach this shell. Training stops on either at the end of its step, checkpoints and exits 75. It is passed on
# as USR1 to srun, which forwards it to every task: srun turns a SIGTERM it receives into SIGKILL for all tasks
# ("srun: forcing job termination"), which is also why srun runs outside this shell's process tree (below).
# Repeated every 5 s: a process still importing ignores it until its handler is in place.
srun_pid=
stop_signal=
forwarder_pid=
forward_stop_until_srun_ends() {
    ( while [[ -n $srun_pid ]] && kill -0 "$srun_pid" 2>/dev/null; do
          kill -USR1 "$srun_pid" 2>/dev/null || true
          sleep 5 || true
      done ) &
    forwarder_pid=$!
}
on_stop_signal() {
    if [[ -n $stop_signal ]]; then return; fi
    stop_signal=$1
    say "$1 received (time limit, preemption or scancel): training checkpoints at the end of its step and stops"
    if [[ -n $srun_pid ]]; then forward_stop_until_srun_ends; fi
}
trap 'on_stop_signal USR1' USR1
trap 'on_stop_signal SIGTERM' TERM

# sbatch runs a copy of this file from a spool dir; the repository is where sbatch was called.
cd "${SLURM_SUBMIT_DIR:?run this with sbatch from the repository root}"
source slurm/env.sh

# --- sweeps (launch/submit.py --sweep): task N of the job array appends line N+1 of the sweep file --------
# (tab-separated overrides: its own name, output_dir and W&B group); a requeued task keeps its index.
if [[ -n "${CITYSEG_SWEEP_FILE:-}" ]]; then
    task_line=$(sed -n "$(( ${SLURM_ARRAY_TASK_ID:?CITYSEG_SWEEP_FILE is for job arrays (sbatch --array)} + 1 ))p" \
                "$CITYSEG_SWEEP_FILE")
    if [[ -z $task_line ]]; then
        echo "cityseg: $CITYSEG_SWEEP_FILE has no line for array task $SLURM_ARRAY_TASK_ID" >&2
        exit 2
    fi
    IFS=$'\t' read -r -a sweep_overrides <<< "$task_line"
    set -- "$@" "${sweep_overrides[@]}"
    say "sweep task $SLURM_ARRAY_TASK_ID of array $SLURM_ARRAY_JOB_ID: ${sweep_overrides[*]}"
fi

# --- processes -----------------------------------------------------------------------------------
# One per GPU; on CPU-only nodes (ACCELERATE_USE_CPU=1) one gloo process per node.
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
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${hosts%%$'\n'*}   # rank 0 runs on the first node of the allocation
export LOCAL_WORLD_SIZE=$procs_per_node
max_restarts=${CITYSEG_MAX_RESTARTS:-2}
step_end_limit=${CITYSEG_STEP_END_LIMIT_S:-15}  # after a task failed, how long srun may wait for the others
if ! [[ $max_restarts =~ ^[0-9]+$ ]]; then
    echo "cityseg: CITYSEG_MAX_RESTARTS=$max_restarts: expected a whole number (0 = never restart)" >&2
    exit 2
fi

# --- files this script and the training share ---------------------------------------------------
# CITYSEG_REQUEUE_FILE appears once a preemption checkpoint is complete (exists <=> requeue);
# CITYSEG_STEP_FILE holds the last finished step (exists <=> the attempt got past its first step).
log_dir=$(realpath -m "${CITYSEG_LOG_DIR:-logs}")
mkdir -p "$log_dir"
state="$log_dir/.cityseg-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
export CITYSEG_REQUEUE_FILE="$state.requeue"
export CITYSEG_STEP_FILE="$state.step"

say "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: $SLURM_NNODES node(s) x" \
    "$procs_per_node process(es), rendezvous at $MASTER_ADDR; in-job restarts allowed: $max_restarts"
if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then
    say "requeued run; train.resume=auto picks up the newest checkpoint in output_dir"
fi

# --- one training attempt: srun starts every process itself ---------------------------------------
# Each task picks the interface that routes to the rendezvous host (cityseg.distributed.netif; CITYSEG_SOCKET_IFNAME
# overrides): gloo and NCCL would otherwise use the address of the machine's hostname, often 127.0.0.1.
# `trap "" USR1 TERM` keeps a signal from killing a process still importing; train.py installs its handlers.
# Since SLURM 22.05 srun no longer inherits --cpus-per-task; --kill-on-bad-exit: one rank failing stops all.
task='trap "" USR1 TERM
      ifname=$(python -m cityseg.distributed.netif "$MASTER_ADDR") || exit 2
      export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$ifname} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$ifname}
      export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
      echo "cityseg: rank $RANK of $WORLD_SIZE on $SLURMD_NODENAME, interface $GLOO_SOCKET_IFNAME"
      exec python train.py "$@"'
srun_args=(--nodes="$SLURM_NNODES" --ntasks-per-node="$procs_per_node" --ntasks=$(( SLURM_NNODES * procs_per_node ))
           --kill-on-bad-exit=1)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi

end_stuck_step() {  # end_stuck_step ERR_FILE: srun outlived its failed tasks; the hosts it still waits for are lost
    local host silent=()
    for host in $hosts; do
        grep -q -E "^srun: error: $host: task" "$1" 2>/dev/null || silent+=("$host")
    done
    say "lost host(s): ${silent[*]:-unknown}: no word from their tasks ${step_end_limit} s after the first task" \
        "failed (CITYSEG_STEP_END_LIMIT_S); ending the step"
    kill -KILL "$srun_pid" 2>/dev/null || true
    for step in $(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -E '\.[0-9]+$' || true); do
        scancel --signal=KILL "$step" 2>/dev/null || true
    done
    cause="lost host(s) ${silent[*]:-unknown}"
}

run_attempt() {  # run_attempt N: sets $status (srun's exit code) and $cause (srun's report of the first failure)
    local attempt=$1 exit_file="$state.exit" err_file="$state.err" pid_file="$state.pid"
    shift
    rm -f "$exit_file" "$err_file" "$pid_file" "$CITYSEG_REQUEUE_FILE" "$CITYSEG_STEP_FILE"
    cause=
    export MASTER_PORT=$(( 20000 + (SLURM_JOB_ID * 8 + attempt) % 40000 ))  # a fresh port per attempt
    local step_args=("${srun_args[@]}")
    # A restart after a lost host: SLURM still counts the lost step's tasks on that host until it hears of
    # their end, which a power-cycled host never sends; --overlap lets the new step use those resources.
    if (( attempt > 0 )); then step_args+=(--overlap); fi
    # setsid -f: srun leaves this shell's process tree, so a signal for the batch step (scancel --full,
    # with proctrack/linuxproc) reaches this shell only, never srun; srun's stderr is also kept for $cause.
    setsid -f bash -c 'srun "${@:4}" 2> >(tee "$2" >&2) & echo $! > "$3"; wait $!; echo $? > "$1"' \
        wrapper "$exit_file" "$err_file" "$pid_file" "${step_args[@]}" bash -c "$task" task "$@"
    while [[ ! -s $pid_file ]]; do sleep 0.2 || true; done
    srun_pid=$(cat "$pid_file")
    if [[ -n $stop_signal ]]; then forward_stop_until_srun_ends; fi
    local first_exit=
    while [[ ! -s $exit_file ]] && kill -0 "$srun_pid" 2>/dev/null; do
        sleep 1 || true
        # A host that lost power never reports its tasks' end and srun waits for it forever: once a task has
        # failed, give the step a bounded time to end, then name the silent host(s) and end the step ourselves.
        if [[ -z $first_exit ]] && grep -q -E '^srun: error: .*task [0-9]+: ' "$err_file" 2>/dev/null; then
            first_exit=$SECONDS
        fi
        if [[ -n $first_exit ]] && (( SECONDS - first_exit > step_end_limit )); then
            end_stuck_step "$err_file"
            break
        fi
    done
    sleep 0.5 || true  # the wrapper writes the exit code right after srun ends
    status=$(cat "$exit_file" 2>/dev/null || echo 1)
    srun_pid=
    if [[ -n $forwarder_pid ]]; then kill "$forwarder_pid" 2>/dev/null || true; forwarder_pid=; fi
    [[ -z ${cause:-} ]] || return 0
    cause=$(grep -m1 -E 'srun: error: .*(task [0-9]+|Node failure)' "$err_file" 2>/dev/null | sed 's/^srun: error: //' || true)
    cause=${cause:-exit code $status}
}

attempt=0
while true; do
    run_attempt "$attempt" "$@"
    if [[ -f $CITYSEG_REQUEUE_FILE ]]; then
        say "checkpoint $(cat "$CITYSEG_REQUEUE_FILE") complete; requeueing job $SLURM_JOB_ID"
        rm -f "$state".*
        # Ends this script: SLURM stops the job and queues it again under the same id (SLURM_RESTART_COUNT+1).
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            say "scontrol requeue failed (job cancelled?); the same sbatch command resumes from the checkpoint"
            exit 75
        fi
        exit 0
    fi
    if (( status == 0 )) || [[ -n $stop_signal ]]; then
        break
    fi
    if [[ ! -f $CITYSEG_STEP_FILE ]]; then
        say "training failed before its first step (exit $status: $cause): a config, data or environment" \
            "error, not retried"
        break
    fi
    if (( attempt >= max_restarts )); then
        say "training failed (exit $status: $cause) and all $max_restarts in-job restarts are used" \
            "(CITYSEG_MAX_RESTARTS): job failed, not requeued"
        break
    fi
    attempt=$(( attempt + 1 ))
    say "restart $attempt of $max_restarts inside the allocation after a failure at step" \
        "$(cat "$CITYSEG_STEP_FILE") ($cause): resuming from the last checkpoint"
done
rm -f "$state".*
say "training ended with exit code $status"
exit "$status"
