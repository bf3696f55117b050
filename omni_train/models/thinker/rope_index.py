"""TM-RoPE position ids of one document: the ``[3, n]`` (temporal, height, width) ids that transformers'
Qwen3-Omni thinker computes in ``get_rope_index``, from our encoder's media items instead of a token scan.

Rules (the reference's, in order of appearance; ``next`` is the largest id of the last piece written + 1):

- text, and every start/end marker, takes consecutive ids ``next, next+1, ...`` on all three rows;
- audio: consecutive ids, like text (one per placeholder);
- image / video: a grid starting at ``start`` (the id after ``<|vision_start|>``): temporal row
  ``start + t * step``, height ``start + h``, width ``start + w`` over merged patches (t, h, w), with
  ``step = position_id_per_seconds`` for an image and ``second_per_grid * position_id_per_seconds`` for a
  video (its timestamps, so the temporal ids can be fractional);
- a video with its audio track (``<|vision_start|><|audio_start|>`` ... ``<|audio_end|><|vision_end|>``):
  the two markers at each end take two consecutive ids; the video grid and the audio ids (``start,
  start+1, ...``) both start at ``start`` and are merged by temporal id, a video token first on a tie,
  which is the order ``Qwen3OmniMoeProcessor`` lays the placeholders out in;
- after a media item, ``next`` is one past the largest id of the last piece the reference wrote: the
  whole item, or for audio-in-video only the run of tokens after the other modality's last token
  (so ids are not always one past the global maximum, exactly as in the reference).

Arithmetic is the reference's float32; the result is int64 when every id is whole (images, audio,
videos whose ``second_per_grid * position_id_per_seconds`` is whole, e.g. 2 frames per grid at 2 fps),
float32 otherwise (the reference's fractional temporal ids). Packing restarts ids per document, which is
what the reference does per sample.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import torch


def _linear(length: int, start: torch.Tensor) -> torch.Tensor:
    """[3, length]: start, start+1, ... on all rows."""
    return torch.arange(length).view(1, -1).expand(3, -1) + start


def _vision_grid(start: torch.Tensor, grid_thw: Sequence[int], per_grid, pps: float, merge: int) -> torch.Tensor:
    """[3, t*h*w/merge^2] grid ids (get_llm_pos_ids_for_vision); temporal id ``t * per_grid * pps``, in the
    reference's order of float32 operations."""
    gt, gh, gw = (int(v) for v in grid_thw)
    h, w = gh // merge, gw // merge
    t_index = (torch.arange(gt) * per_grid * pps).float().view(-1, 1).expand(-1, h * w).flatten()
    h_index = torch.arange(h).view(1, -1, 1).expand(gt, -1, w).flatten().float()
    w_index = torch.arange(w).view(1, 1, -1).expand(gt, h, -1).flatten().float()
    return torch.stack([t_index, h_index, w_index]) + start


def _audio_in_video(video: torch.Tensor, audio: torch.Tensor) -> List[torch.Tensor]:
    """Video and audio ids merged by temporal id (video first on ties), as the pieces the reference
    writes: everything up to the other modality's last token, then the run after it (one piece)."""
    both = torch.cat([video, audio], dim=1)
    is_video = torch.cat([torch.ones(video.shape[1], dtype=torch.bool), torch.zeros(audio.shape[1], dtype=torch.bool)])
    order = torch.sort(both[0], stable=True).indices  # a merge of two sorted runs; ties keep video first
    merged, is_video = both[:, order], is_video[order]
    other = (is_video != is_video[-1]).nonzero()
    cut = int(other[-1]) + 1 if len(other) else 0
    return [merged[:, :cut], merged[:, cut:]]


