#!/usr/bin/env bash
# Pretraining with torchrun: run this once on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 launch/torchrun.sh main zero_stage=2
#
# Arguments: a train preset or YAML file, then key=value overrides (as for `bla train`).
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (node rank 0's address; needed for NNODES > 1,
# loopback on one node), MASTER_PORT (29500),
# GPUS_PER_NODE (visible GPUs), BLA_SEQUENCE_PARALLEL (1), BLA_GLOBAL_BATCH, BLA_LAUNCH_FLAGS.
# NCCL: see launch/slurm.sbatch for the settings clusters commonly need.
set -euo pipefail
BLA="${BLA:-bla}"
FLAGS=(--launcher torchrun --nodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --master-port "${MASTER_PORT:-29500}"
       --sequence-parallel "${BLA_SEQUENCE_PARALLEL:-1}")
[ -n "${MASTER_ADDR:-}" ] && FLAGS+=(--master-addr "$MASTER_ADDR")
[ -n "${GPUS_PER_NODE:-}" ] && FLAGS+=(--gpus-per-node "$GPUS_PER_NODE")
[ -n "${BLA_GLOBAL_BATCH:-}" ] && FLAGS+=(--global-batch "$BLA_GLOBAL_BATCH")
# shellcheck disable=SC2206
[ -n "${BLA_LAUNCH_FLAGS:-}" ] && FLAGS+=(${BLA_LAUNCH_FLAGS})
exec $BLA launch "${FLAGS[@]}" "$@"
