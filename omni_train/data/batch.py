"""What a micro-batch holds, per kind of data source, and how it reaches the device.

A data source (``next_microbatches``) returns host batches; the loop cuts them for context parallelism
(``parallel.context_parallel.split_for_context_parallel``), then ``to_device`` starts their copies, then
the stage's forward runs on them. B: micro-batch rows, L: sequence length (``trainer.seq_length``).

``TextBatch`` (``data.synthetic_text``: one document per row, plain causal attention):
    input_ids     int64   [B, L]     device   tokens
    labels        int64   [B, L]     device   next-token targets
    loss_mask     float32 [B, L]     device   1 where the label is a training target
    position_ids  int64   [3, B, L]  device   TM-RoPE ids (text: the three rows are equal)
    keys          list[str] (B)      host     sample names, for non-finite step reports

``ShardBatch`` (``data.shards``: packed documents, ``data.packing.collate_packed``), the above plus:
    position_ids  int64 (float32 if a document's TM-RoPE ids are) [3, B, L]
    document_ids  int64   [B, L]     device   0.. per row in order, -1 on padding (the CP mask's input)
    modality_ids  int64   [B, L]     device   data.packing.MODALITIES index of the token's document, -1 pad
    cu_seqlens    int32   [D + 1]    device   document starts over the rows laid end to end (row b starts
                                              at b * L; a row's padding is a document of its own), then B*L
    max_seqlen    int                host     the longest of those documents (kernels size launches by it)
    media         MediaInputs        device   the towers' inputs, collated on the host by the loader
    media_sizes   MediaSizes         host     never moved: what the towers' plans are computed from
    keys          list[str | None]   host     the documents' sample keys, in order
  with data.responses.top_logprobs K > 0 (off-policy distillation), a teacher's top-k per label:
    top_ids       int64   [B, L, K]  device   token ids
    top_logprobs  float32 [B, L, K]  device   the teacher's log-probabilities of them
    top_mask      bool    [B, L]     device   True where the label has the teacher's distribution

Media are collated in the loader (``data.media_batch.collate_media``), so ``to_device`` copies the
towers' inputs with the tokens, all of them non-blocking. The towers' plans (audio chunking, vision
windows: ``models.thinker.tower_plan``) are worked out from sizes; reading a device tensor's values on
the host would stall the step until the device catches up, so ``media_sizes`` keeps the host tensors
that hold those sizes (the same tensors as ``media``'s before the copy; nothing is duplicated on the host).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, TypedDict, Union

import torch

from omni_train.data.media_batch import collate_media
from omni_train.data.packing import TOP_KEYS


class TextBatch(TypedDict):
    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    keys: List[str]


class MediaInputs(TypedDict):
    """``collate_media``'s output (see data/media_batch.py); a kind absent from the batch is None."""
    input_features: Optional[torch.Tensor]          # float [N_audio, mel, T_max], zero-padded
    feature_attention_mask: Optional[torch.Tensor]  # int64 [N_audio, T_max], 1 on real frames
    pixel_values: Optional[torch.Tensor]            # float [image patches, C*tp*p*p]
    image_grid_thw: Optional[torch.Tensor]          # int64 [N_image, 3]
    pixel_values_videos: Optional[torch.Tensor]     # float [video patches, C*tp*p*p]
    video_grid_thw: Optional[torch.Tensor]          # int64 [N_video, 3]


class MediaSizes(TypedDict):
    """Host copies of ``MediaInputs``' size tensors (None where that kind is absent)."""
    feature_attention_mask: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    video_grid_thw: Optional[torch.Tensor]


class ShardBatch(TypedDict):
    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    modality_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    media: MediaInputs
    media_sizes: MediaSizes
    keys: List[Optional[str]]


# Entries that stay on the host whatever the device.
HOST_KEYS = ("media_sizes",)

# What collate_packed returns: a key it grows or loses must be taken into ShardBatch here, not dropped.
_PACKED_KEYS = frozenset(ShardBatch.__annotations__) - {"media_sizes"}
_OPTIONAL_KEYS = frozenset(TOP_KEYS)


def shard_batch(packed: Dict[str, Any]) -> ShardBatch:
    """``data.packing.collate_packed``'s micro-batch -> ``ShardBatch``, its media items collated into the
    towers' inputs. A key missing from ``packed``, or one the contract does not know, is an error."""
    missing, unknown = _PACKED_KEYS - packed.keys(), packed.keys() - _PACKED_KEYS - _OPTIONAL_KEYS
    if missing or unknown:
        raise KeyError(f"packed batch: missing {sorted(missing)}, not in ShardBatch {sorted(unknown)}")
    media = MediaInputs(**collate_media(packed["media"]))
    return ShardBatch(
        input_ids=packed["input_ids"], labels=packed["labels"], loss_mask=packed["loss_mask"],
        position_ids=packed["position_ids"], document_ids=packed["document_ids"],
        modality_ids=packed["modality_ids"], cu_seqlens=packed["cu_seqlens"],
        max_seqlen=int(packed["max_seqlen"]), media=media,
        media_sizes=MediaSizes(**{k: media[k] for k in MediaSizes.__annotations__}), keys=packed["keys"],
        **{k: packed[k] for k in TOP_KEYS if k in packed},
    )


Batch = Union[TextBatch, ShardBatch]


def _moved(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A new batch with every tensor, nested ones (``media``) included, copied to ``device`` without
    waiting for the copies (``non_blocking``; from pageable host memory the copy is staged, from pinned
    memory it overlaps). ``HOST_KEYS`` entries, numbers and key lists are passed on as they are."""
    return {k: v if k in HOST_KEYS else _moved(v, device) for k, v in batch.items()}
