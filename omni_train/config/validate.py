"""Checks a composed config before anything is built. Each failure names the key at fault."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import List, Tuple

from omegaconf import DictConfig, OmegaConf

from omni_train.config.compose import ConfigError
from omni_train.config.talker import (
    DPO_CODEBOOKS, DPO_LOSS_TYPES, SUPPRESSED_CODEC_SPAN, talker_config_problems, talker_layout_problems,
)

CHOICES = {
    "parallel.token_dispatcher": ("alltoall", "allgather"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "optim.name": ("adamw",),
    "optim.lr_decay": ("cosine", "linear", "constant"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "bf16", "fp32"),
    "trainer.recompute": ("none", "full"),
    "trainer.nonfinite": ("stop", "skip"),
    "logger.name": ("none", "wandb"),
    "logger.mode": ("offline", "online", "disabled"),
    "model.thinker.load_balancing": ("aux_loss", "expert_bias"),
    "model.thinker.experts_impl": ("grouped", "sequential"),
    "data.name": ("synthetic_text", "shards"),
    "data.weight_by": ("samples", "tokens"),
    "data.overlong": ("split", "drop"),
    "data.chat.think": ("raw", "keep", "empty", "strip", "last"),
    "data.responses.source": ("messages", "teacher"),
    "data.responses.pick": ("first", "random"),
}

POSITIVE = (
    "parallel.tp", "parallel.pp", "parallel.ep", "parallel.cp",
    "trainer.max_steps", "trainer.log_every", "trainer.global_batch_size", "trainer.micro_batch_size",
    "trainer.seq_length", "checkpoint.save_every", "checkpoint.keep_last", "parallel.collective_timeout_s",
    "model.thinker.num_layers", "model.thinker.hidden_size", "model.thinker.num_attention_heads", "model.thinker.num_query_groups",
    "model.thinker.head_dim", "model.thinker.vocab_size",
)


ADAMW_KERNELS = ("compiled", "torch_fused")


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _check_values(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="absent")
        if value == "absent":  # a key of another data source's schema
            continue
        _require(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        _require(value > 0, key, f"must be > 0, got {value}")
    _require(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    _require(cfg.stage.loss.top_k_weight >= 0, "stage.loss.top_k_weight",
             f"must be >= 0, got {cfg.stage.loss.top_k_weight}")
    if cfg.data.name == "shards":
        _require(cfg.data.responses.top_logprobs >= 0, "data.responses.top_logprobs",
                 f"must be >= 0, got {cfg.data.responses.top_logprobs}")
        _require(cfg.data.responses.top_logprobs == 0 or cfg.data.responses.source == "teacher",
                 "data.responses.top_logprobs", "top log-probabilities come with teacher responses "
                 "(data.responses.source=teacher)")
    model = cfg.model.thinker
    _check_mlp(model)
    _require(model.num_attention_heads % model.num_query_groups == 0, "model.thinker.num_query_groups",
             f"{model.num_query_groups} does not divide model.thinker.num_attention_heads={model.num_attention_heads}")
    _require(sum(model.mrope_section) * 2 == model.head_dim, "model.thinker.mrope_section",
             f"sections {list(model.mrope_section)} must sum to model.thinker.head_dim/2={model.head_dim // 2}")
    _require(0 <= cfg.optim.warmup_steps < cfg.trainer.max_steps, "optim.warmup_steps",
             f"{cfg.optim.warmup_steps} must be >= 0 and < trainer.max_steps={cfg.trainer.max_steps}")
    _require(0 <= cfg.optim.min_lr <= cfg.optim.lr, "optim.min_lr",
             f"{cfg.optim.min_lr} must be between 0 and optim.lr={cfg.optim.lr}")
    _require(cfg.optim.master_weights or not cfg.parallel.distributed_optimizer, "optim.master_weights",
             "false needs parallel.distributed_optimizer=false (megatron's distributed optimizer keeps fp32 "
             "main params)")
    _require(cfg.optim.kernel in ADAMW_KERNELS, "optim.kernel",
             f"must be one of {ADAMW_KERNELS}, got {cfg.optim.kernel!r}")
    _require(cfg.trainer.max_nonfinite_skips >= 0, "trainer.max_nonfinite_skips",
             f"must be >= 0, got {cfg.trainer.max_nonfinite_skips}")
    stop = cfg.trainer.stop_at_step
    _require(stop is None or 1 <= stop <= cfg.trainer.max_steps, "trainer.stop_at_step",
             f"{stop} is outside 1..trainer.max_steps={cfg.trainer.max_steps}")
    _check_phases(cfg)
    init_from = cfg.init_from
    _require(init_from is None or not init_from.startswith("stage:") or len(init_from) > 6,
             "init_from", "expected stage:<name> or a checkpoint path")


def _check_mlp(model: DictConfig) -> None:
    """MoE (num_experts > 0: top-k of them, each of moe_ffn_hidden_size) or dense (num_experts = 0: one
    SwiGLU MLP of ffn_hidden_size per layer)."""
    _require(model.num_experts >= 0, "model.thinker.num_experts", f"must be >= 0, got {model.num_experts}")
    if model.num_experts == 0:
        _require(model.ffn_hidden_size > 0, "model.thinker.ffn_hidden_size",
                 f"a dense LM (model.thinker.num_experts=0) needs ffn_hidden_size > 0, got {model.ffn_hidden_size}")
        return
    for key in ("router_topk", "moe_ffn_hidden_size"):
        _require(model[key] > 0, f"model.thinker.{key}", f"must be > 0 with experts, got {model[key]}")
    _require(model.router_topk <= model.num_experts, "model.thinker.router_topk",
             f"{model.router_topk} exceeds model.thinker.num_experts={model.num_experts}")


def _check_phases(cfg: DictConfig) -> None:
    phases = cfg.stage.phases
    if not phases:
        return
    for i, phase in enumerate(phases):
        _require(phase.steps > 0, f"stage.phases[{i}].steps", f"must be > 0, got {phase.steps}")
    total = sum(p.steps for p in phases)
    _require(total == cfg.trainer.max_steps, "stage.phases",
             f"phase steps {[p.steps for p in phases]} add up to {total}, not trainer.max_steps="
             f"{cfg.trainer.max_steps}")


def _check_shards(cfg: DictConfig) -> None:
    """data=shards: every dataset directory and the tokenizer exist before anything starts (a dry run reads
    no data: it checks the weights and that a tokenizer is named, not that the paths exist)."""
    data = cfg.data
    if data.name != "shards":
        return
    _require(len(data.datasets) > 0, "data.datasets", "data=shards needs at least one dataset")
    for i, dataset in enumerate(data.datasets):
        key = f"data.datasets[{i}]"
        _require(cfg.dry_run or (Path(dataset.path) / "index.json").is_file(), f"{key}.path",
                 f"{dataset.path!r} has no index.json (build it with `omni-data build`)")
        _require(dataset.weight > 0, f"{key}.weight", f"must be > 0, got {dataset.weight}")
    _require(data.tokenizer is not None and (cfg.dry_run or Path(data.tokenizer).is_dir()), "data.tokenizer",
             f"{data.tokenizer!r} is not a tokenizer directory")


def _check_towers(cfg: DictConfig) -> None:
    """The towers are replicated on every rank and merged on the full sequence: no model parallelism."""
    if not cfg.model.thinker.towers:
        return
    par = cfg.parallel
    for name in ("tp", "pp", "cp"):
        _require(par[name] == 1, f"parallel.{name}",
                 f"model.thinker.towers=true needs {name}=1 (towers are replicated, not sharded), got {par[name]}")
    _require(not par.sequence_parallel, "parallel.sequence_parallel",
             "model.thinker.towers=true does not support sequence parallelism")
    audio, vision = cfg.model.thinker.audio_tower, cfg.model.thinker.vision_tower
    _require(audio.n_window == 50, "model.thinker.audio_tower.n_window",
             f"must be 50 (the data's audio placeholder count assumes it), got {audio.n_window}")
    _require(audio.num_mel_bins == 128, "model.thinker.audio_tower.num_mel_bins",
             f"must be 128 (the data's log-mel bins), got {audio.num_mel_bins}")
    for key, want in (("patch_size", 16), ("spatial_merge_size", 2), ("temporal_patch_size", 2)):
        _require(vision[key] == want, f"model.thinker.vision_tower.{key}",
                 f"must be {want} (the data's patching), got {vision[key]}")
    levels = len(vision.deepstack_visual_indexes)
    _require(levels <= cfg.model.thinker.num_layers, "model.thinker.vision_tower.deepstack_visual_indexes",
             f"{levels} DeepStack levels but model.thinker.num_layers={cfg.model.thinker.num_layers}")
    _require(all(0 <= i < vision.depth for i in vision.deepstack_visual_indexes),
             "model.thinker.vision_tower.deepstack_visual_indexes",
             f"{list(vision.deepstack_visual_indexes)} must index blocks 0..depth-1 (depth={vision.depth})")


TALKER_CHOICES = {"load_balancing": ("aux_loss", "expert_bias"), "experts_impl": ("grouped", "sequential")}
# registered stage code (stage.base or stage.name) that builds and trains the Talker (omni_train/stages/)
TALKER_STAGES = ("talker_pretrain", "talker_dpo", "speaker_finetune")


def _check_talker(cfg: DictConfig) -> None:
    """model.talker: set exactly when the stage trains the Talker (TALKER_STAGES; any stage in a dry run); its
    own consistency (config/talker.py), its fit to the Thinker that conditions it, and the layout it takes
    (config/talker.py ``talker_layout_problems``: tp with sequence parallelism, pp and ep dividing its sizes;
    cp = 1)."""
    talker, thinker, par = cfg.model.talker, cfg.model.thinker, cfg.parallel
    code = cfg.stage.base or cfg.stage.name
    if talker is None:
        _require(code not in TALKER_STAGES, "model.talker",
                 f"stage {cfg.stage.name!r} trains the Talker: choose a model with one (e.g. model=tiny_omni_talker)")
        return
    problems = talker_config_problems(talker)
    if problems:
        name, problem = problems[0]
        raise ConfigError(f"model.talker.{name}", problem)
    for name, allowed in TALKER_CHOICES.items():
        _require(talker[name] in allowed, f"model.talker.{name}",
                 f"{talker[name]!r} is not one of {', '.join(allowed)}")
    _require(talker.thinker_hidden_size == thinker.hidden_size, "model.talker.thinker_hidden_size",
             f"{talker.thinker_hidden_size} must equal model.thinker.hidden_size={thinker.hidden_size} (the "
             "projections read the Thinker's states)")
    _require(1 <= talker.accept_hidden_layer <= thinker.num_layers, "model.talker.accept_hidden_layer",
             f"{talker.accept_hidden_layer} must be in 1..model.thinker.num_layers={thinker.num_layers}")
    for name, value in talker.text.items():
        _require(0 <= value < thinker.vocab_size, f"model.talker.text.{name}",
                 f"{value} is not a Thinker token id (model.thinker.vocab_size={thinker.vocab_size})")
    layout = talker_layout_problems(talker, par)
    if layout:
        key, problem = layout[0]
        raise ConfigError(key, problem)
    # A stage that does not build the Talker would train the Thinker and silently carry this section into
    # its checkpoints and export; the dry run plans the Talker's training under any stage.
    _require(cfg.dry_run or code in TALKER_STAGES, "model.talker",
             f"stage {cfg.stage.name!r} does not train the Talker (the Talker's stages run "
             f"{', '.join(TALKER_STAGES)}); drop the Talker (a model without it) or dry_run=true plans one")


def _check_dpo(cfg: DictConfig) -> None:
    """stage.dpo of the talker_dpo stage (losses/dpo.py's rules, before anything is built)."""
    if (cfg.stage.base or cfg.stage.name) != "talker_dpo":
        return
    dpo = cfg.stage.dpo
    _require(dpo.loss_type in DPO_LOSS_TYPES, "stage.dpo.loss_type",
             f"{dpo.loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    _require(dpo.codebooks in DPO_CODEBOOKS, "stage.dpo.codebooks",
             f"{dpo.codebooks!r} is not one of {', '.join(DPO_CODEBOOKS)} (codebook 0 only, or every codebook)")
    _require(dpo.beta > 0, "stage.dpo.beta", f"must be > 0, got {dpo.beta}")
    _require(dpo.sft_weight >= 0, "stage.dpo.sft_weight", f"must be >= 0, got {dpo.sft_weight}")
    _require(dpo.loss_type != "ipo" or dpo.label_smoothing == 0, "stage.dpo.label_smoothing",
             "ipo takes no label smoothing")
    _require(0 <= dpo.label_smoothing < 0.5, "stage.dpo.label_smoothing",
             f"must be in [0, 0.5), got {dpo.label_smoothing}")


VOICE_NAME = re.compile(r"[a-z0-9_-]+")  # generate(speaker=...) looks the name up lowercased; a checkpoint key part


def voice_id_span(talker) -> Tuple[int, int]:
    """[lo, hi): the codec ids a new voice may take: inside the codec vocabulary, above codebook 0's codes and in
    the top SUPPRESSED_CODEC_SPAN ids, which transformers' generate never samples (only eos, a taken id)."""
    return (max(talker.code_predictor.codebook_size, talker.codec_vocab_size - SUPPRESSED_CODEC_SPAN),
            talker.codec_vocab_size)


def _taken_codec_ids(talker) -> set:
    c = talker.codec
    return {c.pad, c.bos, c.eos, c.nothink, c.think_bos, c.think_eos, *c.speakers.values()}


def speaker_codec_id(speaker, talker) -> int:
    """The codec id of voice ``speaker.name`` (stage.speaker): a configured speaker's own; else ``speaker.id``;
    else the first free id above every special and speaker id (the release's speakers are 2301-2303: a new one
    gets 2304), wrapping to the lowest free id of ``voice_id_span``. ValueError when none is free."""
    if speaker.name in talker.codec.speakers:
        return talker.codec.speakers[speaker.name]
    if speaker.id is not None:
        return speaker.id
    lo, hi = voice_id_span(talker)
    taken = _taken_codec_ids(talker)
    above = max(taken) + 1
    free = [i for i in [*range(max(above, lo), hi), *range(lo, hi)] if i not in taken]
    if not free:
        raise ValueError(f"no free codec id in {lo}..{hi - 1}")
    return free[0]


def speaker_problems(speaker, talker) -> List[Tuple[str, str]]:
    """(key, problem) for a stage.speaker (SpeakerConfig) that model.talker cannot take; keys are
    ``stage.speaker.<field>``."""
    name = speaker.name
    if not VOICE_NAME.fullmatch(name or ""):
        return [("stage.speaker.name", f"{name!r} must be a lowercase word of a-z, 0-9, '_', '-' (transformers' "
                                       "generate looks speakers up lowercased)")]
    speakers = dict(talker.codec.speakers)
    if name in speakers:  # an existing voice is refined at its own id, from its own row
        if speaker.id is not None and speaker.id != speakers[name]:
            return [("stage.speaker.id", f"{speaker.id}: {name!r} is model.talker.codec.speakers' voice at "
                                         f"{speakers[name]} (leave stage.speaker.id null to refine it)")]
        return []
    problems = []
    lo, hi = voice_id_span(talker)
    if speaker.id is not None:
        taken = {v: k for k, v in speakers.items()}
        taken.update({getattr(talker.codec, k): f"codec.{k}" for k in ("pad", "bos", "eos", "nothink", "think_bos",
                                                                       "think_eos")})
        if not lo <= speaker.id < hi:
            problems.append(("stage.speaker.id", f"{speaker.id} is outside {lo}..{hi - 1} (above codebook 0's "
                                                 "codes, in the ids generate never samples)"))
        elif speaker.id in taken:
            problems.append(("stage.speaker.id", f"{speaker.id} is taken by {taken[speaker.id]!r}"))
    else:
        try:
            speaker_codec_id(speaker, talker)
        except ValueError as error:
            problems.append(("stage.speaker.id", str(error)))
    if speaker.init != "mean" and speaker.init not in speakers:
        problems.append(("stage.speaker.init", f"{speaker.init!r} is neither 'mean' nor one of "
                                               f"model.talker.codec.speakers ({', '.join(sorted(speakers))})"))
    elif speaker.init == "mean" and not speakers:
        problems.append(("stage.speaker.init", "'mean' of no speakers: model.talker.codec.speakers is empty"))
    return problems


def _check_speaker(cfg: DictConfig) -> None:
    """stage.speaker: set for the speaker_finetune stage (its voice: a name, a legal free id, a known init)."""
    if (cfg.stage.base or cfg.stage.name) != "speaker_finetune" or cfg.model.talker is None:
        return
    _require(cfg.stage.speaker is not None, "stage.speaker", "speaker_finetune needs the voice it trains "
             "(stage.speaker.name)")
    problems = speaker_problems(cfg.stage.speaker, cfg.model.talker)
    if problems:
        raise ConfigError(*problems[0])


def _check_layout(cfg: DictConfig, world_size: int) -> None:
    par, model, trainer = cfg.parallel, cfg.model.thinker, cfg.trainer
    model_parallel = par.tp * par.pp * par.cp
    for name in ("tp", "pp", "cp", "ep"):
        size = par[name]
        _require(world_size % size == 0, f"parallel.{name}",
                 f"world size {world_size} is not divisible by {name}={size}")
    _require(world_size % model_parallel == 0, "parallel.tp",
             f"world size {world_size} is not divisible by tp*pp*cp={par.tp}*{par.pp}*{par.cp}")
    _require(world_size % (par.tp * par.pp * par.ep) == 0, "parallel.ep",
             f"world size {world_size} is not divisible by tp*pp*ep={par.tp}*{par.pp}*{par.ep}")
    _require(model.num_experts % par.ep == 0 and (model.num_experts > 0 or par.ep == 1), "parallel.ep",
             f"model.thinker.num_experts={model.num_experts} is not divisible by ep={par.ep}"
             + (" (a dense LM has no experts to split: ep=1)" if model.num_experts == 0 else ""))
    _require(model.num_attention_heads % par.tp == 0, "parallel.tp",
             f"model.thinker.num_attention_heads={model.num_attention_heads} is not divisible by tp={par.tp}")
    _require(model.num_query_groups % par.tp == 0, "parallel.tp",
             f"model.thinker.num_query_groups={model.num_query_groups} is not divisible by tp={par.tp}")
    _require(model.num_layers % par.pp == 0, "parallel.pp",
             f"model.thinker.num_layers={model.num_layers} is not divisible by pp={par.pp}")
    _require(not par.sequence_parallel or par.tp > 1, "parallel.sequence_parallel", "needs tp > 1")
    _require(par.tp == 1 or par.sequence_parallel or model.num_experts == 0, "parallel.sequence_parallel",
             "MoE layers with tp > 1 need sequence_parallel=true (megatron-core requires it)")
    _require(trainer.seq_length % (2 * par.cp) == 0 or par.cp == 1, "trainer.seq_length",
             f"{trainer.seq_length} is not divisible by 2*cp={2 * par.cp}")
    if cfg.dry_run:  # a dry run describes the layout; it runs no batch
        return
    dp = world_size // model_parallel
    per_step = trainer.micro_batch_size * dp
    _require(trainer.global_batch_size % per_step == 0, "trainer.global_batch_size",
             f"{trainer.global_batch_size} is not divisible by micro_batch_size*dp="
             f"{trainer.micro_batch_size}*{dp}")


def smallest_world_size(cfg: DictConfig) -> int:
    """The fewest processes the layout needs: a multiple of tp*pp*cp and of tp*pp*ep."""
    par = cfg.parallel
    return par.tp * par.pp * math.lcm(par.cp, par.ep)


def validate_config(cfg: DictConfig, world_size: int, cuda_available: bool) -> None:
    """Raise ConfigError (one line, naming the key) if `cfg` cannot run on `world_size` processes."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:
        from omni_train.config.compose import as_config_error

        raise as_config_error(exc) from exc
    _check_values(cfg)
    _check_shards(cfg)
    _check_towers(cfg)
    _check_talker(cfg)
    _check_speaker(cfg)
    _check_dpo(cfg)
    _check_layout(cfg, world_size)
    trainer = cfg.trainer
    if cfg.dry_run:
        return
    _require(trainer.device != "cuda" or cuda_available, "trainer.device",
             "cuda requested but no GPU is visible")
    on_gpu = trainer.device == "cuda" or (trainer.device == "auto" and cuda_available)
    _require(on_gpu or trainer.precision != "bf16", "trainer.precision",
             "bf16 needs a GPU; CPU runs are fp32")
