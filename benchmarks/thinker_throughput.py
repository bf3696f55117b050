"""Training throughput of the Thinker LM: omni-train (megatron-core) vs transformers' Qwen3-Omni Thinker.

    python3 benchmarks/thinker_throughput.py --layers 4 --seq-length 4096 --micro-batch 2 \
        --steps 5 --warmup 2 --which ours,hf_grouped_mm,hf_eager --json bench.json
    python3 benchmarks/thinker_throughput.py --tiny --which ours,hf_eager --steps 2 --warmup 1 ...  (CPU)

Both sides train the same model (the 30B-A3B Thinker's width with ``--layers`` decoder layers, or a tiny
one with ``--tiny``) on the same seeded random tokens, micro-batch and sequence length, one optimizer
step per ``--micro-batches`` micro-batches (default 1; more is gradient accumulation, on both sides the
mean loss over the step's micro-batches):

- ``ours``: the trainer itself (``omni_train.loops.supervised.SupervisedLoop`` over a ``Session`` built from the composed Hydra config, stage
  text_pretrain: megatron DDP, megatron's AdamW, distributed optimizer on GPU, clipping at 1.0, per-token
  loss), at world size 1, with the trainer's data source swapped for the benchmark's batches.
- ``hf_<impl>``: ``Qwen3OmniMoeThinkerForConditionalGeneration`` built from the same sizes (text-only
  inputs, audio/vision towers shrunk to a few thousand unused parameters), experts implementation
  ``<impl>`` (eager, grouped_mm, batched_mm), SDPA attention, ``torch.optim.AdamW(fused=True)`` on the
  bf16 parameters, the same clipping, no router aux loss.

No load-balancing loss on either side (ours: aux_loss_coeff=0). bf16 on GPU, fp32 on CPU. Each variant
runs in a fresh subprocess (its own peak memory; an OOM or a timeout loses only that variant), built by
benchmarks/throughput_variants.py; this script times and reports them. FLOPs per
token are ``omni_train.metrics.flops_per_token`` (Megatron's MoE formula) for both; MFU uses
``omni_train.metrics.device_peak_flops`` (989 TFLOP/s on H100 and H200). tokens/s = micro_batch *
micro_batches * seq_length / mean step time over the timed steps, run back to back as a training loop
runs them (the device synchronised before the first and after the last; transformers' loss is read after
the window, ours is read by the trainer in each step, as it logs it). Peak memory:
``torch.cuda.max_memory_allocated`` over the timed steps (max RSS of the process on CPU).

Variants on the same text batches and LM sizes:

- ``ours_bf16``: ``ours`` with ``optim.master_weights=false parallel.distributed_optimizer=false``
  (bf16 parameters, gradients and AdamW moments, as on the transformers side).

The omni variants add audio and image tokens through the towers (benchmarks/omni_media_batches.py):
every sequence holds one audio clip of ``--audio-frames`` log-mel frames and one square image of
``--image-size`` pixels, the rest text, at the same sequence length and micro-batch. Towers: the real
30B-A3B ones (conf/model/qwen3_omni_30b_a3b.yaml), or conf/model/tiny_omni.yaml's with ``--tiny``.

- ``ours_omni``: the trainer with stage multimodal_pretrain (towers + LM all trained), fed the
  benchmark's batches in the packed-batch format; ``--ours-master-weights false`` as ``ours_bf16``.
- ``hf_omni_grouped_mm``: transformers' Thinker with the same towers, same tokens, position ids and media.

They also report ``lm_mfu`` (LM FLOPs only: ``flops_per_token`` on every token, placeholders included)
and ``total_mfu`` (LM + tower FLOPs: ``omni_train.metrics.audio_tower_flops`` per clip and
``vision_tower_flops`` per image, counted separately), and the tower FLOPs per step.
"""

from __future__ import annotations

import argparse
import json
import os
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from throughput_variants import (  # noqa: E402  (benchmarks/, this script's folder)
    OMNI, build_hf, build_ours, model_config, model_fields, omni_flavor, omni_model_config,
)

VARIANTS = ("ours", "ours_bf16", "ours_sequential", "ours_omni", "hf_grouped_mm", "hf_batched_mm", "hf_eager", "hf_omni_grouped_mm")
TIMEOUTS = {"ours": 150, "ours_sequential": 150, "ours_bf16": 150, "ours_omni": 240, "hf_grouped_mm": 90, "hf_batched_mm": 90,
            "hf_eager": 120, "hf_omni_grouped_mm": 180}
