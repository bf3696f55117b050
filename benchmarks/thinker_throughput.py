"""Training throughput of the Thinker LM: omni-train (megatron-core) vs transformers' Qwen3-Omni Thinker.

    python3 benchmarks/thinker_throughput.py --layers 4 --seq-length 4096 --micro-batch 2 \
        --steps 5 --warmup 2 --which ours,hf_grouped_mm,hf_eager --json bench.json
    python3 benchmarks/thinker_throughput.py --tiny --which ours,hf_eager --steps 2 --warmup 1 ...  (CPU)

Both sides train the same model (the 30B-A3B Thinker's width with ``--layers`` decoder layers, or a tiny
one with ``--tiny``) on the same seeded random tokens, micro-batch and sequence length, one optimizer
step per ``--micro-batches`` micro-batches (default 1; more is gradient accumulation, on both sides the
mean loss over the step's micro-batches):

- ``ours``: the trainer itself (``omni_train.loop.Trainer`` built from the composed Hydra config, stage
  text_pretrain: megatron DDP, megatron's AdamW, distributed optimizer on GPU, clipping at 1.0, per-token
  loss), at world size 1, with the trainer's data source swapped for the benchmark's batches.
- ``hf_<impl>``: ``Qwen3OmniMoeThinkerForConditionalGeneration`` built from the same sizes (text-only
  inputs, audio/vision towers shrunk to a few thousand unused parameters), experts implementation
  ``<impl>`` (eager, grouped_mm, batched_mm), SDPA attention, ``torch.optim.AdamW(fused=True)`` on the
  bf16 parameters, the same clipping, no router aux loss.

No load-balancing loss on either side (ours: aux_loss_coeff=0). bf16 on GPU, fp32 on CPU. Each variant
runs in a fresh subprocess (its own peak memory; an OOM or a timeout loses only that variant). FLOPs per
token are ``omni_train.metrics.flops_per_token`` (Megatron's MoE formula) for both; MFU uses
``omni_train.metrics.device_peak_flops`` (989 TFLOP/s on H100 and H200). tokens/s = micro_batch *
micro_batches * seq_length / mean step time over the timed steps, run back to back as a training loop
runs them (the device synchronised before the first and after the last; transformers' loss is read after
the window, ours is read by the trainer before each update, as it logs it). Peak memory:
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
import itertools
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

VARIANTS = ("ours", "ours_bf16", "ours_sequential", "ours_omni", "hf_grouped_mm", "hf_batched_mm", "hf_eager", "hf_omni_grouped_mm")
OMNI = ("ours_omni", "hf_omni_grouped_mm")  # with audio and image inputs through the towers
TIMEOUTS = {"ours": 150, "ours_sequential": 150, "ours_bf16": 150, "ours_omni": 240, "hf_grouped_mm": 90, "hf_batched_mm": 90,
            "hf_eager": 120, "hf_omni_grouped_mm": 180}
# Media per sequence in the omni variants: (mel frames, image pixels per side) with and without --tiny
MEDIA = {True: (100, 64), False: (3000, 640)}  # tiny: 1 s, 4 placeholders; full: 30 s, 640 px (390 + 400)
# The real 30B-A3B Thinker's LM width (conf/model/qwen3_omni_30b_a3b.yaml); depth from --layers.
PROXY = dict(vocab_size=152064, hidden_size=2048, num_attention_heads=32, num_query_groups=4, head_dim=128,
             num_experts=128, router_topk=8, moe_ffn_hidden_size=768, mrope_section=[24, 20, 20])
TINY = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16,
            num_experts=8, router_topk=2, moe_ffn_hidden_size=32, mrope_section=[4, 2, 2])
LR, CLIP = 3e-4, 1.0


def model_fields(spec: dict) -> dict:
    sizes = TINY if spec["tiny"] else PROXY
    return dict(sizes, flavor="tiny" if spec["tiny"] else "qwen3_omni_30b_a3b", num_layers=spec["layers"],
                aux_loss_coeff=0.0, max_position_embeddings=max(4096, spec["seq_length"]))


def model_config(spec: dict):
    from omni_train.config.schema import ModelConfig

    return ModelConfig(**model_fields(spec))


def lm_overrides(spec: dict) -> list:
    return [f"model.{k}={v}" for k, v in model_fields(spec).items() if k != "flavor"]


def omni_flavor(spec: dict) -> str:
    return "tiny_omni" if spec["tiny"] else "qwen3_omni_30b_a3b"


def omni_model_config(spec: dict):
    """model_config(spec)'s LM with the towers of the omni flavor (sizes from its conf/model yaml)."""
    from omegaconf import OmegaConf

    from omni_train.config import compose

    composed = compose([f"model={omni_flavor(spec)}", "model.towers=true", *lm_overrides(spec)])
    return OmegaConf.to_object(composed).model


