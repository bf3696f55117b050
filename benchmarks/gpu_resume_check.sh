#!/usr/bin/env bash
# On one GPU: stop a tiny_gpu run at step 6 and resume it to 12, next to an uninterrupted 12-step run
# (distributed optimizer + dist_checkpointing over NCCL). Prints both runs' per-step loss and grad norm.
# EXTRA="optim.master_weights=false parallel.distributed_optimizer=false" bash benchmarks/gpu_resume_check.sh: the other layout.
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-runs/bench}
common="recipe=tiny/text_pretrain_gpu trainer.max_steps=12 trainer.log_every=1 trainer.seq_length=512 optim.warmup_steps=2 checkpoint.save_every=100 ${EXTRA:-}"
run() { torchrun --nproc_per_node 1 -m omni_train.train $common "$@" > "$OUT/$(basename "${@: -1}").log" 2>&1 || { tail -30 "$OUT/$(basename "${@: -1}").log"; exit 1; }; }
run run_dir=/tmp/resume_check/straight
run trainer.stop_at_step=6 run_dir=/tmp/resume_check/resumed
grep -E "saved|stopped" "$OUT/resumed.log"
run run_dir=/tmp/resume_check/resumed
grep -E "resumed|saved" "$OUT/resumed.log"
python3 - <<'PY'
import json
def load(p): return {r["step"]: r for r in map(json.loads, open(p))}
a, b = load("/tmp/resume_check/straight/metrics.jsonl"), load("/tmp/resume_check/resumed/metrics.jsonl")
for s in sorted(a):
    print(f"step {s:2d} loss straight {a[s]['loss']:.5f} resumed {b[s]['loss']:.5f} | "
          f"grad_norm {a[s]['grad_norm']:.4f} {b[s]['grad_norm']:.4f}")
PY
