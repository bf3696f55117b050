"""Context parallelism (CP): which tokens of a micro-batch each CP rank holds.

Convention (megatron's "load-balanced" layout, the one its rotary and loss code assume): the sequence
of length S is cut into 2 * cp_size equal chunks; CP rank r holds chunks r and 2 * cp_size - 1 - r,
concatenated in that order. Under causal attention, early chunks are cheap and late chunks are
expensive, so every rank gets one of each and the work is balanced. S must divide by 2 * cp_size.

What is split, what is not (the batch kinds of ``data/batch.py``):
    input_ids, labels, loss_mask,
    modality_ids                  [B, S]     -> [B, S / cp_size]  (this rank's two chunks)
    position_ids                  [3, B, S]  -> unchanged (FULL sequence): the rotary module computes
                                               angles for all S positions and keeps this rank's
                                               chunks itself (``models/common/rotary.py``), as megatron's
                                               GPTModel expects of ``rotary_pos_emb``.
    document_ids                  [B, S]     -> unchanged: attention builds the full-sequence document
                                               mask from them and takes this rank's query rows of it
                                               (``models/common/attention.py``).
    cu_seqlens, max_seqlen                   -> unchanged: they describe the full rows and are unused
                                               under CP (slicing the tokens would not slice them).
    media, media_sizes, keys                 -> unchanged (per item, not per token).
A tensor entry not named here is an error under CP rather than passed on uncut.
The per-token loss the model returns is then [B, S / cp_size]; summing it (and the loss mask) over
CP ranks gives the full-sequence sums, and parameter gradients are summed over the data-parallel x
context-parallel group (megatron's DDP / finalize_model_grads do this).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

# Keys of a micro-batch holding one value per token, sequence in the last dim.
PER_TOKEN_KEYS = ("input_ids", "labels", "loss_mask", "modality_ids")
# Tensors every CP rank keeps whole (see the module docstring).
FULL_SEQUENCE_KEYS = ("position_ids", "document_ids", "cu_seqlens")


def zigzag_chunks(cp_rank: int, cp_size: int) -> Tuple[int, int]:
    """The two global chunk indices (out of 2 * cp_size) that CP rank ``cp_rank`` holds, in order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp_size {cp_size}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def slice_for_cp_rank(tensor: torch.Tensor, seq_dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's two zigzag chunks of ``tensor`` along ``seq_dim``, concatenated. Device-agnostic."""
    if cp_size == 1:
        return tensor
    seq_len = tensor.shape[seq_dim]
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} must be divisible by 2 * cp_size = {2 * cp_size}"
        )
    chunks = tensor.chunk(2 * cp_size, dim=seq_dim)
    first, second = zigzag_chunks(cp_rank, cp_size)
    return torch.cat([chunks[first], chunks[second]], dim=seq_dim)


def split_for_context_parallel(batch: Dict, cp_rank: int, cp_size: int) -> Dict:
    """This CP rank's share of a micro-batch (see the module docstring). Identity when cp_size == 1.

    Per-token tensors (``PER_TOKEN_KEYS``, [B, S]) are cut to this rank's two chunks along the last
    dim; ``FULL_SEQUENCE_KEYS`` stay whole; other tensors are refused (nothing is passed on uncut by
    accident); entries that are not tensors (numbers, lists, media dicts) are passed through.
    """
    if cp_size == 1:
        return batch
    unknown = [k for k, v in batch.items()
               if torch.is_tensor(v) and k not in PER_TOKEN_KEYS and k not in FULL_SEQUENCE_KEYS]
    if unknown:
        raise ValueError(f"split_for_context_parallel: batch tensors {unknown} are neither per-token nor "
                         "full-sequence (PER_TOKEN_KEYS / FULL_SEQUENCE_KEYS)")
    out = dict(batch)
    for key in PER_TOKEN_KEYS:
        value = batch.get(key)
        if value is not None:
            out[key] = slice_for_cp_rank(value, value.dim() - 1, cp_rank, cp_size)
    return out
