"""Multimodal micro-batches for the omni variants of benchmarks/thinker_throughput.py.

Every sequence holds, in this order: 4 text tokens, one audio clip of ``audio_frames`` log-mel frames
(``<|audio_start|>``, its placeholders, ``<|audio_end|>``), 4 text tokens, one square image of
``image_size`` pixels (``<|vision_start|>``, its placeholders, ``<|vision_end|>``), then text up to the
sequence length. Placeholder counts follow the data pipeline (omni_train.data.features); TM-RoPE
position ids come from omni_train.models.thinker.rope_index, as the shard loader computes them. Features are
seeded random values of the processor's shapes (``input_features`` [mel, T]; ``pixel_values``
[t*h*w, 3*tp*p*p] with ``grid_thw`` (1, h, w)): throughput does not depend on their values.

Batches are the shard loader's (omni_train.data.batch.ShardBatch, one document per row): token tensors on
the device, ``media`` the towers' inputs collated on the host as the loader yields them, so that the
loop's per-step host-to-device copy of the media is timed. Targets are the text tokens (media
placeholders and markers are never targets, as in the data).
"""

from __future__ import annotations

import tempfile
from typing import Any, Dict, List

import torch

from omni_train.data.batch import shard_batch
from omni_train.data.chat import MediaItem, build_test_tokenizer
from omni_train.data.features import num_audio_tokens, vision_num_tokens
from omni_train.models.common.tensors import tensors_to
from omni_train.data.packing import document_modality
from omni_train.models.thinker.rope_index import tm_rope_position_ids

TEXT_GAP = 4  # text tokens before the audio clip and between the clip and the image


def media_layout(model, audio_frames: int, image_size: int) -> Dict[str, Any]:
    """One sequence's media: the audio clip's frames and placeholder tokens, the image's patch grid and
    placeholder tokens, and the tokens all of it takes (markers included)."""
    v = model.vision_tower
    side = v.patch_size * v.spatial_merge_size
    if image_size % side:
        raise ValueError(f"--image-size {image_size} must be a multiple of patch * merge = {side}")
    grid = (1, image_size // v.patch_size, image_size // v.patch_size)
    audio_tokens = num_audio_tokens(audio_frames, model.audio_tower.n_window)
    image_tokens = vision_num_tokens(grid, v.spatial_merge_size)
    media_tokens = audio_tokens + image_tokens + 4  # start and end markers around each item
    return dict(audio_frames=audio_frames, audio_tokens=audio_tokens, image_size=image_size,
                image_grid_thw=list(grid), image_tokens=image_tokens, media_tokens=media_tokens,
                min_seq_length=media_tokens + 2 * TEXT_GAP)


def placeholder_ids() -> tuple[str, Dict[str, int]]:
    """A small tokenizer with Qwen's special tokens, written to a temporary directory (the stage reads
    its placeholder ids from ``data.tokenizer``): (its directory, the ids by name). Deterministic, so
    every variant's process gets the same ids."""
    from omni_train.data.chat import ChatEncoder

    path = tempfile.mkdtemp(prefix="thinker_throughput_tokenizer_")
    build_test_tokenizer(path)
    return path, ChatEncoder.from_pretrained(path).ids


def _row(layout, ids, seq_length: int, model, g: torch.Generator):
    """One sequence of seq_length + 1 tokens (inputs and shifted targets) and its two MediaItems."""
    lowest_text = max(ids.values()) + 1  # text never collides with a special token
    audio = [ids["audio_start"]] + [ids["audio_pad"]] * layout["audio_tokens"] + [ids["audio_end"]]
    image = [ids["vision_start"]] + [ids["image_pad"]] * layout["image_tokens"] + [ids["vision_end"]]
    text_tokens = seq_length + 1 - len(audio) - len(image)
    text = torch.randint(lowest_text, model.vocab_size, (text_tokens,), generator=g).tolist()
    tokens = text[:TEXT_GAP] + audio + text[TEXT_GAP:2 * TEXT_GAP] + image + text[2 * TEXT_GAP:]
    audio_start, image_start = TEXT_GAP, 2 * TEXT_GAP + len(audio)
    frames, grid = layout["audio_frames"], tuple(layout["image_grid_thw"])
    v = model.vision_tower
    patch_dim = 3 * v.temporal_patch_size * v.patch_size ** 2  # RGB
    mel = torch.randn(model.audio_tower.num_mel_bins, frames, generator=g)
    pixels = torch.randn(grid[0] * grid[1] * grid[2], patch_dim, generator=g)
    return torch.tensor(tokens), [
        MediaItem("audio", "bench.flac", (audio_start, audio_start + len(audio)), layout["audio_tokens"],
                  dict(input_features=mel, num_frames=frames, num_tokens=layout["audio_tokens"])),
        MediaItem("image", "bench.jpg", (image_start, image_start + len(image)), layout["image_tokens"],
                  dict(pixel_values=pixels, grid_thw=grid, num_tokens=layout["image_tokens"])),
    ]


def omni_batches(spec: Dict[str, Any], model, ids: Dict[str, int], count: int, device) -> List[Dict[str, Any]]:
    """``count`` seeded micro-batches of ``spec['micro_batch']`` x ``spec['seq_length']`` tokens."""
    layout = media_layout(model, spec["audio_frames"], spec["image_size"])
    b, s = spec["micro_batch"], spec["seq_length"]
    if s < layout["min_seq_length"]:
        raise ValueError(f"--seq-length {s} cannot hold the media ({layout['min_seq_length']} tokens needed)")
    g = torch.Generator().manual_seed(spec["seed"])
    rope = dict(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], audio_token_id=ids["audio_pad"],
                vision_start_token_id=ids["vision_start"], audio_start_token_id=ids["audio_start"],
                spatial_merge_size=model.vision_tower.spatial_merge_size)
    special = torch.tensor(sorted(ids.values()))
    batches = []
    for i in range(count):
        rows = [_row(layout, ids, s, model, g) for _ in range(b)]
        tokens = torch.stack([t for t, _ in rows])
        media = [item for _, items in rows for item in items]
        positions = torch.stack([tm_rope_position_ids(t[:-1], items, **rope) for t, items in rows], dim=1)
        labels = tokens[:, 1:].contiguous()
        batches.append(shard_batch({
            "input_ids": tokens[:, :-1].contiguous().to(device),
            "labels": labels.to(device),
            "loss_mask": (~torch.isin(labels, special)).float().to(device),
            "position_ids": positions.to(device),
            "document_ids": torch.zeros(b, s, dtype=torch.long, device=device),
            "modality_ids": torch.full((b, s), document_modality(["audio", "image"]), device=device),
            "cu_seqlens": (torch.arange(b + 1, dtype=torch.int32) * s).to(device),
            "max_seqlen": s,
            "media": media,
            "keys": [f"bench:{i}:{r}" for r in range(b)],
        }))
    return batches


def hf_inputs(batch: Dict[str, Any], device) -> Dict[str, Any]:
    """transformers' Thinker inputs for a batch of ``omni_batches``: the same tokens, position ids and
    media (copied to the device each step, as the loop does); labels -100 where the loss mask is 0."""
    media = tensors_to(batch["media"], device)
    labels = torch.where(batch["loss_mask"] > 0, batch["labels"], torch.full_like(batch["labels"], -100))
    return dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=labels,
                **{k: v for k, v in media.items() if v is not None})