# --------------------------------------------------------------------------------------------------
# Worker side: one variant in this process.


def make_batches(spec: dict, vocab_size: int, count: int, device):
    """``count`` micro-batches of seeded random tokens, in the trainer's batch format, on ``device``."""
    import torch

    g = torch.Generator().manual_seed(spec["seed"])
    b, s = spec["micro_batch"], spec["seq_length"]
    tokens = torch.randint(0, vocab_size, (count, b, s + 1), generator=g)
    positions = torch.arange(s).expand(3, b, s).contiguous().to(device)
    return [{
        "input_ids": t[:, :-1].contiguous().to(device),
        "labels": t[:, 1:].contiguous().to(device),
        "loss_mask": torch.ones(b, s, device=device),
        "position_ids": positions,
        "keys": [f"bench:{i}:{r}" for r in range(b)],
    } for i, t in enumerate(tokens)]


class FixedBatches:
    """Stands in for the trainer's data source: ``per_step`` micro-batches per optimizer step."""

    def __init__(self, batches, per_step: int = 1):
        self.batches, self.per_step, self.step = batches, per_step, 0

    def next_microbatches(self):
        start = self.step * self.per_step
        self.step += 1
        return [self.batches[(start + i) % len(self.batches)] for i in range(self.per_step)]

    def stats(self):
        return {}


def ours_overrides(variant: str, spec: dict, on_gpu: bool, tokenizer=None) -> list:
    """The Hydra overrides of an ``ours*`` variant: recipe text_pretrain at the benchmark's sizes; the
    omni variant swaps in stage multimodal_pretrain and the towers' flavor."""
    omni = variant in OMNI
    flavor = omni_flavor(spec) if omni else ("tiny" if spec["tiny"] else "qwen3_omni_30b_a3b")
    overrides = ["recipe=tiny/text_pretrain_gpu" if on_gpu else "recipe=tiny/text_pretrain",
                 f"model={flavor}", "logger=none",
                 f"trainer.seq_length={spec['seq_length']}", f"trainer.micro_batch_size={spec['micro_batch']}",
                 f"trainer.global_batch_size={spec['micro_batch'] * spec.get('micro_batches', 1)}",
                 "trainer.max_steps=1000",
                 f"trainer.device={'cuda' if on_gpu else 'cpu'}",
                 f"trainer.precision={'bf16' if on_gpu else 'fp32'}",
                 f"trainer.seed={spec['seed']}", f"optim.lr={LR}", f"optim.clip_grad={CLIP}",
                 # the transformers side steps at a constant LR from the first step: so do we
                 "optim.warmup_steps=0", "optim.lr_decay=constant",
                 "checkpoint.save_every=100000", "checkpoint.save_at_end=false",
                 f"run_dir={tempfile.mkdtemp(prefix='thinker_throughput_')}", *lm_overrides(spec)]
    if variant == "ours_bf16" or (omni and not spec.get("master_weights", True)):
        overrides += ["optim.master_weights=false", "parallel.distributed_optimizer=false"]
    if variant == "ours_sequential":  # megatron's SequentialMLP experts and alltoall dispatcher, for reference
        overrides += ["model.experts_impl=sequential"]
    if omni:  # the stage reads its placeholder ids from the tokenizer; its data source is replaced below
        overrides += ["stage=multimodal_pretrain", "model.towers=true", f"data.tokenizer={tokenizer}"]
    return overrides + list(spec.get("ours_overrides", []))


def _tower_parameters(model) -> int:
    # tower modules are audio_tower.* / visual.* (thinker.* or model.* prefixes in some transformers versions)
    return sum(p.numel() for n, p in model.named_parameters() if "audio_tower." in n or "visual." in n)


def build_ours(variant: str, spec: dict, device):
    """The trainer as `omni-train` builds it (recipe text_pretrain, or stage multimodal_pretrain for
    ours_omni), at the benchmark's sizes, its data source replaced by the benchmark's batches."""
    from omegaconf import OmegaConf

    from omni_train.config import compose, validate_config
    from omni_train.loop import Trainer
    from omni_train.parallel.setup import init_parallel
    from omni_train.stages import load_stage
    from omni_media_batches import omni_batches, placeholder_ids  # benchmarks/, this script's folder
    from step_profile import label_parts

    on_gpu = device.type == "cuda"
    omni = variant in OMNI
    tokenizer, ids = placeholder_ids() if omni else (None, None)
    composed = compose(ours_overrides(variant, spec, on_gpu, tokenizer))
    validate_config(composed, world_size=1, cuda_available=on_gpu)
    cfg = OmegaConf.to_object(composed)
    per_step = spec.get("micro_batches", 1)
    count = (spec["warmup"] + spec["steps"] + 1) * per_step
    batches = (omni_batches(spec, cfg.model, ids, count, device) if omni
               else make_batches(spec, cfg.model.vocab_size, count, device))
    # This process runs one variant: the stage's data source becomes the benchmark's batches.
    load_stage(cfg.stage).build_data = lambda cfg, env: FixedBatches(batches, per_step)
    env = init_parallel(cfg.parallel, device, cfg.trainer.seed)
    trainer = Trainer(cfg, env, resolved={})
    label_parts(trainer)
    info = dict(parameters=sum(p.numel() for p in trainer.model.parameters()),
                tower_parameters=_tower_parameters(trainer.model),
                optimizer=type(trainer.optimizer).__name__, token_dispatcher=cfg.parallel.token_dispatcher,
                distributed_optimizer=on_gpu and cfg.parallel.distributed_optimizer,
                master_weights=getattr(cfg.optim, "master_weights", True))
    step = lambda: trainer.train_step()["loss"]  # noqa: E731
    step.trainer = trainer
    return step, info


