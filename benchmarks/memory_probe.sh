#!/usr/bin/env bash
# benchmarks/memory_probe.py on the lent GPU machine: measured vs estimated memory of one Thinker step
# (30B-A3B widths and towers, 4 LM layers, 32 experts so that one GPU holds every state) for the cases
# the 30B recipes rely on. Run from the repository root; results are appended to $OUT/memory_probe.jsonl.
#   bash benchmarks/memory_probe.sh [first|second]
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-runs/memory_probe}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, megatron.core as m; print("torch", torch.__version__, "transformers", transformers.__version__, "megatron-core", m.__version__)'
BASE=(model=qwen3_omni_30b_a3b model.thinker.towers=true model.thinker.num_layers=4 model.thinker.num_experts=32
      trainer.micro_batch_size=1 trainer.precision=bf16 trainer.max_steps=100 data=shards)
probe() { timeout 300 python3 benchmarks/memory_probe.py "${BASE[@]}" "$@" --out "$OUT/memory_probe.jsonl" | tail -n 40; }
case "${1:-first}" in
  first)
    python3 benchmarks/memory_probe.py --sdpa --out "$OUT/memory_probe.jsonl"
    probe stage=general_pretrain trainer.seq_length=8192 trainer.recompute=full --media audio
    probe stage=general_pretrain trainer.seq_length=8192 trainer.recompute=full --media image
    probe stage=general_pretrain trainer.seq_length=8192 trainer.recompute=none --media audio
    ;;
  second)
    probe stage=general_pretrain trainer.seq_length=8192 trainer.recompute=none --media image
    probe stage=audio_align trainer.seq_length=8192 trainer.recompute=full --media audio --phase encoder
    probe stage=long_context trainer.seq_length=32768 trainer.recompute=full --media audio
    ;;
esac
