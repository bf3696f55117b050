"""On-policy distillation on one GPU: the rollout engine's throughput against transformers' plain `generate`
on the same model and prompts, and the real loop's step split (sync / generate / teacher / update).

On the lent H200, from the repository root with .whl/ carried (about 6-8 minutes):
    bash benchmarks/arch_check.sh rollout
On a CPU, to check the logic end to end (tiny_omni, 4 prompts x 2 samples x 8 new tokens; ~2 minutes):
    python benchmarks/rollout_throughput.py --smoke --json /tmp/rollout_smoke.json

Parts:
1. data: ``python -m data_pipelines.cli synth-suite DIR sft=N`` (text, audio, image, video, mixed prompts).
2. engine, in this process: the student of ``recipes/tiny/distill_onpolicy.yaml`` at the omni proxy of
   RESULTS.md (30B-A3B widths and towers, 4 LM layers, 128 experts top-8; bf16, random weights) and the
   ``hf`` rollout engine: the weight sync (median of 5, ms), then ``--prompts`` prompts x ``--n`` samples x
   ``--new-tokens`` tokens sampled at T=1 in one batch (the engine: transformers' generate + the log-prob
   recorder + placeholder suppression), against transformers' ``generate`` alone on the same model and
   inputs, then the engine again (order: engine, transformers, engine; the ratio uses the second engine
   run, both then past the allocator's growth to the full KV cache). Figures: generated tokens / s (a random model rarely picks a stop id: nearly every row runs to
   the limit; the count is of the tokens each row really generated), peak memory.
3. megatron (``--parts megatron``): the ``megatron`` backend (rollout/megatron.py: megatron-core's static
   inference path over the trained model, no copy) beside the ``hf`` engine and transformers' ``generate`` on
   the same model and ``--prompts`` TEXT prompts (the backend takes no media): greedy responses of both
   engines compared row by row (``--greedy-tokens`` each: identical rows, first divergence, log-prob
   difference on the common prefix); the trainer's recomputed log-probabilities (``loops.rollout``'s packing
   and ``recompute_logprobs``, bf16) against each engine's, on the timed T=1 samples; tokens / s of the three
   at ``--prompts`` x ``--n`` x ``--new-tokens`` in one batch (each warmed at the full batch; order: megatron,
   hf engine, transformers, megatron again), peak memory of the megatron run. ``--parts megatron_greedy``: the
   greedy comparison alone, with the trainer's recomputation of its log-probabilities (``--precision fp32``:
   the same at fp32 on the GPU).
4. step: ``python -m omni_train.train recipe=tiny/distill_onpolicy`` at the same sizes and rollout shape,
   the teacher a frozen copy of the student's initialisation (same sizes), ``--steps`` steps; per step from
   its metrics.jsonl: rollout_sync_ms, rollout_generate_s, teacher_time_s, update_time_s, step_time_s,
   rollout_tokens_per_s, response_length, logprob_mismatch(_max) (bf16 trainer vs bf16 rollout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEP_FIELDS = ("rollout_sync_ms", "rollout_generate_s", "teacher_time_s", "update_time_s", "step_time_s",
               "rollout_tokens_per_s", "response_length", "response_truncated", "logprob_mismatch",
               "logprob_mismatch_max", "kl_teacher", "tokens_per_s", "peak_memory_gib")


def overrides(args, data_dir: Path, run_dir: Path) -> list:
    o = ["recipe=tiny/distill_onpolicy", "init_from=null", f"run_dir={run_dir}", "logger=none",
         f"data.datasets=[{{path: {data_dir / 'sft'}, weight: 1.0}}]", f"data.tokenizer={data_dir / 'tokenizer'}",
         "stage.frozen_models=[{name: teacher, source: init}]",
         f"stage.rollout.prompts_per_step={args.prompts}", f"stage.rollout.sampling.n={args.n}",
         f"stage.rollout.sampling.max_new_tokens={args.new_tokens}", f"stage.rollout.max_prompt_tokens={min(1024, args.seq_length - args.new_tokens)}",
         f"trainer.seq_length={args.seq_length}", "trainer.micro_batch_size=1", "trainer.global_batch_size=1",
         "stage.rollout.generation_batch=0",
         f"trainer.max_steps={args.steps}", "trainer.log_every=1", "checkpoint.save_at_end=false",
         "checkpoint.save_every=100000", "optim.warmup_steps=0", "optim.lr_decay=constant",
         "model.thinker.aux_loss_coeff=0"]
    if args.smoke:
        return o + ["trainer.device=cpu", "trainer.precision=fp32"]
    return o + ["model=qwen3_omni_30b_a3b", "model.thinker.towers=true", f"model.thinker.num_layers={args.layers}",
                "trainer.device=cuda", f"trainer.precision={args.precision}", "optim.master_weights=false",
                "parallel.distributed_optimizer=false"]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_part(args, data_dir: Path) -> dict:
    import torch
    from omegaconf import OmegaConf

    from omni_train.config import compose
    from omni_train.config.rollout import SamplingConfig
    from omni_train.config.schema import ParallelConfig
    from omni_train.data.prompts import PromptSource
    from omni_train.data.shards import chat_encoder
    from omni_train.parallel.setup import init_parallel, shutdown_parallel
    from omni_train.rollout import build_engine
    from omni_train.stages.distill_onpolicy import build_model

    cfg = OmegaConf.to_object(compose(overrides(args, data_dir, Path(tempfile.mkdtemp()))))
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    env = init_parallel(ParallelConfig(), device, seed=0)
    try:
        model = build_model(cfg, env, dtype).eval()
        encoder = chat_encoder(cfg.data)
        engine = build_engine("hf", cfg.model.thinker, encoder, device, dtype)
        syncs = []
        for _ in range(5):
            syncs.append(engine.sync(model).ms)
        prompts = PromptSource(cfg.data, encoder, 1024, 0, 1).next_prompts(args.prompts)
        sampling = SamplingConfig(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens)
        rows = [p for p in prompts for _ in range(args.n)]
        inputs = engine.inputs(rows)

        def plain(new_tokens):
            """transformers' generate alone on the same model and inputs."""
            with torch.no_grad(), torch.random.fork_rng(devices=[0] if device.type == "cuda" else []):
                torch.manual_seed(0)
                return engine.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                                             top_p=1.0, top_k=None, eos_token_id=[encoder.ids["im_end"]],
                                             pad_token_id=encoder.ids["pad"], use_cache=True)

        # both paths warmed at the full batch (prefill, kernels, allocator) before either is timed
        engine.generate(prompts, SamplingConfig(n=args.n, temperature=1.0, max_new_tokens=8), seed=1)
        plain(8)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        samples = engine.generate(prompts, sampling, seed=0)
        _sync(device)
        ours_s = time.perf_counter() - start
        ours_tokens = sum(len(s.token_ids) for s in samples)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        start = time.perf_counter()
        out = plain(args.new_tokens)
        _sync(device)
        hf_s = time.perf_counter() - start
        # again, now that the allocator has grown to the full KV cache (the first long run pays for that)
        start = time.perf_counter()
        again = engine.generate(prompts, sampling, seed=0)
        _sync(device)
        again_s = time.perf_counter() - start
        again_tokens = sum(len(s.token_ids) for s in again)
        new = out[:, inputs["input_ids"].shape[1]:]
        ended = (new == encoder.ids["im_end"]).int().cumsum(1)
        hf_tokens = int(((ended == 0) | ((ended == 1) & (new == encoder.ids["im_end"]))).sum())
        return {
            "sync_ms_median": statistics.median(syncs), "sync_ms_all": syncs,
            "sync_gb": engine.sync(model).bytes / 1e9,
            "rows": len(rows), "prompt_tokens_mean": statistics.mean(p.num_tokens for p in prompts),
            "media_prompts": sum(bool(p.media) for p in prompts),
            "ours_tokens": ours_tokens, "ours_s": ours_s, "ours_tokens_per_s": ours_tokens / ours_s,
            "hf_tokens": hf_tokens, "hf_s": hf_s, "hf_tokens_per_s": hf_tokens / hf_s,
            "ours_again_s": again_s, "ours_again_tokens_per_s": again_tokens / again_s,
            "same_samples_again": [s.token_ids for s in again] == [s.token_ids for s in samples],
            "ours_vs_hf": (again_tokens / again_s) / (hf_tokens / hf_s), "peak_memory_gib": peak,
            "engine_parameters": engine.num_parameters(),
        }
    finally:
        shutdown_parallel()


