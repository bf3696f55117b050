"""The dry run's count of what a stage holds besides the model it trains: its frozen models
(``stage.frozen_models``: a teacher, a reference) and, for ``stage.loop: rollout``, the rollout engine
(``stage.rollout``). Computed from the configs; nothing is built or loaded.

Frozen model, per rank (laid out like the trained model: the same tp and pp; its experts over the same ep,
a dense model replicated over ep ranks):
  * parameters in the parameter dtype (bf16), no gradients, no optimizer state;
  * the logits of one micro-batch (micro_batch_size x seq_length / cp tokens, V / tp columns) in fp32, on
    the last pipeline stage: a distillation loss reads them beside the trained model's. Its forward runs
    under no_grad, so one layer's activations at a time are its only other memory: not counted (at the
    sizes planned here they are well under its logits).
  Its sizes: ``hf:<dir>`` reads ``<dir>/config.json`` (Qwen3 dense, Qwen3-MoE or Qwen3-Omni) when it is on
  this machine; else ``model: <flavor>`` (conf/model/<flavor>.yaml's ``thinker``); ``init`` and checkpoint
  sources have the trained model's sizes unless ``model`` names a flavor. An Omni teacher carries the
  trained model's towers when the trained model has them (import_in_memory's rule), at their sizes.

Rollout engine (``stage.loop: rollout``), per rank, with S = sequences in flight (rollout.generation_batch,
or ceil(prompts_per_step / dp) * sampling.n when 0) of T = max_prompt_tokens + sampling.max_new_tokens:
  * backend hf: a full, unsharded bf16 copy of the policy (towers included when on) plus a KV cache of
    layers x 2 x kv_heads x head_dim x T x S x 2 bytes;
  * backend megatron: the trained model's own weights (nothing more) and the KV cache of the layers and kv
    heads this rank holds: (layers / pp) x 2 x (kv_heads / tp) x head_dim x T x S x 2 bytes.
All of these are added to every phase's peak (the engine's weights stay resident between rollouts; its KV
cache and a teacher's logits are counted as if live during the update: an upper bound).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

from omegaconf import OmegaConf

from omni_train.config.compose import ConfigError
from omni_train.config.rollout import BACKENDS, RolloutConfig
from omni_train.config.schema import FrozenModelConfig, ModelConfig, ParallelConfig, ThinkerConfig, TrainConfig
from omni_train.planning.memory_estimate import FP32, GB, Layout, MemoryItem, param_bytes
from omni_train.planning.param_inventory import count_thinker_parameters, rank_parameters

KV_BYTES = 2  # bf16 keys and values


def flavor_thinker(name: str, key: str) -> ThinkerConfig:
    """The ``thinker`` section of conf/model/<name>.yaml, typed; ConfigError naming ``key`` if there is none."""
    from omni_train.models import flavors

    found = flavors()
    if name not in found:
        raise ConfigError(key, f"no model flavor {name!r} in conf/model/ (known: {', '.join(found)})")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(found[name]))
    return OmegaConf.to_object(merged).thinker


def hf_thinker(hf_dir: Path, trained: ThinkerConfig) -> ThinkerConfig:
    """LM sizes from a Hugging Face directory's config.json (the import's own reading and refusals)."""
    from omni_train.models.thinker.hf_sources import detect_source, read_hf_config
    from omni_train.models.thinker.bridge import model_config_from_hf

    source = detect_source(hf_dir)
    _, text = read_hf_config(hf_dir, source)
    sizes = model_config_from_hf(text)
    if source == "qwen3_omni_moe" and trained.towers:
        sizes = dataclasses.replace(sizes, towers=True, audio_tower=trained.audio_tower,
                                    vision_tower=trained.vision_tower)
    return sizes


def frozen_sizes(spec: FrozenModelConfig, index: int, trained: ThinkerConfig) -> Tuple[ThinkerConfig, str]:
    """(sizes, where they came from) of ``stage.frozen_models[index]`` (see the module docstring)."""
    key = f"stage.frozen_models[{index}]"
    if spec.source.startswith("hf:"):
        config = Path(spec.source.removeprefix("hf:")) / "config.json"
        if config.is_file():
            try:
                return hf_thinker(config.parent, trained), str(config)
            except ValueError as error:
                raise ConfigError(f"{key}.source", str(error)) from None
        if spec.model is None:
            raise ConfigError(f"{key}.model", f"{config} is not on this machine: name the conf/model flavor of "
                              "its sizes (e.g. model: qwen3_32b)")
    if spec.model is not None:
        return flavor_thinker(spec.model, f"{key}.model"), f"conf/model/{spec.model}.yaml"
    return trained, "the trained model's"


def frozen_layout(sizes: ThinkerConfig, parallel: ParallelConfig) -> ParallelConfig:
    """The trained model's layout; a dense model builds no expert-parallel layers (replicated over ep)."""
    return dataclasses.replace(parallel, ep=parallel.ep if sizes.num_experts else 1)


def rollout_sequences(rollout: RolloutConfig, dp: int) -> int:
    """Sequences one rank generates at once."""
    if rollout.generation_batch:
        return rollout.generation_batch
    return math.ceil(rollout.prompts_per_step / dp) * rollout.sampling.n


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, sequences: int) -> int:
    return layers * 2 * kv_heads * head_dim * tokens * sequences * KV_BYTES


