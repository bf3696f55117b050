"""`dry_run=true`: build the model on the meta device, print parameter counts, each rank's shards and the
per-rank memory estimate for the run's layout, allocate nothing.

The world size described is ``dry_run_world_size`` (what a recipe is written for), else the smallest the
layout takes; the estimate is checked against ``dry_run_gpu_memory_gb`` (omni_train/planning/memory_estimate.py).

With ``model.talker`` set the run described trains the Talker beside the frozen Thinker that conditions
it: the Thinker's lines are followed by the Talker's counts (total, active per token, by part; its meta
build), its per-rank share, what the stage holds besides (talker_dpo's frozen reference Talker, a Code2Wav:
one line each), and the memory estimate is the Talker run's (planning/talker_memory.py). Nothing here imports
the stages' code: the stage's name says what it holds.

A stage's frozen models (a teacher, a reference) and, for stage.loop=rollout, its rollout engine get one
line each and their own terms in the estimate (planning/frozen_memory.py).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from omni_train.config import ThinkerConfig, ParallelConfig, TalkerConfig, TrainConfig
from omni_train.config.talker import Code2WavConfig
from omni_train.planning.frozen_memory import plan_side_models
from omni_train.planning.memory_estimate import estimate_memory, format_estimate
from omni_train.planning.param_inventory import (
    count_talker_parameters,
    count_thinker_parameters,
    talker_idle_expert_parameters,
    talker_parameter_parts,
    talker_rank_parameters,
    tower_parameter_counts,
)
from omni_train.planning.talker_memory import TalkerRun, estimate_talker_memory, talker_run
from omni_train.models.thinker.lm import build_thinker_lm, count_parameters, describe_shards

# Placeholder ids for building the towers on the meta device (only the towers' sizes matter there).
_META_TOKEN_IDS = dict.fromkeys(("audio_pad", "image_pad", "video_pad", "vision_start", "audio_start"), 0)


def build_on_meta(model_cfg: ThinkerConfig) -> int:
    """Build the unsharded megatron model on the meta device (nothing allocated); its parameter count."""
    from omni_train.parallel.setup import init_parallel, shutdown_parallel

    init_parallel(ParallelConfig(), torch.device("cpu"), seed=0)
    try:
        with torch.device("meta"):
            model = build_thinker_lm(model_cfg, ParallelConfig(), device=torch.device("meta"),
                                     params_dtype=torch.bfloat16)
        return sum(p.numel() for p in model.parameters())
    finally:
        shutdown_parallel()


def build_talker_on_meta(talker_cfg: TalkerConfig) -> int:
    """Build our Talker (backbone, projections, code predictor) on the meta device; its parameter count."""
    from omni_train.models.talker.model import build_talker
    from omni_train.parallel.setup import init_parallel, shutdown_parallel

    init_parallel(ParallelConfig(), torch.device("cpu"), seed=0)
    try:
        with torch.device("meta"):
            model = build_talker(talker_cfg, ParallelConfig(), device=torch.device("meta"),
                                 params_dtype=torch.bfloat16)
        return sum(p.numel() for p in model.parameters())
    finally:
        shutdown_parallel()


def code2wav_parameters(code2wav: Optional[Code2WavConfig]) -> int:
    """Parameters of transformers' Code2Wav of ``model.code2wav``'s sizes (built on the meta device); 0 without one."""
    if code2wav is None:
        return 0
    from omni_train.models.talker.code2wav import build_code2wav

    model = build_code2wav(code2wav.hf_config(), device="meta", dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


def build_towers_on_meta(model_cfg: ThinkerConfig) -> Tuple[int, int]:
    """(audio, vision) parameter counts of transformers' tower modules built on the meta device from the
    thinker config the multimodal stages build them from."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoder,
        Qwen3OmniMoeVisionEncoder,
    )

    from omni_train.models.thinker.hf_config import hf_thinker_config

    hf = Qwen3OmniMoeThinkerConfig(**hf_thinker_config(model_cfg, _META_TOKEN_IDS))
    with torch.device("meta"):
        audio = Qwen3OmniMoeAudioEncoder(hf.audio_config)
        vision = Qwen3OmniMoeVisionEncoder(hf.vision_config)
    return (sum(p.numel() for p in audio.parameters()), sum(p.numel() for p in vision.parameters()))