def _first_divergence(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _recomputed_diff(model, samples, pad_id, seq_length, temperature) -> dict:
    """|trainer's log p - engine's log p| over every response token (the loop's packing and recompute)."""
    import torch

    from omni_train.loops.rollout import recompute_logprobs, rollout_microbatches

    micro, where = rollout_microbatches(samples, pad_id, seq_length, 1)
    diffs = []
    with torch.no_grad():
        for m, batch in enumerate(micro):
            batch = {k: (v.to(model_device(model)) if torch.is_tensor(v) else v) for k, v in batch.items()}
            got = recompute_logprobs(model, batch, temperature).float().cpu()
            for sample, (mb, row, start, end) in zip(samples, where):
                if mb == m:
                    diffs.append((got[row, start:end] - torch.tensor(sample.logprobs)).abs())
    flat = torch.cat(diffs)
    return {"mean_abs": float(flat.mean()), "max_abs": float(flat.max()), "tokens": int(flat.numel())}


def model_device(model):
    return next(model.parameters()).device


def megatron_part(args, data_dir: Path, throughput: bool = True) -> dict:
    import torch
    from omegaconf import OmegaConf

    from omni_train.config import compose
    from omni_train.config.rollout import SamplingConfig
    from omni_train.config.schema import ParallelConfig
    from omni_train.data.prompts import PromptSource
    from omni_train.data.shards import chat_encoder
    from omni_train.parallel.setup import init_parallel, shutdown_parallel
    from omni_train.rollout import build_engine
    from omni_train.stages.distill_onpolicy import build_model

    cfg = OmegaConf.to_object(compose(overrides(args, data_dir, Path(tempfile.mkdtemp()))))
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    dtype = torch.float32 if args.smoke or args.precision == "fp32" else torch.bfloat16
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29532")
    env = init_parallel(ParallelConfig(), device, seed=0)
    try:
        model = build_model(cfg, env, dtype).eval()
        encoder = chat_encoder(cfg.data)
        ours = build_engine("megatron", cfg.model.thinker, encoder, device, dtype)
        sync = ours.sync(model)
        hf = build_engine("hf", cfg.model.thinker, encoder, device, dtype)
        hf.sync(model)
        prompts = PromptSource(cfg.data, encoder, 1024, 0, 1, text_only=True).next_prompts(args.prompts)
        result = {"sync": vars(sync), "rows": args.prompts * args.n,
                  "distinct_prompts": len({p.key for p in prompts}),
                  "prompt_tokens_mean": statistics.mean(p.num_tokens for p in prompts)}

        # greedy: the two engines row by row
        greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=args.greedy_tokens)
        a, b = ours.generate(prompts, greedy, seed=0), hf.generate(prompts, greedy, seed=0)
        split = [_first_divergence(x.token_ids, y.token_ids) for x, y in zip(a, b)]
        same = [x.token_ids == y.token_ids for x, y in zip(a, b)]
        prefix = torch.cat([(torch.tensor(x.logprobs[:k]) - torch.tensor(y.logprobs[:k])).abs()
                            for x, y, k in zip(a, b, split) if k] or [torch.zeros(1)])
        result["greedy_vs_hf"] = {"rows": len(a), "identical_rows": sum(same),
                                  "first_divergence_mean": statistics.mean(split), "first_divergence_min": min(split),
                                  "tokens_per_row": args.greedy_tokens,
                                  "prefix_logprob_diff_mean": float(prefix.mean()),
                                  "prefix_logprob_diff_max": float(prefix.max())}
        print(json.dumps({"greedy_vs_hf": result["greedy_vs_hf"]}), flush=True)
        partial = args.json.with_suffix(".partial.json")  # what a run cut short still leaves
        partial.write_text(json.dumps(result, indent=1, default=str))
        if not throughput:  # the trainer's recomputation of the greedy log-probabilities (T = 1)
            result["recomputed_vs_megatron_greedy"] = _recomputed_diff(model, a, encoder.tokenizer.pad_token_id,
                                                                       args.seq_length, 1.0)
            return result

        sampling = SamplingConfig(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens)
        rows = [p for p in prompts for _ in range(args.n)]
        inputs = hf.inputs(rows)

        def plain(new_tokens):
            with torch.no_grad(), torch.random.fork_rng(devices=[0] if device.type == "cuda" else []):
                torch.manual_seed(0)
                return hf.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                                         top_p=1.0, top_k=None, eos_token_id=[encoder.ids["im_end"]],
                                         pad_token_id=encoder.ids["pad"], use_cache=True)

        def timed(fn):
            _sync(device)
            start = time.perf_counter()
            out = fn()
            _sync(device)
            return out, time.perf_counter() - start

        warm = SamplingConfig(n=args.n, temperature=1.0, max_new_tokens=8)
        ours.generate(prompts, warm, seed=1)
        hf.generate(prompts, warm, seed=1)
        plain(8)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        mine, mine_s = timed(lambda: ours.generate(prompts, sampling, seed=0))
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        theirs, hf_s = timed(lambda: hf.generate(prompts, sampling, seed=0))
        out, plain_s = timed(lambda: plain(args.new_tokens))
        partial.write_text(json.dumps({**result, "megatron_s": mine_s, "hf_engine_s": hf_s, "transformers_s": plain_s},
                                      indent=1, default=str))
        again, again_s = timed(lambda: ours.generate(prompts, sampling, seed=0)) if mine_s < 120 else (mine, mine_s)
        new = out[:, inputs["input_ids"].shape[1]:]
        ended = (new == encoder.ids["im_end"]).int().cumsum(1)
        plain_tokens = int(((ended == 0) | ((ended == 1) & (new == encoder.ids["im_end"]))).sum())
        count = lambda samples: sum(len(s.token_ids) for s in samples)  # noqa: E731
        result["throughput"] = {
            "megatron_tokens": count(mine), "megatron_s": mine_s, "megatron_tokens_per_s": count(mine) / mine_s,
            "megatron_again_s": again_s, "megatron_again_tokens_per_s": count(again) / again_s,
            "hf_engine_tokens": count(theirs), "hf_engine_s": hf_s, "hf_engine_tokens_per_s": count(theirs) / hf_s,
            "transformers_tokens": plain_tokens, "transformers_s": plain_s,
            "transformers_tokens_per_s": plain_tokens / plain_s,
            "megatron_peak_memory_gib": peak,
            "same_samples_again": [s.token_ids for s in again] == [s.token_ids for s in mine],
        }
        print(json.dumps({"throughput": result["throughput"]}), flush=True)
        partial.write_text(json.dumps(result, indent=1, default=str))
        pad = encoder.tokenizer.pad_token_id
        result["recomputed_vs_megatron"] = _recomputed_diff(model, mine, pad, args.seq_length, 1.0)
        result["recomputed_vs_hf_engine"] = _recomputed_diff(model, theirs, pad, args.seq_length, 1.0)
        return result
    finally:
        shutdown_parallel()


