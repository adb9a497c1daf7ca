# Sourced by slurm/train.sh and slurm/eval.sh on the batch node before anything runs.
# The one place for your cluster's environment: modules, the Python environment, NCCL settings.
# srun passes this environment on to every node, so it is set up once here.

# --- modules (names differ per cluster; see `module avail`) ---
# module purge
# module load cuda/12.4 gcc/12

# --- Python environment ---
# sbatch already copies your submitting shell's environment (an activated venv included);
# otherwise use the repository's .venv when there is one.
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi
# source ~/miniforge3/etc/profile.d/conda.sh && conda activate cityseg

# --- network ---
# slurm/train.sh sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on every node to the interface that routes to
# the rendezvous host (rank 0's node). Name it yourself when that guess is wrong (e.g. IPoIB over Ethernet):
# export CITYSEG_SOCKET_IFNAME=ib0
# albumentations asks PyPI for its latest version at import, in every process: compute nodes are often offline.
export NO_ALBUMENTATIONS_UPDATE=1

# --- NCCL (multi-node GPU) ---
# export NCCL_DEBUG=WARN                 # INFO when a rendezvous or collective hangs
# export NCCL_IB_DISABLE=1               # only if InfiniBand is broken or absent

# --- CPU-only nodes ---
# export ACCELERATE_USE_CPU=1            # one gloo process per node instead of one per GPU

# --- Weights & Biases ---
# export WANDB_MODE=offline              # compute nodes without internet; `wandb sync` later
