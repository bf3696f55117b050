"""The Thinker: audio tower + vision tower (transformers' own modules) + our megatron MoE LM.

    OmniThinker
      audio_tower      transformers' Qwen3OmniMoeAudioEncoder   (HF on-disk ``thinker.audio_tower.*``)
      visual           transformers' Qwen3OmniMoeVisionEncoder  (HF on-disk ``thinker.visual.*``)
      language_model   megatron GPTModel from ``build_thinker_lm`` (HF names via thinker_lm_bridge)

The towers are reused from transformers unchanged, so their parameter names are the HF on-disk names
minus the ``thinker.`` prefix and tower weights load by name. The forward follows transformers'
``Qwen3OmniMoeThinkerModel.forward``:

1. token embeddings from the LM's embedding;
2. placeholder positions replaced by tower outputs, in the reference's order: audio, image, video
   (each by ``masked_scatter`` over the [B, S] placeholder mask, i.e. features in batch-then-sequence
   order);
3. DeepStack: the vision encoder's intermediate (deepstack) features are added to the hidden states at
   the image/video positions after decoder layers 0 .. k-1 (k = len(deepstack_visual_indexes)).
   Done with forward hooks on ``language_model.decoder.layers[i]`` that add a dense [S, B, H] tensor,
   zero outside the visual positions (hidden + 0 is exact, so this equals the reference's
   ``hidden[mask] + features``). The tensors are set at the start of every forward and kept until the
   next one, so that activation recomputation during backward sees the same values.

Unused towers under data parallelism: a batch without audio (or without images/videos) would leave that
tower's parameters without gradients, and DDP (torch's, or megatron's bucketed reduce) waits for them.
We add ``0 * sum(p.sum() for p in tower parameters)`` to the embeddings instead of running the tower
on a dummy input: every trainable tower parameter gets an exact zero gradient, nothing is computed
through the tower, and the forward value is unchanged (x + 0.0 == x). Only when grad is enabled and
the tower has trainable parameters.

Layout support: tp = pp = cp = 1 (any data / expert parallel degree). The merge works on the full
sequence; sequence parallelism (needed for MoE with TP), context parallelism and pipeline stages would
need the merge and the DeepStack tensors split like the hidden states; ``build_omni_thinker`` refuses them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from torch.nn.modules.module import _IncompatibleKeys
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoderConfig,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeVisionEncoderConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoder,
    Qwen3OmniMoeVisionEncoder,
)

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from omni_train.compat import transformers_attention
from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.common.tensors import tensors_to
from omni_train.models.thinker import tower_plan
from omni_train.kernels.compiled import triton_available
from omni_train.models.thinker.lm import build_thinker_lm


@dataclass(frozen=True)
class PlaceholderIds:
    """Token ids the processor puts where tower features go."""

    audio: int
    image: int
    video: int


def _placeholder_mask(input_ids: torch.Tensor, token_id: int, features: torch.Tensor, kind: str):
    mask = input_ids == token_id  # [B, S]
    if int(mask.sum()) != features.shape[0]:
        raise ValueError(f"{kind}: {int(mask.sum())} placeholder tokens but {features.shape[0]} features")
    return mask


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """embeds [B, S, H] with the masked positions replaced by features (batch-then-sequence order): what
    ``masked_scatter`` computes, as a gather (each masked position reads feature row "masked positions
    before it") and a select. masked_scatter's backward selects the features' gradient with a boolean mask,
    whose size the host must read (a sync per call in backward); this backward is an index_add."""
    if features.shape[0] == 0:
        return embeds
    index = (torch.cumsum(mask.reshape(-1), 0) - 1).clamp_(min=0)
    rows = features.to(embeds.dtype).index_select(0, index).view(embeds.shape)
    return torch.where(mask[..., None], rows, embeds)


def _data_parallel_rank() -> int:
    """Replica id of a replicated tensor: only data-parallel rank 0 writes it."""
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def _zero_from(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """0 * (sum of the trainable parameters): a zero that gives each of them an exact zero gradient."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params or not torch.is_grad_enabled():
        return None
    return 0.0 * sum(p.sum() for p in params)


# Where omni-convert keeps the thinker's non-LM tensors, by Hugging Face name.
CARRIED_PREFIX = "carried.thinker."


class OmniThinker(torch.nn.Module):
    """Audio and vision towers feeding the megatron Thinker LM. Forward returns what GPTModel returns:
    per-token loss [B, S] with labels, logits [B, S, V] without."""

    def __init__(
        self,
        audio_tower: Qwen3OmniMoeAudioEncoder,
        visual: Qwen3OmniMoeVisionEncoder,
        language_model: torch.nn.Module,
        placeholder_ids: PlaceholderIds,
    ):
        super().__init__()
        self.audio_tower = audio_tower
        self.visual = visual
        self.language_model = language_model
        self.placeholder_ids = placeholder_ids
        self.num_deepstack_levels = len(visual.config.deepstack_visual_indexes)
        layers = language_model.decoder.layers
        if self.num_deepstack_levels > len(layers):
            raise ValueError(f"{self.num_deepstack_levels} DeepStack levels but {len(layers)} decoder layers")
        self._deepstack: Optional[List[torch.Tensor]] = None  # per level, [S, B, H]; set per forward
        for level in range(self.num_deepstack_levels):
            layers[level].register_forward_hook(self._deepstack_hook(level))

    @property
    def config(self):
        """The LM's TransformerConfig (what megatron's DDP and the loop read)."""
        return self.language_model.config

    @property
    def model_type(self):
        """What megatron's schedules read from the model (an encoder-and-decoder or decoder-only model)."""
        return self.language_model.model_type

    def set_input_tensor(self, input_tensor) -> None:
        """megatron's schedules hand the previous pipeline stage's output here (pp=1: None)."""
        self.language_model.set_input_tensor(input_tensor)

    def _deepstack_hook(self, level: int):
        def add_visual_features(module, args, output):
            if self._deepstack is None:
                return None
            hidden, context = output
            return hidden + self._deepstack[level], context

        return add_visual_features

    # ----- checkpointing ----------------------------------------------------------------------------

    TOWERS = ("audio_tower", "visual")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The LM under ``language_model.``, the towers under their module names (the keys load_state_dict
        takes). On disk the LM keeps the keys of an LM-only checkpoint and the towers are stored under
        their Hugging Face names as ``carried.thinker.<tower>.*``: the keys `omni-convert import` writes
        them under, so this model loads an imported checkpoint and exports like one. Tower tensors are
        replicated ShardedTensors (one copy per data-parallel rank, rank 0 writes) and are the
        parameters themselves, so optimizer state maps onto them."""
        lm = self.language_model.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets,
                                                    metadata=metadata)
        state = {f"language_model.{key}": value for key, value in lm.items()}
        replica = _data_parallel_rank()
        for tower in self.TOWERS:
            for name, tensor in getattr(self, tower).state_dict(keep_vars=True).items():
                key = f"{prefix}{CARRIED_PREFIX}{tower}.{name}"
                state[f"{tower}.{name}"] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=replica)
        return state

    def load_state_dict(self, state_dict, strict: bool = True):
        """Each part through its own module's load_state_dict (megatron's for the LM)."""
        parts = {name: {} for name in ("language_model", *self.TOWERS)}
        for key, value in state_dict.items():
            head, _, rest = key.partition(".")
            if head not in parts:
                raise KeyError(f"unexpected key {key!r} in an OmniThinker state dict")
            parts[head][rest] = value
        missing, unexpected = [], []
        for name, part in parts.items():
            result = getattr(self, name).load_state_dict(part, strict=strict)
            if result is not None:
                missing += [f"{name}.{k}" for k in result.missing_keys]
                unexpected += [f"{name}.{k}" for k in result.unexpected_keys]
        return _IncompatibleKeys(missing, unexpected)

    # ----- towers -----------------------------------------------------------------------------------

    def audio_features(self, input_features, feature_attention_mask=None, plan=None) -> torch.Tensor:
        """input_features [N, mel, T] (+ mask [N, T]) -> [tokens, H], audios concatenated. With ``plan``
        (``prepare_media``) the tower reads its precomputed inputs instead."""
        if plan is not None:
            return self.audio_tower(None, feature_lens=None, **plan).last_hidden_state
        if feature_attention_mask is None:
            n, _, t = input_features.shape
            feature_attention_mask = torch.ones(n, t, dtype=torch.long, device=input_features.device)
        flat, lengths = tower_plan.flat_audio(input_features, feature_attention_mask)
        return self.audio_tower(flat, feature_lens=lengths).last_hidden_state

    def visual_features(self, pixel_values, grid_thw, plan=None):
        """Patches [P, C*t*p*p] + grid_thw [N, 3] -> ([tokens, H], [tokens, H] per DeepStack level)."""
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw, **(plan or {}))
        return out.pooler_output, list(out.deepstack_features)

    def prepare_media(self, media, sizes, device) -> dict:
        """The towers' inputs (``data.batch.MediaInputs``: tensors or None, on ``device`` already or still
        on the host) -> forward's keyword arguments on ``device``, with each tower's plan
        (``models/thinker/tower_plan.py``) worked out on the host from ``sizes`` (``data.batch.MediaSizes``:
        host tensors), so that the towers never read a device tensor on the host."""
        plans = {}
        if media.get("input_features") is not None:
            plans["audio_plan"] = self._audio_plan(media["input_features"], sizes.get("feature_attention_mask"),
                                                   device)
        for grid, key in (("image_grid_thw", "image_plan"), ("video_grid_thw", "video_plan")):
            if sizes.get(grid) is not None:
                plans[key] = tower_plan.vision_plan(self.visual, sizes[grid])
        return {**tensors_to(media, device),
                **{key: plan if plan is None else tensors_to(plan, device) for key, plan in plans.items()}}

    def _audio_plan(self, input_features, feature_attention_mask, device) -> Optional[dict]:
        """``tower_plan.audio_plan`` without reading the features on the host: the plan is made for the
        frames' numbers (1.., 0 where a chunk is padded), whose padded chunks then gather the features
        on the device. The same values as chunking the features themselves; only sizes are read."""
        n, _, t = input_features.shape
        mask = torch.ones(n, t, dtype=torch.long) if feature_attention_mask is None else feature_attention_mask
        plan = tower_plan.audio_plan(self.audio_tower, torch.arange(1, n * t + 1).view(n, 1, t), mask)
        if plan is None:
            return None
        frame = plan.pop("padded_feature")[:, 0]  # [chunks, longest chunk]
        features = input_features.to(device, non_blocking=True).permute(0, 2, 1).reshape(n * t, -1)
        features = torch.cat([features.new_zeros(1, features.shape[1]), features])
        index = frame.reshape(-1).to(device, non_blocking=True)
        padded = features.index_select(0, index).view(*frame.shape, -1).permute(0, 2, 1)  # [chunks, mel, len]
        return {**plan, "padded_feature": padded}

    # ----- forward ----------------------------------------------------------------------------------

    def _merge(self, embeds, input_ids, input_features, feature_attention_mask, pixel_values,
               image_grid_thw, pixel_values_videos, video_grid_thw, plans):
        """[B, S, H] embeddings with tower outputs merged; DeepStack tensors [S, B, H] or None."""
        ids = self.placeholder_ids
        zeros = []
        if input_features is not None:
            audio = self.audio_features(input_features, feature_attention_mask, plans.get("audio"))
            embeds = _scatter(embeds, _placeholder_mask(input_ids, ids.audio, audio, "audio"), audio)
        else:
            zeros.append(_zero_from(self.audio_tower))
        levels = None  # DeepStack: per level, [B, S, H], zero outside image / video positions
        for pixels, grid, token_id, kind in (
            (pixel_values, image_grid_thw, ids.image, "image"),
            (pixel_values_videos, video_grid_thw, ids.video, "video"),
        ):
            if pixels is None:
                continue
            feats, deepstack = self.visual_features(pixels, grid, plans.get(kind))
            mask = _placeholder_mask(input_ids, token_id, feats, kind)
            embeds = _scatter(embeds, mask, feats)
            if levels is None:
                levels = [torch.zeros_like(embeds) for _ in deepstack]
            levels = [_scatter(level, mask, f) for level, f in zip(levels, deepstack)]
        if levels is None:
            zeros.append(_zero_from(self.visual))
        for zero in zeros:
            if zero is not None:
                embeds = embeds + zero
        if levels is not None:
            levels = [level.transpose(0, 1).contiguous() for level in levels]  # [S, B, H]
        return embeds, levels

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        input_features: Optional[torch.Tensor] = None,
        feature_attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.Tensor] = None,
        audio_plan: Optional[dict] = None,
        image_plan: Optional[dict] = None,
        video_plan: Optional[dict] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """``*_plan``: the towers' precomputed inputs (``prepare_media``), optional; ``packed_seq_params``:
        documents of packed rows (``models.common.attention.document_attention``), for the LM's attention."""
        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        plans = {"audio": audio_plan, "image": image_plan, "video": video_plan}
        embeds, self._deepstack = self._merge(
            embeds.transpose(0, 1), input_ids, input_features, feature_attention_mask, pixel_values,
            image_grid_thw, pixel_values_videos, video_grid_thw, plans,
        )
        return self.language_model(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=embeds.transpose(0, 1).contiguous(),
            labels=labels,
            packed_seq_params=packed_seq_params,
        )