def _collapse_experts(shards: List[Tuple[str, Tuple[int, ...]]]) -> List[Tuple[str, Tuple[int, ...], int]]:
    """Group `local_experts.{i}.x` entries into one line with a count."""
    grouped: "OrderedDict[Tuple[str, Tuple[int, ...]], int]" = OrderedDict()
    for name, shape in shards:
        key = (re.sub(r"local_experts\.\d+\.", "local_experts.{i}.", name), tuple(shape))
        grouped[key] = grouped.get(key, 0) + 1
    return [(name, shape, count) for (name, shape), count in grouped.items()]


def _count_lines(model_cfg: ThinkerConfig, flavor: str, built_lm: Optional[int], built_towers: Optional[Tuple[int, int]]):
    total, active = count_parameters(model_cfg)
    lines = [f"model {flavor}: {total:,} parameters ({total / 1e9:.2f} B) total, "
             f"{active:,} ({active / 1e9:.2f} B) active per token"]
    if built_lm is not None:
        lines.append(f"built on the meta device: {built_lm:,} parameters "
                     f"({'matches' if built_lm == total else 'DIFFERS FROM'} the analytic count)")
    if not model_cfg.towers:
        return lines
    audio, vision = tower_parameter_counts(model_cfg)
    all_total, all_active = count_thinker_parameters(model_cfg)
    lines[0] = f"language model {flavor}: " + lines[0].split(": ", 1)[1]
    lines.append(f"audio tower: {audio:,} parameters; vision tower: {vision:,} parameters "
                 "(replicated on every rank)")
    if built_towers is not None:
        lines.append(f"towers built on the meta device (transformers): {built_towers[0]:,} + "
                     f"{built_towers[1]:,} ({'match' if built_towers == (audio, vision) else 'DIFFER FROM'} "
                     "the analytic counts)")
    lines.append(f"Thinker with towers: {all_total:,} parameters ({all_total / 1e9:.2f} B) total, "
                 f"{all_active:,} ({all_active / 1e9:.2f} B) active per token")
    return lines


def format_dry_run(model_cfg: ThinkerConfig, parallel_cfg: ParallelConfig, built_params: Optional[int],
                   built_towers: Optional[Tuple[int, int]] = None, flavor: str = "thinker") -> str:
    lines = _count_lines(model_cfg, flavor, built_params, built_towers)
    p = parallel_cfg
    lines.append(f"layout tp={p.tp} pp={p.pp} ep={p.ep} cp={p.cp}: per-rank shards "
                 "(every data-parallel replica holds the same)")
    by_stage: Dict[int, List[dict]] = {}
    for entry in describe_shards(model_cfg, parallel_cfg):
        by_stage.setdefault(entry["stage"], []).append(entry)
    for stage, entries in by_stage.items():
        first = entries[0]
        lines.append(f"  pipeline stage {stage} ({first['layers']} layers; each of its tp x ep = "
                     f"{p.tp} x {p.ep} ranks): {first['num_params']:,} parameters per rank")
        for name, shape, count in _collapse_experts(first["layer"]):
            suffix = f" x{count}" if count > 1 else ""
            lines.append(f"    layers.*.{name} {tuple(shape)}{suffix}")
        for name, shape in first["other"]:
            lines.append(f"    {name} {tuple(shape)}")
    if model_cfg.towers:
        audio, vision = tower_parameter_counts(model_cfg)
        lines.append(f"  + audio_tower.* ({audio:,}) and visual.* ({vision:,}) on every rank")
    return "\n".join(lines)


