#!/usr/bin/env bash
# Pretraining with the deepspeed launcher: run once, on the first host of the hostfile
# (it starts the other hosts over ssh).
#
#   HOSTFILE=hosts.txt NNODES=2 GPUS_PER_NODE=8 launch/deepspeed.sh main zero_stage=3
#
# hosts.txt holds one "hostname slots=8" line per node. Without HOSTFILE it runs on this node.
# Arguments: a train preset or YAML file, then key=value overrides (as for `bla train`).
# Environment: HOSTFILE, NNODES (1), GPUS_PER_NODE (visible GPUs), MASTER_ADDR, MASTER_PORT
# (29500), BLA_SEQUENCE_PARALLEL (1), BLA_GLOBAL_BATCH, BLA_LAUNCH_FLAGS.
# NCCL: see launch/slurm.sbatch; the deepspeed launcher forwards NCCL_* variables to all hosts.
set -euo pipefail
BLA="${BLA:-bla}"
FLAGS=(--launcher deepspeed --nodes "${NNODES:-1}" --master-port "${MASTER_PORT:-29500}"
       --sequence-parallel "${BLA_SEQUENCE_PARALLEL:-1}")
[ -n "${HOSTFILE:-}" ] && FLAGS+=(--hostfile "$HOSTFILE")
[ -n "${MASTER_ADDR:-}" ] && FLAGS+=(--master-addr "$MASTER_ADDR")
[ -n "${GPUS_PER_NODE:-}" ] && FLAGS+=(--gpus-per-node "$GPUS_PER_NODE")
[ -n "${BLA_GLOBAL_BATCH:-}" ] && FLAGS+=(--global-batch "$BLA_GLOBAL_BATCH")
# shellcheck disable=SC2206
[ -n "${BLA_LAUNCH_FLAGS:-}" ] && FLAGS+=(${BLA_LAUNCH_FLAGS})
exec $BLA launch "${FLAGS[@]}" "$@"
