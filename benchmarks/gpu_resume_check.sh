#!/usr/bin/env bash
# On one GPU: stop a tiny_gpu run at step 6 and resume it to 12, next to an uninterrupted 12-step run
# (distributed optimizer + dist_checkpointing on NCCL). Prints both runs' per-step losses.
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-runs/bench}
common="recipe=tiny/text_pretrain_gpu trainer.max_steps=12 trainer.log_every=1 trainer.seq_length=512 optim.warmup_steps=2 checkpoint.save_every=100"
torchrun --nproc_per_node 1 -m omni_train.train $common run_dir=/tmp/resume_check/straight > /dev/null 2>&1
torchrun --nproc_per_node 1 -m omni_train.train $common run_dir=/tmp/resume_check/resumed trainer.stop_at_step=6 2>&1 | grep -E "saved|stopped"
torchrun --nproc_per_node 1 -m omni_train.train $common run_dir=/tmp/resume_check/resumed 2>&1 | grep -E "resumed|saved"
python3 - <<'PY'
import json
def load(p): return {r["step"]: r["loss"] for r in map(json.loads, open(p))}
a = load("/tmp/resume_check/straight/metrics.jsonl"); b = load("/tmp/resume_check/resumed/metrics.jsonl")
for s in sorted(a):
    print(f"step {s:2d} straight {a[s]:.6f} resumed {b.get(s, float('nan')):.6f} diff {abs(a[s] - b.get(s, 0)):.2e}")
PY