@dataclass
class SideModels:
    """What the dry run adds for a stage's frozen models and rollout engine: lines to print, and the memory
    items of each pipeline stage (``items(pp_stage)``)."""

    pp: int = 1
    lines: List[str] = field(default_factory=list)
    every_stage: List[MemoryItem] = field(default_factory=list)
    per_stage: List[List[MemoryItem]] = field(default_factory=list)  # frozen parameters, by pp stage
    last_stage: List[MemoryItem] = field(default_factory=list)  # frozen models' logits

    def items(self, pp_stage: int) -> List[MemoryItem]:
        out = [stage[pp_stage] for stage in self.per_stage] + list(self.every_stage)
        return out + (list(self.last_stage) if pp_stage == self.pp - 1 else [])


def _frozen(spec: FrozenModelConfig, index: int, cfg: TrainConfig, tokens: int, side: SideModels) -> None:
    sizes, origin = frozen_sizes(spec, index, cfg.model.thinker)
    layout = frozen_layout(sizes, cfg.parallel)
    try:
        per_stage = [sum(p.numel for p in rank_parameters(sizes, layout, s)) for s in range(layout.pp)]
    except ValueError as error:
        raise ConfigError(f"stage.frozen_models[{index}]", f"{spec.name!r} ({origin}): {error}") from None
    pbytes = param_bytes(cfg.trainer)
    total, active = count_thinker_parameters(sizes)
    kind = "dense" if sizes.num_experts == 0 else f"MoE, {sizes.num_experts} experts top-{sizes.router_topk}"
    ep = f" ep={layout.ep}" if sizes.num_experts else " (dense: replicated over ep)"
    side.lines.append(
        f"frozen model {spec.name!r} ({spec.source}; sizes from {origin}): {kind}, {total:,} parameters "
        f"({total / 1e9:.2f} B), {active / 1e9:.2f} B active; per rank at tp={layout.tp} pp={layout.pp}{ep}: "
        f"{max(per_stage):,} ({pbytes * max(per_stage) / GB:.2f} GB)")
    side.per_stage.append([MemoryItem(f"{spec.name} parameters", pbytes * n,
                                      f"frozen {spec.name!r}: {n:,} held, {pbytes} bytes each, no grads or "
                                      "optimizer state") for n in per_stage])
    vocab = sizes.vocab_size // layout.tp
    side.last_stage.append(MemoryItem(f"{spec.name} logits", FP32 * tokens * vocab,
                                      f"[{tokens:,}, {vocab:,}] fp32, one micro-batch"))


def _rollout(rollout: RolloutConfig, model: ThinkerConfig, parallel: ParallelConfig, dp: int,
             side: SideModels) -> None:
    if rollout.backend not in BACKENDS:
        raise ConfigError("stage.rollout.backend", f"{rollout.backend!r} is not one of {', '.join(BACKENDS)}")
    sequences = rollout_sequences(rollout, dp)
    tokens = rollout.max_prompt_tokens + rollout.sampling.max_new_tokens
    if rollout.backend == "hf":
        total, _ = count_thinker_parameters(model)
        side.every_stage.append(MemoryItem("rollout policy copy", 2 * total,
                                           f"{total:,} parameters, unsharded, bf16 (transformers)"))
        layers, kv = model.num_layers, model.num_query_groups
    else:  # megatron's engine over the trained model's own weights: this rank's layers and kv heads
        layers, kv = model.num_layers // parallel.pp, model.num_query_groups // parallel.tp
    cache = kv_cache_bytes(layers, kv, model.head_dim, tokens, sequences)
    how = ("generation_batch" if rollout.generation_batch
           else f"ceil({rollout.prompts_per_step} prompts / dp {dp}) x n {rollout.sampling.n}")
    detail = (f"{layers} layers x 2 x {kv} kv heads x {model.head_dim} x {tokens} tokens x {sequences} "
              f"sequences ({how}) x {KV_BYTES} bytes")
    side.every_stage.append(MemoryItem("rollout KV cache", cache, detail))
    side.lines.append(f"rollout engine {rollout.backend}: KV cache {cache / GB:.2f} GB per rank = {detail}"
                      + (f"; policy copy {2 * total / GB:.2f} GB" if rollout.backend == "hf" else
                         " (weights shared with the trained model)"))


def plan_side_models(cfg: TrainConfig, world_size: int) -> SideModels:
    """The frozen models' and (stage.loop == "rollout") the rollout engine's lines and memory items."""
    p = cfg.parallel
    layout = Layout(world_size, p.tp, p.pp, p.ep, p.cp)
    tokens = cfg.trainer.micro_batch_size * cfg.trainer.seq_length // p.cp
    side = SideModels(pp=p.pp)
    for index, spec in enumerate(cfg.stage.frozen_models):
        _frozen(spec, index, cfg, tokens, side)
    if cfg.stage.loop == "rollout":
        _rollout(cfg.stage.rollout, cfg.model.thinker, p, layout.dp, side)
    return side
