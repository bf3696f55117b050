"""The Talker's input sequence for one conversation, as transformers' ``Qwen3OmniMoeForConditionalGeneration
.generate`` builds it (``_get_talker_user_parts``, ``_get_talker_assistant_parts``, the talker's
``prepare_inputs_for_generation``), laid out for teacher forcing.

Inputs, per conversation: the Thinker token ids ``input_ids`` [S] of the whole conversation (its last turn
``<|im_start|>assistant\\n`` + the reply), the Thinker's input embeddings [S, Ht] (``hidden_states[0]``),
its hidden states after ``accept_hidden_layer`` layers [S, Ht] (only read at audio/image/video
placeholders of user turns; None when there are none) and the Thinker embedding-table rows of
tts_bos, tts_eos, tts_pad [3, Ht].

Sequence (text channel + codec channel, summed):
    user turns      every position of every user turn (``<|im_start|>user ... <|im_end|>\\n``, a role read
                    off the token after the last ``<|im_start|>``): placeholders ->
                    hidden_projection(accept-layer hidden), other tokens -> text_projection(input embedding)
    prefix (9)      0-2 proj(<|im_start|>, assistant, \\n) + 0; 3-5 proj(tts_pad) + emb(nothink / think_bos /
                    think_eos); 6 proj(tts_pad) + emb(speaker); 7 proj(tts_bos) + emb(codec pad);
                    8 proj(first reply token) + emb(codec bos)
    frame k         emb(C[k,0]) + sum_j code_predictor.codec_embedding[j-1](C[k,j]) + text entry k, where the
                    text entries are proj(reply tokens 1, 2, ...), then proj(tts_eos), then proj(tts_pad)
Codebook-0 targets: prefix position 8 -> C[0,0], frame k -> C[k+1,0], the last frame -> codec eos.

The reply ends before the first ``<|im_end|>`` after the assistant prefix (or at the end of ``input_ids``):
single-conversation ``generate`` never embeds the Thinker's final end-of-turn token, so it is not a text
entry and tts_eos follows the last reply token. (Batched ``generate`` differs for rows that finish before
the longest one: they get proj(<|im_end|>) as a text entry before tts_eos.)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from omni_train.models.talker.config import TalkerConfig, TextIds
from omni_train.models.thinker.rope_index import tm_rope_position_ids

PREFIX_LENGTH = 9
IGNORE = -100


@dataclass
class TalkerSample:
    """One conversation with its target speech (see the module docstring)."""

    input_ids: torch.Tensor  # [S] Thinker ids, the reply included
    thinker_embeds: torch.Tensor  # [S, Ht] hidden_states[0]
    thinker_hidden: Optional[torch.Tensor]  # [S, Ht] hidden_states[accept_hidden_layer]; None without media
    tts_embeds: torch.Tensor  # [3, Ht] Thinker embedding rows of tts_bos, tts_eos, tts_pad
    codes: torch.Tensor  # [K, G] codec frames of the reply's speech
    speaker: Union[int, str]  # a codec id, or a name of TalkerConfig.codec.speakers
    position_ids: Optional[torch.Tensor] = None  # [3, L0 + K]; default: 0, 1, 2, ... on all rows


@dataclass
class TalkerContext:
    """The Talker's input before the first frame."""

    inputs_embeds: torch.Tensor  # [L0, H]: user context, then the 9-position prefix
    trailing_text: torch.Tensor  # [T, H]: text entries of frames 0 .. T-1 (reply tokens 1.., tts_eos)
    tts_pad: torch.Tensor  # [H]: the text entry of every later frame
    input_ids: torch.Tensor  # [L0]: user ids, then tts_pad (generate's ``talker_input_ids``)
    user_index: torch.Tensor  # [U]: positions of ``input_ids`` kept as user context


def user_turn_mask(input_ids: torch.Tensor, ids: TextIds) -> torch.Tensor:
    """[S] bool: positions whose latest ``<|im_start|>`` (at or before them) opens a user turn. Before the
    first ``<|im_start|>`` the role is read at position 1, as transformers does."""
    length = input_ids.shape[0]
    positions = torch.arange(length, device=input_ids.device)
    starts = torch.where(input_ids == ids.im_start, positions, torch.full_like(positions, -1))
    latest = torch.cummax(starts, dim=0).values.clamp_min(0)
    return input_ids[(latest + 1).clamp_max(length - 1)] == ids.user


