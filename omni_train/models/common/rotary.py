"""TM-RoPE: Qwen3-Omni's interleaved three-section multimodal rotary embedding, for megatron's GPTModel.

Each rotary frequency channel c (0 <= c < head_dim/2) reads one of the three position rows:
the height row when c % 3 == 1 and c < 3 * section_h, the width row when c % 3 == 2 and c < 3 * section_w,
the temporal row otherwise. Angles are then repeated as cat(freqs, freqs) for rotate-half pairing.
This is the layout of transformers' Qwen3-Omni thinker (``interleaved: True``); megatron's own
``MultimodalRotaryEmbedding`` takes contiguous sections instead, so GPTModel's ``rotary_pos_emb`` is
replaced by this module (same call signature as megatron's mrope path).

The rotation itself is megatron's attention's; compat/megatron_rotary.py gives it one compiled kernel.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from omni_train.parallel.context_parallel import slice_for_cp_rank


def interleaved_section_index(mrope_section: Sequence[int]) -> torch.Tensor:
    """Position row (0=temporal, 1=height, 2=width) read by each rotary frequency channel."""
    num_channels = sum(mrope_section)
    index = torch.zeros(num_channels, dtype=torch.long)
    for row in (1, 2):
        index[row : 3 * mrope_section[row] : 3] = row
    return index


def as_three_row_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] text positions -> [3, B, S] (all rows equal); [3, B, S] passes through."""
    if position_ids.dim() == 2:
        return position_ids.unsqueeze(0).expand(3, -1, -1)
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be [B, S] or [3, B, S], got {tuple(position_ids.shape)}")
    return position_ids


class InterleavedMRotaryEmbedding(torch.nn.Module):
    """Rotary angles for [3, B, S] (or [B, S]) position ids, as [S, B, 1, head_dim] (megatron layout)."""

    def __init__(
        self,
        head_dim: int,
        mrope_section: List[int],
        rotary_base: float,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__()
        self.cp_group = cp_group
        if 2 * sum(mrope_section) != head_dim:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        self.register_buffer("inv_freq", 1.0 / (rotary_base**exponents), persistent=False)
        self.register_buffer(
            "section_index", interleaved_section_index(mrope_section), persistent=False
        )

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[3, B, S] or [B, S] positions -> [B, S, head_dim/2] interleaved angles (fp32)."""
        positions = as_three_row_positions(position_ids).to(self.inv_freq.device).float()
        freqs = positions[..., None] * self.inv_freq  # [3, B, S, D/2]
        index = self.section_index.expand(1, *freqs.shape[1:])
        return freqs.gather(0, index).squeeze(0)

    def forward(
        self,
        position_ids: torch.Tensor,
        mrope_section: Optional[List[int]] = None,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> torch.Tensor:
        """Signature of GPTModel's mrope call; ``mrope_section`` is fixed at construction."""
        freqs = self.angles(position_ids)
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        emb = emb.transpose(0, 1)[:, :, None, :].contiguous()  # [S, B, 1, D]
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            # megatron's get_pos_emb_on_this_cp_rank (same zigzag chunks) pins host memory: no CPU.
            emb = slice_for_cp_rank(emb, 0, cp_group.rank(), cp_group.size())
        return emb
