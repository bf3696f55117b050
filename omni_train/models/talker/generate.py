"""Greedy codec generation from our Talker, with transformers' rules (a reference decoder for tests,
evaluation and DPO candidates; no KV cache: every step reruns the backbone on the whole sequence).

Per step, as ``Qwen3OmniMoeForConditionalGeneration.generate`` with ``talker_do_sample=False``:
1. codebook 0: argmax of ``codec_head`` at the last position after the repetition penalty over the codes
   generated so far (HF's RepetitionPenaltyLogitsProcessor: a logit l of a repeated code becomes l / p if
   l > 0, else l * p) and with every id from ``codec_vocab - 1024`` up suppressed except codec eos;
2. eos, or the last step (``max_new_tokens``): stop; that code gets no residuals and is not a frame;
3. codebooks 1 .. G-1: the code predictor, greedily, one position at a time;
4. the next input: the frame's summed codec embeddings + its text entry.
"""

from __future__ import annotations

from typing import Optional

import torch

from omni_train.models.talker.conditioning import (
    TalkerContext,
    append_frame_positions,
    frame_embeddings,
    text_entries,
    text_position_ids,
)

SUPPRESSED_SPAN = 1024  # transformers: ids in [vocab - 1024, vocab) other than eos are never generated


def suppressed_ids(codec_vocab_size: int, eos: int) -> torch.Tensor:
    return torch.tensor([i for i in range(max(0, codec_vocab_size - SUPPRESSED_SPAN), codec_vocab_size) if i != eos])


def repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    picked = logits.gather(-1, previous)
    return logits.scatter(-1, previous, torch.where(picked < 0, picked * penalty, picked / penalty))


@torch.no_grad()
def residual_codes(talker, state: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """Greedy codebooks 1 .. G-1 of one frame: state [H], c0 [] -> [G-1]."""
    predictor = talker.code_predictor
    c0_embed = talker.codec_embed(c0.view(1)).to(state.dtype)
    codes = c0.new_zeros(1, 0)
    for group in range(predictor.num_residual):
        hidden = predictor.hidden(predictor.frame_inputs(state.view(1, -1), c0_embed, codes))
        logits = predictor.lm_head[group](hidden[:, -1])
        codes = torch.cat([codes, logits.argmax(-1, keepdim=True)], dim=1)
    return codes[0]


@torch.no_grad()
def greedy_codes(talker, context: TalkerContext, max_new_tokens: int,
                 context_positions: Optional[torch.Tensor] = None, penalty: float = 1.05) -> torch.Tensor:
    """Codec frames [K, G] for one conversation's context (``conditioning.build_context``)."""
    cfg = talker.cfg
    embeds = context.inputs_embeds
    positions = context_positions if context_positions is not None else text_position_ids(embeds.shape[0],
                                                                                          device=embeds.device)
    suppressed = suppressed_ids(cfg.codec_vocab_size, cfg.codec.eos).to(embeds.device)
    frames, previous = [], torch.zeros(0, dtype=torch.long, device=embeds.device)
    for step in range(max_new_tokens):
        pos = append_frame_positions(positions, step) if step else positions
        hidden = talker.backbone_hidden(embeds[None], pos[:, None])[0, -1]
        logits = repetition_penalty(talker.codec_logits(hidden).float(), previous, penalty)
        logits[suppressed] = float("-inf")
        c0 = logits.argmax()
        if int(c0) == cfg.codec.eos or step == max_new_tokens - 1:
            break
        previous = torch.cat([previous, c0.view(1)])
        frame = torch.cat([c0.view(1), residual_codes(talker, hidden, c0)])
        frames.append(frame)
        entry = frame_embeddings(talker, frame[None]) + text_entries(context, len(frames))[-1:]
        embeds = torch.cat([embeds, entry.to(embeds.dtype)])
    if not frames:
        return torch.zeros(0, cfg.num_code_groups, dtype=torch.long, device=embeds.device)
    return torch.stack(frames)
