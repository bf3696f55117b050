#!/usr/bin/env bash
# Single-node launcher: every argument is a Hydra override.
#   NPROC=8 launch/torchrun.sh recipe=tiny/text_pretrain_gpu parallel.ep=8
# is `omni-train launcher=torchrun launcher.nproc_per_node=8 ...` (omni_train/launch/torchrun.py).
# NPROC defaults to the number of visible GPUs (1 process on a CPU-only machine). Each process gets an
# equal share of the CPU threads unless OMP_NUM_THREADS is set.
set -euo pipefail
exec python -m omni_train.train launcher=torchrun ${NPROC:+launcher.nproc_per_node=$NPROC} "$@"