# ---------------------------------------------------------------------------------------------------


def _thinker_config(hf_config: Union[Qwen3OmniMoeThinkerConfig, Dict]) -> Qwen3OmniMoeThinkerConfig:
    if isinstance(hf_config, Qwen3OmniMoeThinkerConfig):
        return copy.deepcopy(hf_config)
    return Qwen3OmniMoeThinkerConfig(**hf_config)


def _check_layout(parallel_cfg: ParallelConfig) -> None:
    if parallel_cfg.tp > 1 or parallel_cfg.pp > 1 or parallel_cfg.cp > 1 or parallel_cfg.sequence_parallel:
        raise NotImplementedError(
            "OmniThinker merges tower outputs on the full sequence: tp, pp, cp must be 1 and "
            f"sequence_parallel off (got tp={parallel_cfg.tp} pp={parallel_cfg.pp} cp={parallel_cfg.cp} "
            f"sp={parallel_cfg.sequence_parallel})"
        )


def _check_widths(model_cfg: ThinkerConfig, audio_cfg, vision_cfg) -> None:
    widths = {"audio output_dim": audio_cfg.output_dim, "vision out_hidden_size": vision_cfg.out_hidden_size}
    bad = {k: v for k, v in widths.items() if v != model_cfg.hidden_size}
    if bad:
        raise ValueError(f"tower widths {bad} != LM hidden_size {model_cfg.hidden_size}")


