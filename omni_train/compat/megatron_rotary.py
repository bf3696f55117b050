"""megatron's self-attention rotates queries and keys through ``rotate``: megatron's unfused formula as one
function, compiled on CUDA into one kernel forward and one backward. megatron's own fused path needs
Transformer Engine (and takes no mRoPE at batch size > 1); its unfused one launches six elementwise kernels
per call over the query or key, ~3.5 ms a step at the 30B-A3B width on an H100."""

from __future__ import annotations

from typing import List

import torch

from omni_train.compat.registry import Patch
from omni_train.kernels.compiled import fused


def rotate(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``t`` [s, b, heads, d] rotated by the angles ``freqs`` [s, b, 1, d] (rotate-half pairing): the same
    operations as megatron's ``_apply_rotary_pos_emb_bshd`` with the rotary dimension equal to ``d``, no
    interleaving and mscale 1 (cos and sin rounded to ``t``'s dtype as there)."""
    cos = torch.cos(freqs).to(t.dtype)
    sin = torch.sin(freqs).to(t.dtype)
    first, second = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """megatron's ``apply_rotary_pos_emb`` (same signature), through ``rotate`` where that computes the
    same thing; every other case (packed THD, interleaved, partial rotary, MLA, mscale) goes to megatron."""
    if (cu_seqlens is None and not config.apply_rope_fusion and not config.rotary_interleaved
            and not config.multi_latent_attention and mscale == 1.0 and freqs.shape[-1] == t.shape[-1]):
        return fused(rotate, t.device, dynamic=False)(t, freqs)
    return _MEGATRON_APPLY[0](t, freqs, config=config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)


_MEGATRON_APPLY: List = []


def use_fused_rotary() -> None:
    """Point megatron's self-attention at ``apply_rotary_pos_emb`` above. Idempotent."""
    from megatron.core.transformer import attention

    if attention.apply_rotary_pos_emb is not apply_rotary_pos_emb:
        _MEGATRON_APPLY[:] = [attention.apply_rotary_pos_emb]
        attention.apply_rotary_pos_emb = apply_rotary_pos_emb


PATCHES = [
    Patch("fused_rotary", library="megatron-core", written_for=("0.16.1",),
          targets=("megatron.core.transformer.attention.apply_rotary_pos_emb",),
          why="megatron's unfused rotation is six elementwise kernels per call over the query or key; ours is "
              "the same formula compiled into one (other cases fall through to megatron's)",
          apply=use_fused_rotary),
]
