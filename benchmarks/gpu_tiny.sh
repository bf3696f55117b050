#!/usr/bin/env bash
# The GPU-sized tiny recipe on one GPU: bf16, NCCL, megatron-core's distributed optimizer.
# On the lent GPU machine (no package index there), megatron-core and hydra travel as wheels in .whl/:
#   bash benchmarks/gpu_tiny.sh            (run from the repository root; $OUT receives metrics)
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-runs/bench}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'
export PYTHONUNBUFFERED=1
torchrun --nproc_per_node 1 -m omni_train.train recipe=tiny/text_pretrain_gpu run_dir=$OUT/tiny_gpu "$@"
python3 benchmarks/summarize.py $OUT/tiny_gpu/metrics.jsonl
