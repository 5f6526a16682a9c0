#!/usr/bin/env bash
# FastWan distillation on a Slurm cluster: one torchrun per node, c10d rendezvous on the first node.
#
#   sbatch --nodes 8 --gpus-per-node 8 --time 48:00:00 scripts/slurm_distill.sh \
#       --config training/configs/wan_1_3b_480p.toml --output /shared/runs/fastwan_1_3b [--gpus-per-node 8] \
#       [--port 29500] [--rdzv-host HOST] [--set section.key=value ...]
#
# --output must be on a filesystem every node sees: every process writes its checkpoint shards there.
# Re-submitting the same command resumes from the run's latest checkpoint, on any number of nodes.
# Slurm sends SIGTERM 5 minutes before the time limit (--signal below): the trainer finishes its
# step, saves a checkpoint and exits.
#SBATCH --job-name=fastwan-distill
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@300
#SBATCH --output=fastwan-distill-%j.log
set -euo pipefail

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

config="" output="" gpus_per_node="${SLURM_GPUS_ON_NODE:-}" port=29500 rdzv_host="" extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="${2:?--config needs a TOML file}"; shift 2 ;;
        --output) output="${2:?--output needs a folder}"; shift 2 ;;
        --gpus-per-node) gpus_per_node="${2:?--gpus-per-node needs a number}"; shift 2 ;;
        --port) port="${2:?--port needs a number}"; shift 2 ;;
        --rdzv-host) rdzv_host="${2:?--rdzv-host needs a host name}"; shift 2 ;;
        --set) extra+=(--set "${2:?--set needs section.key=value}"); shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "slurm_distill.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

fail() { echo "slurm_distill.sh: $*" >&2; exit 2; }
[ -n "$config" ] || fail "--config is required (a TOML file such as training/configs/wan_1_3b_480p.toml)"
[ -f "$config" ] || fail "--config $config: no such file"
[ -n "$output" ] || fail "--output is required (the run folder, on a filesystem all nodes share)"
[ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a Slurm allocation: submit with sbatch (or run under salloc)"
[ -n "$gpus_per_node" ] || fail "--gpus-per-node is required when the job does not request --gpus-per-node"
case "$gpus_per_node" in ''|*[!0-9]*) fail "--gpus-per-node $gpus_per_node: give a whole number" ;; esac
nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
if [ -z "$rdzv_host" ]; then
    # sed reads the whole list: `head -n 1` could exit first and kill scontrol with SIGPIPE (pipefail)
    rdzv_host="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
fi
mkdir -p "$output" || fail "--output $output: cannot create it"

# -u: unbuffered, so the log shows each step as it happens; TOML string for the output folder.
output_toml="\"$(printf '%s' "$output" | sed 's/\\/\\\\/g; s/"/\\"/g')\""
echo "fastwan distill: $nodes node(s) x $gpus_per_node GPU(s), rendezvous $rdzv_host:$port, run folder $output"
exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "${PYTHON:-python}" -u -m torch.distributed.run \
        --nnodes "$nodes" --nproc_per_node "$gpus_per_node" \
        --rdzv_backend c10d --rdzv_endpoint "$rdzv_host:$port" --rdzv_id "$SLURM_JOB_ID" \
        -m fastwan.cli distill --config "$config" --set "train.output_dir=$output_toml" "${extra[@]}"
