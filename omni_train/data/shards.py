"""Packed micro-batches from sharded WebDataset streams, for one data-parallel rank.

shards -> (stream + mixture) -> decode -> chat encode (loss mask on assistant turns) -> pack to
seq_length -> micro-batches (``data.batch.ShardBatch``: document boundaries kept, media collated into
the towers' inputs). Its state (loader cursors, packer buffers, sequences packed but not yet handed
out) goes into the training checkpoint, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any, Dict, List

from omni_train.config import DataConfig
from omni_train.data.batch import ShardBatch, shard_batch
from omni_train.data.chat import ChatEncoder
from omni_train.data.decode import decode_sample
from omni_train.data.mixture import build_loader
from omni_train.data.packing import Document, SequencePacker, collate_packed
from omni_train.data.responses import encode_with_responses


def encode_raw_sample(raw: Dict[str, Any], encoder: ChatEncoder, video_fps: float, responses=None, seed: int = 0):
    """webdataset's raw sample -> EncodedSample (raises SampleError for bad data: the loader skips it)."""
    sample = decode_sample(raw, video_fps=video_fps)
    if responses is None:
        return encoder.encode(sample)
    return encode_with_responses(sample, encoder, responses, seed)


def chat_encoder(cfg: DataConfig) -> ChatEncoder:
    """The run's encoder: data.tokenizer with data.chat's rendering."""
    chat = cfg.chat
    return ChatEncoder.from_pretrained(cfg.tokenizer, think=chat.think, system_prompt=chat.system_prompt,
                                       target_newline_after_end=chat.target_newline_after_end)


class ShardSource:
    def __init__(self, cfg: DataConfig, seq_length: int, micro_batch: int, num_micro_batches: int,
                 dp_rank: int, dp_size: int):
        self.encoder = chat_encoder(cfg)
        self.loader = build_loader(
            [(d.path, d.weight) for d in cfg.datasets], weight_by=cfg.weight_by, rank=dp_rank,
            world_size=dp_size, num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed, transform=partial(encode_raw_sample, encoder=self.encoder, video_fps=cfg.video_fps,
                              responses=cfg.responses, seed=cfg.seed),
            max_consecutive_failures=cfg.max_consecutive_failures, max_skip_rate=cfg.max_skip_rate,
            min_samples_for_skip_rate=cfg.min_samples_for_skip_rate,
        )
        self.packer = SequencePacker(seq_length, pad_id=self.encoder.tokenizer.pad_token_id,
                                     policy=cfg.overlong, top_k=cfg.responses.top_logprobs)
        self.ready: deque = deque()
        self.micro_batch, self.num_micro_batches = micro_batch, num_micro_batches

    def _next_sequence(self):
        while not self.ready:
            self.ready.extend(self.packer.add(Document.from_encoded(next(self.loader))))
        return self.ready.popleft()

    def next_microbatches(self) -> List[ShardBatch]:
        # Document boundaries (cu_seqlens, document_ids), not a [B, 1, L, L] mask: attention works within
        # documents from them on the device (data/batch.py says what each entry is).
        return [shard_batch(collate_packed([self._next_sequence() for _ in range(self.micro_batch)]))
                for _ in range(self.num_micro_batches)]

    def state_dict(self) -> Dict[str, Any]:
        return {"loader": self.loader.state_dict(), "packer": self.packer.state_dict(),
                "ready": list(self.ready)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.packer.load_state_dict(state["packer"])
        self.ready = deque(state["ready"])

    def stats(self) -> Dict[str, float]:
        loader, packer = self.loader.stats(), self.packer.report()
        # realised share of each dataset (in the unit of data.weight_by), named "<index>_<directory>"
        shares = {f"data_share_{name.replace(':', '_')}": float(d["share"])
                  for name, d in loader.get("datasets", {}).items()}
        return {**shares, "data_skipped": float(loader.get("skipped", 0)), "data_seen": float(loader.get("seen", 0)),
                "pad_fraction": float(packer["pad_fraction"]),
                "data_split_documents": float(packer["split_documents"]),
                "data_dropped_documents": float(packer["dropped_documents"])}
