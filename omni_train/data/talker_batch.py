"""Conversations with assistant speech -> the Talker's micro-batches, one conversation per row.

shards -> decode -> chat encode (the Thinker's ids, media features, TM-RoPE ids) -> the speech's codec targets
(``speech.speech_codes``) -> rows. A conversation the Talker cannot train on raises ``SampleError`` in the
loader's transform, so the loader skips and counts it (``data_skipped``): no assistant speech, speech without
codec targets or of the wrong shape or range, a last assistant turn without text or speech, a speaker that is
not one of ``model.talker.codec.speakers``, or a conversation longer than ``trainer.seq_length`` (its Thinker
ids, or its Talker sequence: user context + 9 prefix positions + one per codec frame).

Why not packed: the Talker's sequence of a conversation is built from that conversation alone (its user turns,
then the prefix and frames of its last assistant turn, positions from 0: models/talker/conditioning.py), and
the backbone attends causally over the whole row; several conversations in one row would see each other's
frames and take positions that continue across them. So each row holds one conversation, right-padded to the
micro-batch's longest (causal attention: padding never reaches a real position), for the Thinker and the
Talker alike.

Micro-batch (host; ``to_device`` moves the tensors, lists stay on the host):
    input_ids         int64 [B, L]       Thinker ids, right-padded with the pad id
    position_ids      [3, B, L]          Thinker TM-RoPE ids, padding continuing past each row's max
    media, media_sizes                   the towers' inputs (data/batch.py), rows in order
    lengths           list[int] (B)      each row's Thinker length
    codes             int64 [F, G]       every row's codec frames, rows in order
    frames            list[int] (B)      frames per row
    talker_position_ids [3, T]           every row's Talker positions, rows in order (``talker_position_ids``)
    talker_lengths    list[int] (B)
    speakers          list[int] (B)      codec ids of the voices
    context           list[tuple[str]]   the media kinds of each row's user turns ("audio", "image", "video")
    keys              list[str] (B)
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Dict, List

import torch

from omni_train.data.batch import MediaSizes
from omni_train.data.chat import ChatEncoder
from omni_train.data.decode import decode_sample
from omni_train.data.errors import SampleError
from omni_train.data.media_batch import collate_media
from omni_train.data.mixture import build_loader
from omni_train.data.shards import chat_encoder
from omni_train.data.speech import speech_codes
from omni_train.models.talker.conditioning import PREFIX_LENGTH, context_index, speaker_id, talker_position_ids
from omni_train.models.talker.config import TalkerConfig

CONTEXT_KINDS = ("audio", "image", "video")


def talker_with_tokenizer_ids(talker: TalkerConfig, encoder: ChatEncoder) -> TalkerConfig:
    """``talker`` with the Thinker-vocabulary ids its conditioning reads taken from the data's tokenizer (as the
    Thinker's placeholder ids are: multimodal_pretrain), so model and data agree whatever tokenizer a run uses;
    tts_pad / tts_bos / tts_eos stay the config's (rows of the Thinker's embedding, no tokenizer tokens)."""
    ids, tokenizer = encoder.ids, encoder.tokenizer
    roles = {}
    for role in ("user", "assistant"):
        pieces = tokenizer(role, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ValueError(f"data.tokenizer: {role!r} is {len(pieces)} tokens; the Talker reads a turn's role "
                             "as the single token after <|im_start|>")
        roles[role] = pieces[0]
    text = dataclasses.replace(talker.text, im_start=ids["im_start"], im_end=ids["im_end"], audio=ids["audio_pad"],
                               image=ids["image_pad"], video=ids["video_pad"], vision_start=ids["vision_start"],
                               audio_start=ids["audio_start"], **roles)
    return dataclasses.replace(talker, text=text)


def default_speaker(talker: TalkerConfig) -> str:
    """The voice of a conversation that names none: ``ethan`` (transformers' ``generate`` default), else the
    first configured one."""
    return "ethan" if "ethan" in talker.codec.speakers else next(iter(talker.codec.speakers))


def encode_speech_sample(raw: Dict[str, Any], encoder: ChatEncoder, talker: TalkerConfig, seq_length: int,
                         video_fps: float) -> Dict[str, Any]:
    """webdataset's raw sample -> one row's fields (see the module docstring); SampleError for what the Talker
    cannot train on."""
    sample = decode_sample(raw, video_fps=video_fps)
    encoded = encoder.encode(sample)
    key = encoded.key or "?"
    codes = speech_codes(encoded, talker.num_code_groups, talker.code_predictor.codebook_size)[-1]
    last = [m for m in sample["messages"] if m.get("role") == "assistant"][-1]
    parts = last.get("content") if isinstance(last.get("content"), list) else []
    if not any(part.get("type") == "audio" for part in parts):
        raise SampleError(key, "json", "the last assistant turn is not spoken (the Talker speaks the last reply)")
    ids = encoded.input_ids
    try:
        index, _, _ = context_index(talker, ids)
    except ValueError as exc:
        raise SampleError(key, "json", str(exc)) from None
    talker_length = index.numel() + PREFIX_LENGTH + codes.shape[0]
    if max(ids.numel(), talker_length) > seq_length:
        raise SampleError(key, "json", f"longer than trainer.seq_length={seq_length} (Thinker {ids.numel()}, "
                                       f"Talker {talker_length} positions)")
    voice = (sample.get("speaker") or {}).get("id") or default_speaker(talker)
    try:
        speaker = speaker_id(talker, voice)
    except KeyError as exc:
        raise SampleError(key, "json", f"speaker: {exc.args[0]} (model.talker.codec.speakers)") from None
    in_context = set(index.tolist())
    context = tuple(sorted({item.kind for item in encoded.media if item.span[0] in in_context}))
    return {"input_ids": ids, "position_ids": encoded.position_ids, "media": encoded.media, "codes": codes,
            "talker_position_ids": talker_position_ids(talker, ids, encoded.media, codes.shape[0]),
            "speaker": speaker, "context": context, "key": key, "num_tokens": talker_length}


def _pad_positions(positions: torch.Tensor, length: int) -> torch.Tensor:
    """[3, n] -> [3, length]: padding continues past the row's largest id (never attended: causal)."""
    pad = length - positions.shape[1]
    if pad == 0:
        return positions
    start = positions.max() + 1
    tail = (torch.arange(pad, dtype=positions.dtype) + start).expand(3, -1)
    return torch.cat([positions, tail], dim=1)


def collate_rows(rows: List[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    """Rows (``encode_speech_sample``) -> one micro-batch (see the module docstring)."""
    longest = max(row["input_ids"].numel() for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :row["input_ids"].numel()] = row["input_ids"]
    positions = [_pad_positions(row["position_ids"], longest) for row in rows]
    dtype = torch.float32 if any(p.is_floating_point() for p in positions) else torch.long
    media = collate_media([item for row in rows for item in row["media"]])
    talker_positions = [row["talker_position_ids"] for row in rows]
    return {
        "input_ids": ids, "position_ids": torch.stack([p.to(dtype) for p in positions], dim=1),
        "media": media, "media_sizes": MediaSizes(**{k: media[k] for k in MediaSizes.__annotations__}),
        "lengths": [row["input_ids"].numel() for row in rows],
        "codes": torch.cat([row["codes"] for row in rows]), "frames": [row["codes"].shape[0] for row in rows],
        "talker_position_ids": torch.cat([p.to(dtype) for p in talker_positions], dim=1),
        "talker_lengths": [p.shape[1] for p in talker_positions],
        "speakers": [row["speaker"] for row in rows], "context": [row["context"] for row in rows],
        "keys": [row["key"] for row in rows],
    }


class SpeechSource:
    """This data-parallel rank's Talker micro-batches (``next_microbatches``), with the loader's state in
    checkpoints (no packer: rows are whole conversations) and its counts in the metrics. Subclasses change what
    a sample becomes (``encode``) and how rows make a micro-batch (``collate``)."""

    encode = staticmethod(encode_speech_sample)
    collate = staticmethod(collate_rows)

    def __init__(self, cfg, talker: TalkerConfig, seq_length: int, micro_batch: int, num_micro_batches: int,
                 dp_rank: int, dp_size: int):
        self.encoder = chat_encoder(cfg)
        talker = talker_with_tokenizer_ids(talker, self.encoder)
        self.loader = build_loader(
            [(d.path, d.weight) for d in cfg.datasets], weight_by=cfg.weight_by, rank=dp_rank,
            world_size=dp_size, num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
            transform=partial(self.encode, encoder=self.encoder, talker=talker, seq_length=seq_length,
                              video_fps=cfg.video_fps),
            max_consecutive_failures=cfg.max_consecutive_failures, max_skip_rate=cfg.max_skip_rate,
            min_samples_for_skip_rate=cfg.min_samples_for_skip_rate,
        )
        self.pad_id = self.encoder.tokenizer.pad_token_id
        self.micro_batch, self.num_micro_batches = micro_batch, num_micro_batches

    def next_microbatches(self) -> List[Dict[str, Any]]:
        return [self.collate([next(self.loader) for _ in range(self.micro_batch)], self.pad_id)
                for _ in range(self.num_micro_batches)]

    def state_dict(self) -> Dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])

    def stats(self) -> Dict[str, float]:
        loader = self.loader.stats()
        shares = {f"data_share_{name.replace(':', '_')}": float(d["share"])
                  for name, d in loader.get("datasets", {}).items()}
        return {**shares, "data_skipped": float(loader.get("skipped", 0)), "data_seen": float(loader.get("seen", 0))}