def compile_layers(tower: torch.nn.Module) -> None:
    """torch.compile each of a tower's transformer layers in place (dynamic shapes: the token count
    changes with the batch's media). The rest of the tower (convolutions, patch embedding, mergers) runs
    once per forward and stays eager."""
    layers = getattr(tower, "layers", None) or getattr(tower, "blocks", None)
    if layers is None:
        raise ValueError(f"{type(tower).__name__}: no .layers or .blocks to compile")
    for layer in layers:
        layer.compile(dynamic=True)


def _check_registered(attn_implementation: str) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if attn_implementation not in ALL_ATTENTION_FUNCTIONS:
        raise RuntimeError(f"tower attention {attn_implementation!r} is not registered with transformers: "
                           f"call omni_train.compat.apply_all(device_type) first (init_parallel does)")


def _build_tower(cls, config, device, params_dtype, attn_implementation):
    config = copy.deepcopy(config)
    ours = attn_implementation == transformers_attention.NAME
    if ours:
        _check_registered(attn_implementation)
    # transformers would look for a flash-attention package for a name holding "flash": built with SDPA,
    # the towers' attention layers read the name from their (shared) config at each call
    config._attn_implementation = "sdpa" if ours else attn_implementation
    with torch.device(device):
        tower = cls(config)
    if ours:
        tower.config._attn_implementation = attn_implementation
    return tower.to(dtype=params_dtype)


