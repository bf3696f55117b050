"""A micro-batch's media items -> the towers' inputs, laid out as transformers' Qwen3-Omni processor.

The items come in sequence order (rows concatenated), which is the order of their placeholder tokens in
the batch; the model scatters each kind's features over its placeholder positions in that order.

- audio: one entry per user audio item and per video's audio track (``use_audio_in_video``), in item
  order. ``input_features`` [N, mel, T_max] zero-padded to the longest, ``feature_attention_mask``
  [N, T_max] (1 on real frames), as the processor's ``padding=True`` output.
- images: ``pixel_values`` [sum of patches, C*tp*p*p] concatenated, ``image_grid_thw`` [N, 3].
- videos: ``pixel_values_videos`` concatenated, ``video_grid_thw`` [N, 3].

A kind that does not occur is None (the model then does not run that tower).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

MEDIA_KEYS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
              "pixel_values_videos", "video_grid_thw")


def _pad_audio(features: Sequence[torch.Tensor]):
    longest = max(f.shape[1] for f in features)
    batch = torch.zeros(len(features), features[0].shape[0], longest, dtype=features[0].dtype)
    mask = torch.zeros(len(features), longest, dtype=torch.long)
    for i, f in enumerate(features):
        batch[i, :, : f.shape[1]] = f
        mask[i, : f.shape[1]] = 1
    return batch, mask


def _grids(grids) -> torch.Tensor:
    return torch.tensor([[int(v) for v in g] for g in grids], dtype=torch.long)


def collate_media(media_items: Sequence[Any]) -> Dict[str, Optional[torch.Tensor]]:
    """MediaItems (omni_train.data.chat) in sequence order -> tower inputs (see the module docstring)."""
    audios, images, image_grids, videos, video_grids = [], [], [], [], []
    for item in media_items:
        feats = item.features
        if item.kind == "audio":
            audios.append(torch.as_tensor(feats["input_features"]))
        elif item.kind == "image":
            images.append(torch.as_tensor(feats["pixel_values"]))
            image_grids.append(feats["grid_thw"])
        elif item.kind == "video":
            videos.append(torch.as_tensor(feats["pixel_values_videos"]))
            video_grids.append(feats["grid_thw"])
            if "audio" in feats:
                audios.append(torch.as_tensor(feats["audio"]["input_features"]))
        else:
            raise ValueError(f"unknown media kind {item.kind!r} ({item.name})")
    out: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(MEDIA_KEYS)
    if audios:
        out["input_features"], out["feature_attention_mask"] = _pad_audio(audios)
    if images:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(images), _grids(image_grids)
    if videos:
        out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(videos), _grids(video_grids)
    return out
