#!/usr/bin/env bash
# One node's launch of a multi-node run: `srun` starts this once per node (train.sbatch), and it starts
# GPUS_PER_NODE training processes through `accelerate launch`. Everything it needs comes from SLURM's variables,
# so it can also be run by hand (the tests run it twice on one host as 2 "nodes" x 1 process):
#   SLURM_NODEID=0 SLURM_JOB_NUM_NODES=2 SLURM_JOB_NODELIST=localhost GPUS_PER_NODE=1 \
#     bash scripts/slurm/launch.sh RECIPE [--key value ...]     (and the same with SLURM_NODEID=1)
# Variables: SLURM_NODEID (this node's index; SLURM_PROCID with one task per node), SLURM_JOB_NUM_NODES,
# SLURM_JOB_NODELIST (node 0 is its first host), GPUS_PER_NODE (default 8), MAIN_PORT (default 29500),
# ACCELERATE_CONFIG (default multi-node), ACCELERATE (the accelerate command, default `accelerate`), ENTRY (what
# each process runs, default `-m adapters`).
set -euo pipefail

NODE_RANK=${SLURM_NODEID:-${SLURM_PROCID:?run under srun, or set SLURM_NODEID}}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?set SLURM_JOB_NUM_NODES}}
NODELIST=${SLURM_JOB_NODELIST:?set SLURM_JOB_NODELIST}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PORT=${MAIN_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-multi-node}

# Node 0 is the first host of the job: scontrol expands SLURM's compressed list (node[01-04,07]); without it,
# take the first entry and the first number of its range.
if command -v scontrol >/dev/null 2>&1; then
  MAIN_ADDR=$(scontrol show hostnames "$NODELIST" | head -n 1)
else
  first=${NODELIST%%,*}
  if [[ $first == *"["* ]]; then
    range=${first#*[}
    range=${range%%]*}
    first=${first%%[*}${range%%-*}
  fi
  MAIN_ADDR=$first
fi
[[ -f $ACCELERATE_CONFIG ]] || ACCELERATE_CONFIG=adapters/accelerate_configs/${ACCELERATE_CONFIG%.yaml}.yaml

echo "[slurm] node ${NODE_RANK}/${NNODES} on $(hostname): ${GPUS_PER_NODE} process(es), main ${MAIN_ADDR}:${MAIN_PORT}" >&2
exec ${ACCELERATE:-accelerate} launch --config_file "$ACCELERATE_CONFIG" \
  --num_machines "$NNODES" --num_processes $((NNODES * GPUS_PER_NODE)) \
  --machine_rank "$NODE_RANK" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
  ${ENTRY:--m adapters} train "$@"
