"""Variable-length attention for transformers' Qwen3-Omni towers, without a host sync per layer.

The towers (``Qwen3OmniMoeAudioEncoder``, ``Qwen3OmniMoeVisionEncoder``) attend within windows of a packed
sequence given by ``cu_seqlens``. Unless a flash-attention implementation is configured, every attention
layer reads the window lengths on the host (``lengths.tolist()``: a sync that drains the GPU's queue) and
runs one SDPA call per window: at 30 s of audio and a 640-pixel image per sequence, ~60 syncs and several
hundred small kernels per forward, and the device idle between them (H100 profile: the omni step
host-bound, device idle ~2/3 of it).

``register_tower_attention()`` adds ``varlen_attention`` to transformers' attention functions under
``NAME``, which holds "flash", so the towers take their packed path and hand it ``cu_seqlens`` and the
longest window: on CUDA one call of torch's variable-length flash attention (``torch.nn.attention.varlen``)
per layer, no sync; elsewhere (CPU, or a torch without it) one ``scaled_dot_product_attention`` per window,
as transformers' own path computes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from omni_train.compat.registry import Patch

NAME = "omni_flash_varlen"


@functools.lru_cache(maxsize=None)
def varlen_kernel():
    """torch's varlen flash attention and the names of its parameters (they differ between torch
    versions), or None where torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def uses_flash_kernel(query: torch.Tensor) -> bool:
    """Whether ``varlen_attention`` runs torch's varlen flash kernel for this input (else SDPA per window)."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and varlen_kernel() is not None


def varlen_attention(module, query, key, value, attention_mask=None, scaling: Optional[float] = None,
                     dropout: float = 0.0, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                     max_length_k=None, is_causal: bool = False, **unused):
    """transformers' attention-function signature for packed sequences: ``query``/``key``/``value``
    [1, heads, tokens, head_dim], windows ``cu_seq_lens_q`` (= ``cu_seq_lens_k``: self-attention within
    each window, not causal). Returns ([1, tokens, heads, head_dim], None)."""
    if attention_mask is not None or dropout or is_causal or query.shape[0] != 1:
        raise NotImplementedError("varlen_attention: packed, non-causal self-attention without mask or dropout")
    if cu_seq_lens_q is None or (cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q
                                 and not torch.equal(cu_seq_lens_k, cu_seq_lens_q)):
        raise NotImplementedError("varlen_attention: self-attention with cu_seq_lens_q == cu_seq_lens_k")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, head_dim]
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    if uses_flash_kernel(q):
        varlen_attn, _ = varlen_kernel()
        cu = cu_seq_lens_q.to(torch.int32)
        longest = int(max_length_q) if max_length_q is not None else q.shape[0]  # an upper bound will do
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale)
    else:
        out = per_window_attention(q, k, v, cu_seq_lens_q, scale)
    return out.unsqueeze(0), None


def per_window_attention(q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """[tokens, heads, head_dim] attention within each window of ``cu_seqlens``, one SDPA call per window."""
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds, bounds[1:]):
        window = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # [1, heads, len, d]
        outs.append(F.scaled_dot_product_attention(*window, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def register_tower_attention() -> None:
    """Make ``NAME`` a transformers attention implementation. Idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)


PATCHES = [
    Patch("tower_varlen_attention", library="transformers", written_for=("5.23.0", "5.17.0"),
          targets=("transformers.modeling_utils.AttentionInterface._global_mapping",),
          why="adds 'omni_flash_varlen': a name holding 'flash' makes the towers take their packed path and "
              "hand over cu_seqlens; otherwise every layer reads window lengths on the host (a sync) and runs "
              "one SDPA per window",
          apply=register_tower_attention),
]