def format_talker(talker: TalkerConfig, parallel_cfg: ParallelConfig, built: Optional[int]) -> str:
    """The Talker's counts (total, active per token, by part), its meta build and one rank's share."""
    total, active = count_talker_parameters(talker)
    parts = talker_parameter_parts(talker)
    backbone_active = parts["backbone"] - talker_idle_expert_parameters(talker)
    lines = [f"Talker: {total:,} parameters ({total / 1e9:.2f} B) total, {active:,} ({active / 1e9:.2f} B) active "
             "per token",
             f"  backbone {parts['backbone']:,} ({backbone_active:,} ({backbone_active / 1e9:.2f} B) active: top-"
             f"{talker.router_topk} of {talker.num_experts} experts + the shared expert), projections "
             f"{parts['projections']:,}, code predictor {parts['code_predictor']:,} (dense, runs on every frame)"]
    if built is not None:
        lines.append(f"Talker built on the meta device: {built:,} parameters "
                     f"({'matches' if built == total else 'DIFFERS FROM'} the analytic count)")
    ep = parallel_cfg.ep
    per_rank = sum(p.numel for p in talker_rank_parameters(talker, ep))
    lines.append(f"Talker layout tp=1 pp=1 cp=1 ep={ep}: {per_rank:,} parameters per rank "
                 f"({talker.num_experts // ep} of each layer's {talker.num_experts} experts; the rest replicated)")
    return "\n".join(lines)


def format_talker_run(run: TalkerRun, talker: TalkerConfig, ep: int) -> List[str]:
    """One line each for what the Talker stage holds besides the trained Talker and the Thinker."""
    lines = []
    if run.reference:
        held = sum(p.numel for p in talker_rank_parameters(talker, ep))
        lines.append(f"frozen reference Talker (the stage's starting Talker, outside the trained module tree): "
                     f"{held:,} parameters per rank, no gradients or optimizer state; each micro-batch pair runs "
                     f"{run.rows_per_sample} rows (chosen, rejected)")
    if run.code2wav_parameters:
        lines.append(f"frozen Code2Wav (model.code2wav): {run.code2wav_parameters:,} parameters, replicated")
    return lines


def print_dry_run(cfg: TrainConfig, world_size: int, build: bool = True) -> bool:
    """Print counts, shards and the memory estimate of ``cfg`` on ``world_size`` ranks; whether the
    estimate fits ``cfg.dry_run_gpu_memory_gb``."""
    built = build_on_meta(cfg.model.thinker) if build else None
    towers = build_towers_on_meta(cfg.model.thinker) if build and cfg.model.thinker.towers else None
    talker = cfg.model.talker
    flavor = cfg.model.flavor if talker is None else f"{cfg.model.flavor} (Thinker)"
    print(format_dry_run(cfg.model.thinker, cfg.parallel, built, towers, flavor), flush=True)
    side = plan_side_models(cfg, world_size)
    if side.lines:
        print("\n".join(side.lines), flush=True)
    if talker is not None:
        print(format_talker(talker, cfg.parallel, build_talker_on_meta(talker) if build else None), flush=True)
        run = talker_run(cfg.stage, code2wav_parameters(cfg.model.code2wav))
        for line in format_talker_run(run, talker, cfg.parallel.ep):
            print(line, flush=True)
        print("training the Talker, the Thinker frozen beside it (parameters only):", flush=True)
        estimates = estimate_talker_memory(talker, cfg.model.thinker, cfg.parallel, cfg.trainer, cfg.stage,
                                           world_size, master_weights=cfg.optim.master_weights, run=run)
        for estimate in estimates:
            estimate.items += side.items(estimate.pipeline_stage)
    else:
        estimates = estimate_memory(cfg.model.thinker, cfg.parallel, cfg.trainer, cfg.stage, world_size,
                                    # packed documents need an [S, S] mask only under context parallelism
                                    # (else varlen flash attention over their boundaries, on the GPU in bf16)
                                    document_mask=cfg.data.name == "shards" and cfg.parallel.cp > 1,
                                    master_weights=cfg.optim.master_weights, extra_items=side.items)
    print(format_estimate(estimates, cfg.dry_run_gpu_memory_gb), flush=True)
    return max(e.total for e in estimates) <= cfg.dry_run_gpu_memory_gb * 1e9
