#!/usr/bin/env bash
# GPU checks of the architecture reshaping (issue 14) and the measured memory peaks the estimator is tested
# against (issue 15), on the lent H200. Run from the repository root with .whl/ (megatron-core, hydra-core,
# omegaconf, antlr4, webdataset, braceexpand, soundfile, cffi, pycparser, av for Python 3.12) and .base/
# (the code before the reshaping: git archive 797351f) carried:
#   bash benchmarks/arch_check.sh proxy     # text proxy, this code and the code before, same call
#   bash benchmarks/arch_check.sh memory    # memory probes (packed path) + a shard-fed S3 run at 32,768
#   bash benchmarks/arch_check.sh sft       # SFT throughput on packed multimodal conversations: the trainer
#                                          # against transformers' Thinker, same conversations (.whl/ only)
#   bash benchmarks/arch_check.sh talker    # Talker training throughput at release width, ours vs transformers
#   bash benchmarks/arch_check.sh rollout   # on-policy distillation: rollout engine vs transformers' generate,
#                                          # and the real loop's step split (.whl/ only)
#   bash benchmarks/arch_check.sh rollout megatron --new-tokens 256 --samples 160
#                                          # the megatron backend beside the hf engine and transformers'
#                                          # generate on text prompts (rollout_throughput.py part 3)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-runs/arch_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, megatron.core as m; print("torch", torch.__version__, "transformers", transformers.__version__, "megatron-core", m.__version__)'
PROXY=(--seq-length 4096 --micro-batch 2 --steps 6 --layers 4 --warmup 3)
case "${1:-proxy}" in
  proxy)
    python3 benchmarks/thinker_throughput.py "${PROXY[@]}" --which ours_bf16,ours,hf_grouped_mm \
      --timeouts ours_bf16=240,ours=240,hf_grouped_mm=180 --json "$OUT/proxy_after.json" 2>&1 | tail -n 25
    (cd .base && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/thinker_throughput.py "${PROXY[@]}" \
      --which ours_bf16,ours --timeouts ours_bf16=240,ours=240 --json "$OUT/proxy_before.json" 2>&1 | tail -n 12)
    ;;
  memory)
    BASE=(model=qwen3_omni_30b_a3b model.thinker.towers=true model.thinker.num_layers=4 model.thinker.num_experts=32
          trainer.micro_batch_size=1 trainer.precision=bf16 trainer.max_steps=100 data=shards)
    probe() { timeout 240 python3 benchmarks/memory_probe.py "${BASE[@]}" "$@" --out "$OUT/memory_probe.jsonl" | tail -n 3; }
    probe stage=general_pretrain trainer.seq_length=8192 trainer.recompute=full --media audio
    probe stage=general_pretrain trainer.seq_length=8192 trainer.recompute=none --media image
    probe stage=audio_align trainer.seq_length=8192 trainer.recompute=full --media audio --phase encoder
    probe stage=long_context trainer.seq_length=32768 trainer.recompute=full --media audio
    probe stage=long_context trainer.seq_length=32768 trainer.recompute=full --media image
    # the real trainer on packed multimodal shards at 32,768 tokens (S3 recipe, 30B-A3B widths, 4 layers)
    python3 -m data_pipelines.cli synth-suite data/tiny_pretrain --samples 48 --workers 8 | tail -n 1
    S3=(recipe=tiny/long_context "${BASE[@]}" trainer.seq_length=32768 trainer.global_batch_size=1
        trainer.max_steps=4 init_from=null checkpoint.save_every=100 checkpoint.save_at_end=false
        run_dir=/tmp/s3_32k)
    timeout 200 python3 -m omni_train.train "${S3[@]}" dry_run=true dry_run_world_size=1 dry_run_gpu_memory_gb=141 \
      2>&1 | tail -n 30 | tee "$OUT/s3_32k_dry_run.txt"
    timeout 300 python3 -m omni_train.train "${S3[@]}" 2>&1 | tail -n 12
    cp /tmp/s3_32k/metrics.jsonl "$OUT/s3_32k_metrics.jsonl"
    ;;
  sft)
    # benchmarks/sft_throughput.py: synthetic SFT data, the trainer (recipe tiny/sft at the omni proxy's widths,
    # 8,192 tokens), then transformers on the same conversations; each part timed out on its own, all in 480 s
    python3 benchmarks/sft_throughput.py --json "$OUT/sft_throughput.json" --work-dir /tmp/sft_throughput
    mkdir -p "$OUT/sft_logs" && cp /tmp/sft_throughput/*.log "$OUT/sft_logs/"
    ;;
  rollout)
    timeout 585 python3 benchmarks/rollout_throughput.py --json "$OUT/rollout_throughput.json" ${2:+--parts $2} "${@:3}" \
      2>&1 | tail -n 80
    ;;
  talker)
    python3 benchmarks/talker_throughput.py --json "$OUT/talker_throughput.json" --log-dir "$OUT/talker_logs"
    ;;
esac