def hf_thinker_config(m, impl: str, placeholder_ids=None):
    """transformers' thinker config for ModelConfig ``m``. Text-only use (``placeholder_ids`` None): towers
    shrunk (they get no input, hence no gradient and no optimizer state). Omni use: the towers of
    ``m.audio_tower`` / ``m.vision_tower`` and the tokenizer's placeholder ids, as the stage builds them."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

    from omni_train.models.thinker_lm_bridge import hf_text_config
    from omni_train.stages.multimodal_pretrain import hf_thinker_config as stage_towers

    # the LM of our sizes (the bridge's mapping); no cache, no router logits, no aux loss in training
    text = dict(hf_text_config(m), use_cache=False, output_router_logits=False, router_aux_loss_coef=0.0)
    if placeholder_ids is not None:
        return Qwen3OmniMoeThinkerConfig(text_config=text, **stage_towers(m, placeholder_ids),
                                         tie_word_embeddings=False, experts_implementation=impl)
    top = m.vocab_size - 1  # placeholder ids: never fed (text-only), must be < vocab
    return Qwen3OmniMoeThinkerConfig(
        text_config=text,
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          output_dim=m.hidden_size, n_window=4, downsample_hidden_size=8),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=m.hidden_size, deepstack_visual_indexes=[0]),
        audio_token_id=top, image_token_id=top - 1, video_token_id=top - 2, vision_start_token_id=top - 3,
        audio_start_token_id=top - 4, tie_word_embeddings=False, experts_implementation=impl,
    )


def build_hf(variant: str, spec: dict, device):
    """transformers' Thinker: ``hf_<impl>`` text-only with shrunk towers, ``hf_omni_<impl>`` with the
    omni flavor's towers on the omni batches."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from omni_media_batches import hf_inputs, omni_batches, placeholder_ids

    omni = variant in OMNI
    impl = variant.removeprefix("hf_omni_" if omni else "hf_")
    on_gpu = device.type == "cuda"
    per_step = spec.get("micro_batches", 1)
    count = (spec["warmup"] + spec["steps"] + 1) * per_step
    if omni:
        m = omni_model_config(spec)
        _, ids = placeholder_ids()
        config, batches = hf_thinker_config(m, impl, ids), omni_batches(spec, m, ids, count, device)
    else:
        m = model_config(spec)
        config, batches = hf_thinker_config(m, impl), make_batches(spec, m.vocab_size, count, device)
    torch.manual_seed(spec["seed"])
    with torch.device(device):
        model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16 if on_gpu else torch.float32,
            attn_implementation="sdpa", experts_implementation=impl)
    with torch.no_grad():  # explicit init: no parameter left as torch.empty
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights 1, biases (towers) 0
                p.fill_(1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, m.init_std)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=on_gpu, foreach=None if on_gpu else True)
    batches = itertools.cycle(batches)  # the profiled and sync-checked steps come after the timed ones

    def micro_step(batch) -> torch.Tensor:
        if omni:  # media collated and copied to the device each step, as the stage's forward does
            inputs = hf_inputs(batch, device)
            labels = inputs.pop("labels")
        else:
            inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
            labels = batch["labels"]
        logits = model(**inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        (loss / per_step).backward()  # gradient accumulation: the mean over the step's micro-batches
        return loss.detach()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        losses = [micro_step(next(batches)) for _ in range(per_step)]
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        optimizer.step()
        return torch.stack(losses).mean()  # read after the timed steps (transformers' Trainer syncs to log)

    towers = _tower_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    # text-only: the LM's parameters (the shrunk towers are not part of the compared model)
    info = dict(parameters=total if omni else total - towers, tower_parameters=towers if omni else 0,
                experts_implementation=model.config.text_config._experts_implementation,
                attn_implementation=model.config.text_config._attn_implementation, optimizer="AdamW(fused)")
    return step, info


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