def reply_span(input_ids: torch.Tensor, ids: TextIds) -> Tuple[int, int]:
    """(start of the last ``<|im_start|>assistant``, end of the reply): the reply is input_ids[start+3 : end],
    ending before the first ``<|im_end|>`` after the prefix, or at the end of ``input_ids``."""
    opens = ((input_ids[:-1] == ids.im_start) & (input_ids[1:] == ids.assistant)).nonzero().flatten()
    if opens.numel() == 0:
        raise ValueError("talker context: no <|im_start|>assistant in input_ids")
    start = int(opens[-1])
    ends = (input_ids[start + 3:] == ids.im_end).nonzero().flatten()
    end = start + 3 + int(ends[0]) if ends.numel() else input_ids.shape[0]
    if end <= start + 3:
        raise ValueError("talker context: the assistant reply is empty")
    return start, end


def context_index(cfg: TalkerConfig, input_ids: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """(positions of ``input_ids`` kept as user context [U], reply start, reply end): user turns before the
    reply only (``generate``'s prompt ends with the reply's ``<|im_start|>assistant\\n``)."""
    start, end = reply_span(input_ids, cfg.text)
    before_reply = torch.arange(input_ids.shape[0], device=input_ids.device) < start
    return (user_turn_mask(input_ids, cfg.text) & before_reply).nonzero().flatten(), start, end


def talker_input_ids(cfg: TalkerConfig, input_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[U + 9]: the kept user ids, then tts_pad for the prefix (``generate``'s ``talker_input_ids``)."""
    pads = torch.full((PREFIX_LENGTH,), cfg.text.tts_pad, device=input_ids.device, dtype=input_ids.dtype)
    return torch.cat([input_ids[index], pads])


def speaker_id(cfg: TalkerConfig, speaker: Union[int, str]) -> int:
    if isinstance(speaker, str):
        if speaker.lower() not in cfg.codec.speakers:
            raise KeyError(f"unknown speaker {speaker!r}; known: {sorted(cfg.codec.speakers)}")
        return cfg.codec.speakers[speaker.lower()]
    return int(speaker)


def _user_rows(talker, cfg: TalkerConfig, input_ids, thinker_embeds, thinker_hidden, index) -> torch.Tensor:
    """[U, H]: hidden_projection at media placeholders, text_projection elsewhere (each computed only where
    it is used)."""
    t = cfg.text
    kept = input_ids[index]
    media = (kept == t.audio) | (kept == t.image) | (kept == t.video)
    text_at, media_at = (~media).nonzero().flatten(), media.nonzero().flatten()
    rows = talker.text_projection(thinker_embeds[index[text_at]])
    out = rows.new_zeros(index.shape[0], rows.shape[-1]).index_put((text_at,), rows)
    if media_at.numel():
        if thinker_hidden is None:
            raise ValueError("talker context: user turns hold media placeholders but thinker_hidden is None")
        out = out.index_put((media_at,), talker.hidden_projection(thinker_hidden[index[media_at]]).to(out.dtype))
    return out


def build_context(talker, cfg: TalkerConfig, sample: TalkerSample) -> TalkerContext:
    """The user context and the 9-position prefix (``talker``: a module with ``text_projection``,
    ``hidden_projection`` and ``codec_embed``)."""
    ids, c = sample.input_ids, cfg.codec
    index, start, end = context_index(cfg, ids)
    user = _user_rows(talker, cfg, ids, sample.thinker_embeds, sample.thinker_hidden, index)
    assistant = talker.text_projection(sample.thinker_embeds[start:end])  # [3 + reply, H]
    tts_bos, tts_eos, tts_pad = talker.text_projection(sample.tts_embeds).unbind(0)
    text = torch.cat([assistant[:3], tts_pad.expand(4, -1), tts_bos[None], assistant[3:4]])
    special = torch.tensor([c.nothink, c.think_bos, c.think_eos, speaker_id(cfg, sample.speaker), c.pad, c.bos],
                           device=ids.device)
    codec = torch.cat([text.new_zeros(3, text.shape[-1]), talker.codec_embed(special).to(text.dtype)])
    return TalkerContext(inputs_embeds=torch.cat([user.to(text.dtype), text + codec]),
                         trailing_text=torch.cat([assistant[4:], tts_eos[None]]), tts_pad=tts_pad,
                         input_ids=talker_input_ids(cfg, ids, index), user_index=index)


def text_entries(context: TalkerContext, num_frames: int) -> torch.Tensor:
    """[K, H]: the text entry added to each frame's codec embeddings."""
    trailing = context.trailing_text[:num_frames]
    rest = context.tts_pad.expand(num_frames - trailing.shape[0], -1)
    return torch.cat([trailing, rest])


def frame_embeddings(talker, codes: torch.Tensor) -> torch.Tensor:
    """[K, G] codes -> [K, H]: emb(c0) + sum over j >= 1 of code_predictor.codec_embedding[j-1](c_j) (summed
    over a stacked [K, G, H] as ``generate`` does; ``talker.residual_embed`` reads those tables)."""
    c0 = talker.codec_embed(codes[:, 0]).unsqueeze(1)
    residual = talker.residual_embed(codes[:, 1:]).to(c0.dtype)
    return torch.cat([c0, residual], dim=1).sum(1)


def teacher_forced_targets(cfg: TalkerConfig, sample: TalkerSample) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codebook-0 targets [L] (IGNORE elsewhere), positions of the states that predict each frame's codebook
    0 [K]) for one conversation, L = context + K frames: from its ids alone (every pipeline stage knows them)."""
    codes = sample.codes
    num_frames = codes.shape[0]
    length0 = context_index(cfg, sample.input_ids)[0].shape[0] + PREFIX_LENGTH
    targets = torch.full((length0 + num_frames,), IGNORE, dtype=torch.long, device=codes.device)
    states = torch.arange(num_frames, device=codes.device) + length0 - 1
    targets[states] = codes[:, 0]
    targets[-1] = cfg.codec.eos
    return targets, states


def teacher_forced_sequence(talker, cfg: TalkerConfig, sample: TalkerSample):
    """(inputs_embeds [L, H], codebook-0 targets [L] (IGNORE elsewhere), positions of the states that
    predict each frame's codebook 0 [K]) for one conversation, L = context + K frames."""
    context = build_context(talker, cfg, sample)
    frames = frame_embeddings(talker, sample.codes) + text_entries(context, sample.codes.shape[0])
    embeds = torch.cat([context.inputs_embeds, frames.to(context.inputs_embeds.dtype)])
    targets, states = teacher_forced_targets(cfg, sample)
    return embeds, targets, states, context


# ----- positions ---------------------------------------------------------------------------------------


def text_position_ids(length: int, device=None) -> torch.Tensor:
    """[3, length]: 0, 1, 2, ... on every row (a context without images or videos)."""
    return torch.arange(length, device=device).expand(3, -1)


def append_frame_positions(context_positions: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[3, L0] -> [3, L0 + K]: frames continue every row at max + 1, max + 2, ... (``generate``'s rope deltas)."""
    start = context_positions.max() + 1
    frames = (torch.arange(num_frames, device=context_positions.device) + start).expand(3, -1)
    return torch.cat([context_positions, frames.to(context_positions.dtype)], dim=1)


def talker_position_ids(cfg: TalkerConfig, input_ids: torch.Tensor, media: Sequence[Any] = (),
                        num_frames: int = 0) -> torch.Tensor:
    """[3, L0 + num_frames]: positions of a conversation's Talker sequence, from its Thinker ids alone (the data
    pipeline can compute them). The context takes TM-RoPE ids as the talker's ``get_rope_index`` over
    ``talker_input_ids``: ``media`` are the Thinker sequence's media items (``rope_index.tm_rope_position_ids``'s
    form, spans in Thinker positions), those of user turns moved to their context positions; without media
    that is 0, 1, 2, ... Frames continue at max + 1."""
    index, _, _ = context_index(cfg, input_ids)
    moved = []
    for item in media:
        s, e = (int(v) for v in item.span)
        at = torch.searchsorted(index, torch.tensor([s, e - 1], device=index.device))
        if int(at[0]) >= index.numel() or int(index[at[0]]) != s:
            continue  # not in a user turn: not part of the Talker's context
        moved.append(SimpleNamespace(kind=item.kind, span=(int(at[0]), int(at[1]) + 1), features=item.features))
    t = cfg.text
    positions = tm_rope_position_ids(talker_input_ids(cfg, input_ids, index).cpu(), moved, image_token_id=t.image,
                                     video_token_id=t.video, audio_token_id=t.audio,
                                     vision_start_token_id=t.vision_start, audio_start_token_id=t.audio_start,
                                     spatial_merge_size=cfg.spatial_merge_size,
                                     position_id_per_seconds=cfg.position_id_per_seconds)
    positions = positions.to(input_ids.device)
    return append_frame_positions(positions, num_frames) if num_frames else positions