def tm_rope_position_ids(
    input_ids: torch.Tensor,
    media: Sequence[Any],
    *,
    image_token_id: int,
    video_token_id: int,
    audio_token_id: int,
    vision_start_token_id: int,
    audio_start_token_id: int,
    spatial_merge_size: int = 2,
    position_id_per_seconds: float = 13.0,
) -> torch.Tensor:
    """TM-RoPE ids ``[3, n]`` of one document.

    ``media``: ``chat.MediaItem``-like objects in order of appearance, with ``kind`` ("audio", "image",
    "video"), ``span`` [start, end) in ``input_ids`` (markers included) and ``features``: audio
    ``num_tokens``; image ``grid_thw``; video ``grid_thw``, ``second_per_grid`` and, for a video with its
    audio track, ``audio`` (with ``num_tokens``). Token ids are checked against the spans.
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    n = ids.numel()
    pieces: List[torch.Tensor] = []
    cursor = 0

    def next_id() -> torch.Tensor:
        return pieces[-1].max() + 1 if pieces else torch.tensor(0.0)

    for item in media:
        s, e = (int(v) for v in item.span)
        if s < cursor or e > n or e - s < 2:
            raise ValueError(f"media span {item.span} is out of order or outside the {n} tokens")
        start = next_id()
        if s > cursor:
            pieces.append(_linear(s - cursor, start))
            start = start + (s - cursor)
        body, markers = _media_ids(ids, item, s, e, start, token_ids=(image_token_id, video_token_id,
                                   audio_token_id, vision_start_token_id, audio_start_token_id),
                                   merge=spatial_merge_size, pps=position_id_per_seconds)
        pieces.append(_linear(markers, start))
        pieces.extend(body)
        pieces.append(_linear(markers, next_id()))
        cursor = e
    if cursor < n:
        pieces.append(_linear(n - cursor, next_id()))
    positions = torch.cat([p.float() for p in pieces], dim=1) if pieces else torch.zeros(3, 0)
    if torch.equal(positions, positions.round()):
        return positions.long()
    return positions


def _media_ids(ids: torch.Tensor, item: Any, s: int, e: int, start: torch.Tensor, token_ids: Sequence[int],
               merge: int, pps: float):
    """(pieces of the placeholders' ids, markers at each end) of one media item spanning [s, e)."""
    image_id, video_id, audio_id, vision_start, audio_start = token_ids
    feats = item.features
    av = item.kind == "video" and "audio" in feats
    markers = 2 if av else 1
    first = [vision_start, audio_start] if av else [audio_start if item.kind == "audio" else vision_start]
    if ids[s:s + markers].tolist() != first:
        raise ValueError(f"{item.kind} span at {s} does not start with tokens {first}")
    count = e - s - 2 * markers
    if item.kind == "audio":
        expected, body = int(feats["num_tokens"]), None
    elif item.kind in ("image", "video"):
        grid = [int(v) for v in feats["grid_thw"]]
        expected = grid[0] * grid[1] * grid[2] // merge ** 2
        if item.kind == "image":
            per_grid = 1
        elif feats.get("second_per_grid") is None:
            raise ValueError("a video needs second_per_grid (its frames' fps) for temporal ids")
        else:
            per_grid = torch.tensor(float(feats["second_per_grid"]), dtype=torch.float32)
        body = _vision_grid(start + markers, grid, per_grid, pps, merge)
    else:
        raise ValueError(f"unknown media kind {item.kind!r}")
    if av:
        n_audio = int(feats["audio"]["num_tokens"])
        expected += n_audio
        pieces = _audio_in_video(body, _linear(n_audio, start + markers).float())
        pieces = [p for p in pieces if p.shape[1]]
    elif body is None:
        pieces = [_linear(expected, start + markers)]
    else:
        pieces = [body]
    placeholder = {"audio": audio_id, "image": image_id, "video": video_id}[item.kind]
    inside = ids[s + markers:e - markers]
    allowed = (inside == placeholder) | (inside == audio_id) if av else inside == placeholder
    if count != expected or not bool(allowed.all()):
        raise ValueError(f"{item.kind} span at {s} holds {count} tokens, expected {expected} placeholders")
    return pieces, markers


def rope_deltas(position_ids: torch.Tensor) -> torch.Tensor:
    """``max id + 1 - n`` of a ``[3, n]`` document (the reference's ``mrope_position_deltas``): the offset
    that continues text ids after the document when generating."""
    return position_ids.max() + 1 - position_ids.shape[-1]
