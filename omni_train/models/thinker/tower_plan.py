"""What transformers' Qwen3-Omni towers work out from their inputs' sizes at every forward (audio chunking,
valid frames, attention windows and the longest one; vision patch positions, position-embedding
interpolation, attention windows), computed on the host from the batch's CPU tensors before they move.

On the device the towers derive these with host reads of device tensors (``tolist``, ``item``, a Python
loop over lengths, boolean indexing): ~25 syncs per step at one audio clip and one image per sequence, each
draining the GPU's queue. transformers lets a caller pass them precomputed (its helpers pop them from the
forward's keyword arguments); ``audio_plan`` / ``vision_plan`` run those same helpers on CPU tensors, where
reading a size costs nothing. Where the installed transformers lacks the helpers they return None and the
towers compute everything themselves.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

_AUDIO_HELPERS = ("chunk_and_pad_features", "get_valid_indices", "get_audio_cu_seqlens", "get_max_seqlen")
_VISION_HELPERS = ("get_vision_interpolation_indices_and_weights", "get_vision_position_ids",
                   "get_vision_attention_seqlens")


def _have(names) -> bool:
    return all(hasattr(hf, name) for name in names)


def flat_audio(input_features: torch.Tensor, feature_attention_mask: torch.Tensor):
    """[N, mel, T] padded features + [N, T] mask -> ([mel, sum of lengths] features, [N] lengths)."""
    lengths = feature_attention_mask.sum(dim=1)
    flat = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)
    return flat, lengths


def audio_plan(tower, input_features: torch.Tensor, feature_attention_mask: torch.Tensor
               ) -> Optional[Dict[str, Any]]:
    """The audio tower's keyword arguments for these (CPU) inputs: its chunked, padded features and
    everything derived from the lengths; the tower then reads neither ``input_features`` nor
    ``feature_lens``."""
    if not _have(_AUDIO_HELPERS):
        return None
    flat, lengths = flat_audio(input_features, feature_attention_mask)
    padded, chunk_lengths = hf.chunk_and_pad_features(flat, lengths, tower.n_window)
    cu_seqlens = hf.get_audio_cu_seqlens(chunk_lengths, lengths, tower.n_window_infer, tower.n_window)
    return dict(padded_feature=padded, chunk_lengths=chunk_lengths,
                valid_indices=hf.get_valid_indices(chunk_lengths, tower.n_window),
                cu_seqlens=cu_seqlens, max_seqlen=hf.get_max_seqlen(cu_seqlens, tower.config))


def vision_plan(tower, grid_thw: torch.Tensor) -> Optional[Dict[str, Any]]:
    """The vision tower's keyword arguments for images or videos of these (CPU) grids."""
    if not _have(_VISION_HELPERS):
        return None
    indices, weights = hf.get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.config.spatial_merge_size)
    cu_seqlens, max_seqlen = hf.get_vision_attention_seqlens(grid_thw, tower.config)
    return dict(interp_indices=indices, interp_weights=weights,
                position_ids=hf.get_vision_position_ids(grid_thw, tower.spatial_merge_size),
                cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