def build_omni_thinker(
    hf_thinker_config: Union[Qwen3OmniMoeThinkerConfig, Dict],
    model_cfg: ThinkerConfig,
    parallel_cfg: ParallelConfig,
    *,
    device: Union[torch.device, str],
    params_dtype: torch.dtype,
    attn_implementation: str = transformers_attention.NAME,
    recompute: str = "none",
) -> OmniThinker:
    """Towers from the HF thinker config (a Qwen3OmniMoeThinkerConfig or its dict: ``audio_config``,
    ``vision_config`` and the placeholder token ids), the LM from ``model_cfg`` (its text_config is not
    read). Tower attention: ``compat/transformers_attention.py`` (varlen flash attention on CUDA, no host sync per
    layer), or a transformers ``attn_implementation`` ("sdpa", "eager"). ``recompute="full"`` recomputes
    the LM's decoder layers and the towers' blocks (transformers' gradient checkpointing) in backward."""
    _check_layout(parallel_cfg)
    hf = _thinker_config(hf_thinker_config)
    audio_cfg: Qwen3OmniMoeAudioEncoderConfig = hf.audio_config
    vision_cfg: Qwen3OmniMoeVisionEncoderConfig = hf.vision_config
    _check_widths(model_cfg, audio_cfg, vision_cfg)
    device = torch.device(device)
    towers = [_build_tower(Qwen3OmniMoeAudioEncoder, audio_cfg, device, params_dtype, attn_implementation),
              _build_tower(Qwen3OmniMoeVisionEncoder, vision_cfg, device, params_dtype, attn_implementation)]
    if recompute == "full":
        for tower in towers:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model_cfg.compile_towers and device.type == "cuda" and triton_available():
        for tower in towers:
            compile_layers(tower)
    return OmniThinker(
        audio_tower=towers[0],
        visual=towers[1],
        language_model=build_thinker_lm(model_cfg, parallel_cfg, device=device, params_dtype=params_dtype,
                                        recompute=recompute),
        placeholder_ids=PlaceholderIds(
            audio=hf.audio_token_id, image=hf.image_token_id, video=hf.video_token_id
        ),
    )