# Media per sequence in the omni variants: (mel frames, image pixels per side) with and without --tiny
MEDIA = {True: (100, 64), False: (3000, 640)}  # tiny: 1 s, 4 placeholders; full: 30 s, 640 px (390 + 400)


# --------------------------------------------------------------------------------------------------
# Worker side: one variant in this process.


def _peak_gib(device) -> float:
    import torch

    from omni_train.metrics import peak_memory_gib

    return peak_memory_gib(device) if device.type != "cuda" else torch.cuda.max_memory_allocated(device) / 2**30


def time_steps(step, spec: dict, device) -> dict:
    """Warm-up steps, then ``steps`` timed ones back to back, as a training loop runs them: the device is
    synchronised before the first and after the last only, so a step's device work may overlap the host's
    launch of the next one. ``step_times_s``: the host time from one step's return to the next (the last
    one up to the final synchronisation); they add up to the timed window."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses = [float(step()) for _ in range(spec["warmup"])]
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed, marks = [], [time.perf_counter()]
    for _ in range(spec["steps"]):
        timed.append(step())
        marks.append(time.perf_counter())
    sync()
    marks[-1] = time.perf_counter()
    times = [b - a for a, b in zip(marks, marks[1:])]
    return dict(step_times_s=times, losses=losses + [float(loss) for loss in timed],
                peak_memory_gib=_peak_gib(device))


def worker(variant: str, spec: dict, result_path: Path) -> None:
    import logging
    import warnings

    import torch
    from step_profile import phase_timeline, print_profile, profile_step, sync_sites

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    t0 = time.perf_counter()
    if variant.startswith("ours"):
        step, info = build_ours(variant, spec, device)
    else:
        step, info = build_hf(variant, spec, device)
    build_s = time.perf_counter() - t0
    print(f"[{variant}] built in {build_s:.1f}s: {info}", flush=True)
    result = dict(variant=variant, status="ok", build_s=build_s, **info, **time_steps(step, spec, device),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  versions=_versions())
    result_path.write_text(json.dumps(result))  # before profiling: a profiler stall loses nothing
    print(f"[{variant}] step times {[round(t, 4) for t in result['step_times_s']]} s, "
          f"losses {[round(x, 4) for x in result['losses']]}", flush=True)
    if variant in spec["profile"]:
        trace = Path(spec["trace_dir"]) / f"trace_{variant}.json" if spec.get("trace_dir") else None
        result["profile"] = profile_step(step, device, trace_path=trace)
        result_path.write_text(json.dumps(result))
        if device.type == "cuda":
            result["syncs"] = sync_sites(step)
            result_path.write_text(json.dumps(result))
        if hasattr(step, "trainer"):
            result["phases"] = phase_timeline(step.trainer, step, device)
            result_path.write_text(json.dumps(result))
            print(f"[{variant}] phases {result['phases']}", flush=True)
        print_profile(variant, result["profile"], result.get("syncs", []))


def _versions() -> dict:
    import torch
    import transformers

    out = dict(torch=torch.__version__, transformers=transformers.__version__)
    try:
        import megatron.core

        out["megatron_core"] = megatron.core.__version__
    except ImportError:
        pass
    return out


# --------------------------------------------------------------------------------------------------
# Parent side: one subprocess per variant, then the figures, a table and the JSON.


def figures(result: dict, spec: dict, flops_per_token: float, peak_flops, tower_flops_per_step=None) -> dict:
    """tokens/s, TFLOP/s and MFU (the LM's FLOPs) from the timed steps' mean step time; with tower FLOPs
    (omni variants) also the towers' TFLOP/s, LM + towers TFLOP/s, and LM-only and total MFU."""
    step_s = sum(result["step_times_s"]) / len(result["step_times_s"])
    tokens_per_s = spec["micro_batch"] * spec.get("micro_batches", 1) * spec["seq_length"] / step_s
    tflops = tokens_per_s * flops_per_token / 1e12
    out = dict(step_s=step_s, tokens_per_s=tokens_per_s, tflops=tflops,
               mfu=tflops * 1e12 / peak_flops if peak_flops else None)
    if tower_flops_per_step is not None:
        tower_tflops = tower_flops_per_step / step_s / 1e12
        total = tflops + tower_tflops
        out.update(tower_tflops=tower_tflops, total_tflops=total, lm_mfu=out["mfu"],
                   total_mfu=total * 1e12 / peak_flops if peak_flops else None)
    return out


def omni_inputs_report(spec: dict) -> dict:
    """The omni variants' towers, media per sequence and tower training FLOPs (per sequence, per step)."""
    from dataclasses import asdict

    from omni_train.metrics import audio_tower_flops, vision_tower_flops
    from omni_media_batches import media_layout

    m = omni_model_config(spec)
    media = media_layout(m, spec["audio_frames"], spec["image_size"])
    audio = audio_tower_flops(m, media["audio_frames"])
    vision = vision_tower_flops(m, media["image_grid_thw"])
    b = spec["micro_batch"]
    return dict(flavor=omni_flavor(spec), audio_tower=asdict(m.audio_tower), vision_tower=asdict(m.vision_tower),
                media_per_sequence=media, audio_flops_per_sequence=audio, vision_flops_per_sequence=vision,
                tower_flops_per_step=b * spec.get("micro_batches", 1) * (audio + vision))


def run_variant(variant: str, spec: dict, timeout: float, log_path: Path) -> dict:
    """Run one variant in a fresh interpreter; its output goes to ``log_path``."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant,
               "--spec", json.dumps(spec), "--result", str(result_path)]
        start = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                # a world of one: the worker picks its own free port (an inherited MASTER_PORT may be taken)
                env = {k: v for k, v in os.environ.items()
                       if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO,
                                      env=env)
                status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = f"timeout ({timeout:.0f}s)"
        result = json.loads(result_path.read_text()) if result_path.exists() else dict(variant=variant)
    result["wall_s"] = time.perf_counter() - start
    if status != "ok":  # a result written before a failure (e.g. during profiling) still counts
        result["status"] = status if "step_times_s" not in result else f"ok, then {status}"
        tail = log_path.read_text(errors="replace").splitlines()[-12:]
        result["log_tail"] = tail
        print(f"[{variant}] {status}; last lines of {log_path}:", *tail, sep="\n  ", flush=True)
    return result


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def _flops(value: float) -> str:
    return f"{value / 1e12:.3f} TFLOP" if value >= 1e11 else f"{value / 1e9:.3f} GFLOP"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def table(report: dict) -> str:
    """One row per variant. TFLOP/s and MFU count the LM's FLOPs; the omni variants add the towers'
    TFLOP/s and the total MFU (LM + towers)."""
    head = ["variant", "status", "tokens/s", "TFLOP/s", "MFU", "tower TFLOP/s", "total MFU", "peak GiB", "step ms",
            "loss first->last"]
    rows = []
    for r in report["results"]:
        f = r.get("figures", {})
        losses = r.get("losses") or []
        step_ms = _fmt(f["step_s"] * 1e3, ".1f") if f else "-"
        rows.append([r["variant"], r.get("status", "?"), _fmt(f.get("tokens_per_s"), ",.0f"),
                     _fmt(f.get("tflops"), ".1f"), _percent(f.get("mfu")), _fmt(f.get("tower_tflops"), ".2f"),
                     _percent(f.get("total_mfu")), _fmt(r.get("peak_memory_gib"), ".1f"), step_ms,
                     f"{losses[0]:.3f}->{losses[-1]:.3f}" if losses else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |" for row in [head] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for name, ratio in report["ratios"].items():
        lines.append(f"tokens/s ratio {name}: {ratio:.3f}")
    return "\n".join(lines)


def run_all(args) -> dict:
    from omni_train.metrics import flops_per_token

    frames, size = MEDIA[args.tiny]
    spec = dict(tiny=args.tiny, layers=args.layers, seq_length=args.seq_length, micro_batch=args.micro_batch,
                micro_batches=args.micro_batches,
                steps=args.steps, warmup=args.warmup, seed=args.seed, profile=args.profile,
                audio_frames=args.audio_frames or frames, image_size=args.image_size or size,
                master_weights=args.ours_master_weights == "true", trace_dir=args.trace_dir,
                ours_overrides=args.ours_overrides.split())
    m = model_config(spec)
    fpt = flops_per_token(m, args.seq_length)
    peak = _peak_flops_of_visible_gpu()
    omni = omni_inputs_report(spec) if any(v in OMNI for v in args.which) else None
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="thinker_throughput_logs_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results, start = [], time.perf_counter()
    for variant in args.which:
        left = args.deadline - (time.perf_counter() - start) if args.deadline else math.inf
        timeout = min(args.timeouts.get(variant, TIMEOUTS[variant]), left)
        if left < 15:  # too little of the deadline left to even import and build
            results.append(dict(variant=variant, status="skipped (deadline)"))
            continue
        print(f"== {variant} (timeout {timeout:.0f}s)", flush=True)
        r = run_variant(variant, spec, timeout, log_dir / f"thinker_throughput_{variant}.log")
        if r.get("step_times_s"):
            r["figures"] = figures(r, spec, fpt, peak, omni["tower_flops_per_step"] if variant in OMNI else None)
        results.append(r)
    return dict(date=time.strftime("%Y-%m-%d"), spec=spec, model=model_fields(spec), flops_per_token=fpt,
                peak_flops=peak, tokens_per_step=args.micro_batch * args.micro_batches * args.seq_length, omni=omni, results=results,
                ratios=_ratios(results))


def _ratios(results: list) -> dict:
    """tokens/s of each ours* variant over each transformers variant on the same inputs (text or omni)."""
    done = {r["variant"]: r["figures"]["tokens_per_s"] for r in results if "figures" in r}
    return {f"{a}/{b}": done[a] / done[b] for a in done for b in done
            if a.startswith("ours") and b.startswith("hf_") and (a in OMNI) == (b in OMNI)}


def _peak_flops_of_visible_gpu():
    import torch

    from omni_train.metrics import device_peak_flops

    return device_peak_flops() if torch.cuda.is_available() else None


def _timeouts(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        name, seconds = item.split("=")
        out[name] = float(seconds)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation on both sides)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--which", default="ours,hf_grouped_mm,hf_eager",
                   type=lambda s: [v for v in s.split(",") if v])
    p.add_argument("--tiny", action="store_true",
                   help="hidden 64, 8 experts, vocab 512; omni variants: tiny_omni's towers (CPU tests)")
    p.add_argument("--audio-frames", type=int, default=None,
                   help=f"omni variants: log-mel frames of each sequence's audio clip (100 per second; default "
                        f"{MEDIA[False][0]}, {MEDIA[True][0]} with --tiny)")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"omni variants: pixels per side of each sequence's square image, a multiple of 32 "
                        f"(default {MEDIA[False][1]}, {MEDIA[True][1]} with --tiny)")
    p.add_argument("--ours-master-weights", choices=("true", "false"), default="true",
                   help="ours_omni: fp32 master weights (true) or bf16 params/grads/moments as ours_bf16 (false)")
    p.add_argument("--ours-overrides", default="",
                   help="Hydra overrides appended for every ours* variant, space-separated "
                        "(e.g. optim.kernel=torch_fused)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile", default="", type=lambda s: [v for v in s.split(",") if v],
                   help="variants that also profile one extra step (top kernels by device time)")
    p.add_argument("--timeouts", default="", type=_timeouts, help="e.g. ours=150,hf_eager=120")
    p.add_argument("--deadline", type=float, default=None, help="seconds for all variants together")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--trace-dir", default=None, help="profiled variants also write a Chrome trace here")
    p.add_argument("--log-dir", default=None, help="one log per variant (default: a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [v for v in args.which + args.profile if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker(args.worker, json.loads(args.spec), Path(args.result))
        return 0
    report = run_all(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"flops/token {report['flops_per_token'] / 1e9:.3f} G, tokens/step {report['tokens_per_step']}, "
          f"peak {_fmt(report['peak_flops'] and report['peak_flops'] / 1e12, '.0f')} TFLOP/s")
    omni = report["omni"]
    if omni:
        media, lm = omni["media_per_sequence"], report["flops_per_token"] * report["tokens_per_step"]
        print(f"omni ({omni['flavor']} towers): per sequence a {media['audio_frames']}-frame audio clip "
              f"({media['audio_tokens']} tokens) and a {media['image_size']} px image ({media['image_tokens']} "
              f"tokens); FLOPs per step: towers {_flops(omni['tower_flops_per_step'])} (per sequence audio "
              f"{_flops(omni['audio_flops_per_sequence'])}, vision {_flops(omni['vision_flops_per_sequence'])}), "
              f"LM {_flops(lm)}")
    print(table(report), flush=True)
    return 0 if all(r.get("status") == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
