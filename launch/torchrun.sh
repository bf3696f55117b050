#!/usr/bin/env bash
# Single-node launcher: every argument is a Hydra override.
#   NPROC=8 launch/torchrun.sh recipe=tiny/text_pretrain_gpu parallel.ep=8
# NPROC defaults to the number of visible GPUs (1 process on a CPU-only machine). Each process gets an
# equal share of the CPU threads.
set -euo pipefail
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
procs=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / procs > 0 ? $(nproc) / procs : 1 ))}
exec torchrun --standalone --nproc_per_node "$procs" -m omni_train.train "$@"
