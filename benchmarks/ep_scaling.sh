#!/usr/bin/env bash
# Expert parallelism on 2 GPUs with the GPU proxy model (30B-A3B Thinker width, 4 layers, seq 4096,
# bf16, no master weights), against one GPU: loss parity (alltoall and allgather dispatchers), a save at
# ep=2 resumed at ep=1, and weak scaling. Run from the repository root on a 2-GPU machine:
#   bash benchmarks/ep_scaling.sh            ($OUT receives the runs' metrics and ep_scaling.json)
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-runs/ep_scaling}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
MODEL=$(python3 - <<'PY'
import sys; sys.path.insert(0, "benchmarks")
import throughput_variants as t
spec = dict(tiny=False, layers=4, seq_length=4096)
print(" ".join(o.replace(", ", ",") for o in t.lm_overrides(spec)))
PY
)
COMMON="recipe=tiny/text_pretrain_gpu model=qwen3_omni_30b_a3b $MODEL logger=none trainer.seq_length=4096
 trainer.micro_batch_size=2 optim.master_weights=false parallel.distributed_optimizer=false
 optim.warmup_steps=0 optim.lr_decay=constant optim.lr=3e-4 checkpoint.save_at_end=false"
run() {  # name nproc overrides...
  local name=$1 nproc=$2; shift 2
  echo "== $name ($nproc GPU): $*"
  torchrun --nproc_per_node "$nproc" -m omni_train.train $COMMON run_dir=$OUT/$name "$@" > "$OUT/$name.log" 2>&1 \
    || { tail -30 "$OUT/$name.log"; return 1; }
  tail -2 "$OUT/$name.log"
}
# parity: the same global batch of 4 sequences per step, 20 steps, every step logged
run ep1 1 trainer.global_batch_size=4 trainer.max_steps=20 trainer.log_every=1 checkpoint.save_every=1000
run ep2_alltoall 2 parallel.ep=2 trainer.global_batch_size=4 trainer.max_steps=20 trainer.log_every=1 \
  checkpoint.save_every=10 parallel.token_dispatcher=alltoall
run ep2_allgather 2 parallel.ep=2 trainer.global_batch_size=4 trainer.max_steps=20 trainer.log_every=1 \
  checkpoint.save_every=1000 parallel.token_dispatcher=allgather
# resharding: the ep=2 run's step-10 checkpoint, resumed on one GPU at ep=1 for steps 11-20
mkdir -p "$OUT/reshard/checkpoints" && cp -r "$OUT/ep2_alltoall/checkpoints/step_00000010" "$OUT/reshard/checkpoints/"
run reshard 1 trainer.global_batch_size=4 trainer.max_steps=20 trainer.log_every=1 checkpoint.save_every=1000
# weak scaling: 2 sequences of 4,096 tokens per GPU per step, 30 steps, throughput over steps 11-30
run scale1 1 trainer.global_batch_size=2 trainer.max_steps=30 trainer.log_every=10 checkpoint.save_every=1000
run scale2 2 parallel.ep=2 trainer.global_batch_size=4 trainer.max_steps=30 trainer.log_every=10 \
  checkpoint.save_every=1000
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(name):
    return [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
loss = {n: {r["step"]: r["loss"] for r in rows(n)} for n in ("ep1", "ep2_alltoall", "ep2_allgather", "reshard")}
def worst(a, b, steps):
    return max(abs(loss[a][s] - loss[b][s]) / abs(loss[b][s]) for s in steps)
tps = {n: [r["tokens_per_s"] for r in rows(n)][1:] for n in ("scale1", "scale2")}
report = dict(
    losses=loss,
    max_rel_diff_ep2_alltoall_vs_ep1=worst("ep2_alltoall", "ep1", range(1, 21)),
    max_rel_diff_ep2_allgather_vs_ep1=worst("ep2_allgather", "ep1", range(1, 21)),
    max_rel_diff_allgather_vs_alltoall=worst("ep2_allgather", "ep2_alltoall", range(1, 21)),
    max_rel_diff_reshard_ep1_vs_ep2=worst("reshard", "ep2_alltoall", range(11, 21)),
    tokens_per_s=tps,
    weak_scaling_efficiency=(sum(tps["scale2"]) / len(tps["scale2"]) / 2) / (sum(tps["scale1"]) / len(tps["scale1"])),
)
(out / "ep_scaling.json").write_text(json.dumps(report, indent=1))
print(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=1))
PY