def step_part(args, data_dir: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp()) / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "omni_train.train", *overrides(args, data_dir, run_dir)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=args.step_timeout)
    records = []
    if (run_dir / "metrics.jsonl").exists():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"new_tokens": args.new_tokens, "returncode": proc.returncode, "steps": [{k: r.get(k) for k in ("step",) + STEP_FIELDS} for r in records]}
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-3000:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--seq-length", type=int, default=8192, help="the trainer's packed row")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--step-new-tokens", type=int, default=256, help="the step part's response limit")
    parser.add_argument("--samples", type=int, default=96, help="synthetic conversations")
    parser.add_argument("--step-timeout", type=int, default=300)
    parser.add_argument("--greedy-tokens", type=int, default=64, help="the megatron part's greedy comparison")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="the megatron parts' (GPU)")
    parser.add_argument("--parts", default="engine,step", help="engine, megatron, megatron_greedy, step")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.n, args.new_tokens, args.samples, args.seq_length = 4, 2, 8, 16, 1024
        args.step_new_tokens, args.greedy_tokens = 8, 8
    data_dir = Path(tempfile.mkdtemp()) / "data"
    subprocess.run([sys.executable, "-m", "data_pipelines.cli", "synth-suite", str(data_dir),
                    f"sft={args.samples}", "--workers", "2" if args.smoke else "8"], cwd=REPO, check=True,
                   capture_output=True)
    results = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    for part in args.parts.split(","):
        start = time.perf_counter()
        try:
            if part == "step":
                results[part] = step_part(argparse.Namespace(**{**vars(args), "new_tokens": args.step_new_tokens}),
                                          data_dir)
            elif part == "megatron_greedy":  # the greedy comparison alone (e.g. at --precision fp32)
                results[part] = megatron_part(args, data_dir, throughput=False)
            else:
                results[part] = {"engine": engine_part, "megatron": megatron_part}[part](args, data_dir)
        except Exception as e:  # a part that fails is reported; the others still run
            results[part] = {"error": f"{type(e).__name__}: {e}"}
        results[part]["wall_s"] = time.perf_counter() - start
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the step part's process needs the memory this one cached
        print(json.dumps({part: results[part]}, indent=1, default=str)[:4000], flush=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
