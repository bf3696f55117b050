"""One GSPO step on the GPU proxy, through the real trainer: its time split (sync / generate / rewards /
old log-probabilities / updates) from metrics.jsonl.

    python3 benchmarks/gspo_step.py --json runs/gspo_step.json            # H200: the proxy, bf16
    python3 benchmarks/gspo_step.py --smoke --json /tmp/gspo_smoke.json   # CPU: the tiny model, a minute

The proxy: Qwen3-Omni-30B-A3B's Thinker at full width with ``--layers`` layers and its towers, bf16
parameters, fed the toy task of recipes/tiny/gspo.yaml ("say the digit N": text, audio and image prompts,
rule reward); ``--prompts`` x ``--n`` responses of up to ``--new-tokens`` tokens per step (sampling never
stops early on a fresh model, so every response is that long), ``--minibatches`` updates per step, old
log-probabilities recomputed (one forward without gradient over the batch). Reported per step: the
loop's own fields (rollout_sync_ms, rollout_generate_s, old_logprobs_s, reward_wait_s, plan_time_s,
update_time_s, step_time_s, rollout_tokens_per_s, logprob_mismatch(_max), ratio_first, peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("rollout_sync_ms", "rollout_generate_s", "old_logprobs_s", "reward_wait_s", "plan_time_s",
          "update_time_s", "step_time_s", "updates", "rollout_tokens_per_s", "response_length", "reward",
          "logprob_mismatch", "logprob_mismatch_max", "ratio_first", "ratio", "clipped", "entropy",
          "tokens_per_s", "peak_memory_gib", "prompts_text", "prompts_audio", "prompts_image")


def overrides(args, data_dir: Path, run_dir: Path) -> list:
    o = ["recipe=tiny/gspo", "init_from=null", f"run_dir={run_dir}", "logger=none",
         f"data.datasets=[{{path: {data_dir / 'gspo'}, weight: 1.0}}]", f"data.tokenizer={data_dir / 'tokenizer'}",
         f"stage.rollout.prompts_per_step={args.prompts}", f"stage.rollout.sampling.n={args.n}",
         f"stage.rollout.sampling.max_new_tokens={args.new_tokens}", "stage.rollout.max_prompt_tokens=512",
         f"stage.gspo.minibatches={args.minibatches}", f"trainer.seq_length={args.seq_length}",
         "trainer.micro_batch_size=1", f"trainer.global_batch_size={args.prompts}", f"trainer.max_steps={args.steps}",
         "trainer.log_every=1", "checkpoint.save_at_end=false", "checkpoint.save_every=100000",
         "optim.warmup_steps=0", "optim.lr_decay=constant", "optim.lr=1e-6", "optim.min_lr=1e-7",
         "model.thinker.aux_loss_coeff=0"]
    if args.smoke:
        return o + ["trainer.device=cpu", "trainer.precision=fp32"]
    return o + ["model=qwen3_omni_30b_a3b", "model.thinker.towers=true", f"model.thinker.num_layers={args.layers}",
                "trainer.device=cuda", "trainer.precision=bf16", "optim.master_weights=false",
                "parallel.distributed_optimizer=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=128, help="synthetic prompts")
    parser.add_argument("--timeout", type=int, default=540)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.n, args.new_tokens, args.samples, args.seq_length, args.steps = 4, 4, 8, 16, 1024, 2
    data_dir = Path(tempfile.mkdtemp()) / "data"
    subprocess.run([sys.executable, "-m", "data_pipelines.cli", "synth-suite", str(data_dir), f"gspo={args.samples}",
                    "--workers", "2" if args.smoke else "8"], cwd=REPO, check=True, capture_output=True)
    run_dir = Path(tempfile.mkdtemp()) / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "omni_train.train", *overrides(args, data_dir, run_dir)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=args.timeout)
    records = []
    if (run_dir / "metrics.jsonl").exists():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "returncode": proc.returncode,
              "wall_s": time.perf_counter() - start,
              "steps": [{k: r.get(k) for k in ("step",) + FIELDS} for r in records]}
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-3000:]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    for step in result["steps"]:
        print(json.dumps(step))
    if proc.returncode != 0:
        print(proc.stderr[-3000:])


if __name__ == "__main__":
    main()
