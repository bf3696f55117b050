"""Prompts for the stages that sample their own responses (on-policy distillation, GSPO), from the same
sharded WebDataset streams as every other stage.

A prompt is a conversation without its final assistant turn, encoded with the generation header
(``<|im_start|>assistant\\n``) by the run's ChatEncoder (data.chat: media placeholders, TM-RoPE positions);
the removed turn's text is kept as the prompt's reference answer (rewards and judges read it). A sample
whose media fails to decode, whose conversation cannot be encoded, or whose prompt is longer than
``stage.rollout.max_prompt_tokens`` is skipped and counted, as the loader skips any bad sample; the
loader's state (its cursors) goes into the checkpoint, so a resumed run reads the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional

import torch

from omni_train.data.chat import ChatEncoder, MediaItem, split_reasoning
from omni_train.data.decode import decode_sample
from omni_train.data.errors import SampleError
from omni_train.data.mixture import build_loader

# sample JSON fields that are the conversation itself; the rest rides along in Prompt.meta
_CONVERSATION_KEYS = ("messages",)


@dataclass
class Prompt:
    key: str
    input_ids: torch.Tensor  # int64 [n], ending with the generation header
    position_ids: torch.Tensor  # [3, n] TM-RoPE ids
    media: List[MediaItem]
    reference: Optional[str] = None  # the removed final assistant turn's answer text (reasoning split off)
    meta: Dict[str, Any] = field(default_factory=dict)  # the sample's other JSON fields (e.g. reward specs)
    question: str = ""  # the text of the last user turn (what a reward judge is shown)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def _text(message: Dict[str, Any]) -> Optional[str]:
    """A message's text (its text parts joined), None when it has none."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content if isinstance(content, str) else None


def _reference(message: Dict[str, Any]) -> Optional[str]:
    content = _text(message)
    if content is None:
        return None
    return split_reasoning(dict(message, content=content))[1].strip()


def encode_prompt(sample: Dict[str, Any], encoder: ChatEncoder, max_prompt_tokens: int,
                  text_only: bool = False) -> Prompt:
    """A decoded sample -> Prompt (SampleError when it cannot be one; with ``text_only``, also when it holds
    media)."""
    key = str(sample.get("__key__", "?"))
    messages = list(sample.get("messages") or [])
    reference = None
    if messages and messages[-1].get("role") == "assistant":
        reference = _reference(messages.pop())
    if not any(m.get("role") == "user" for m in messages):
        raise SampleError(key, "json", "no user turn to prompt with")
    try:
        encoded = encoder.encode_messages(messages, sample.get("media", {}), add_generation_prompt=True, key=key)
    except SampleError:
        raise
    except Exception as e:
        raise SampleError(key, "json", f"cannot encode the prompt: {type(e).__name__}: {e}") from None
    if encoded.num_tokens > max_prompt_tokens:
        raise SampleError(key, "", f"prompt of {encoded.num_tokens} tokens is longer than "
                                   f"stage.rollout.max_prompt_tokens={max_prompt_tokens}")
    if text_only and encoded.media:
        raise SampleError(key, encoded.media[0].name, "a prompt with media, and only text prompts are taken "
                                                      "(stage.loss.text_prompts_only: the teacher reads text only)")
    meta = {k: v for k, v in sample.items() if not k.startswith("__") and k not in (*_CONVERSATION_KEYS, "media")}
    question = _text(next(m for m in reversed(messages) if m.get("role") == "user")) or ""
    return Prompt(key, encoded.input_ids, encoded.position_ids, encoded.media, reference, meta, question)


def _transform(raw: Dict[str, Any], encoder: ChatEncoder, video_fps: float, max_prompt_tokens: int,
               text_only: bool) -> Prompt:
    return encode_prompt(decode_sample(raw, video_fps=video_fps), encoder, max_prompt_tokens, text_only)


class PromptSource:
    """This data-parallel rank's endless prompt stream (``next_prompts``), with the loader's state and
    skip statistics."""

    def __init__(self, data_cfg, encoder: ChatEncoder, max_prompt_tokens: int, dp_rank: int, dp_size: int,
                 text_only: bool = False):
        self.encoder = encoder
        self.loader = build_loader(
            [(d.path, d.weight) for d in data_cfg.datasets], weight_by="samples", rank=dp_rank,
            world_size=dp_size, num_workers=data_cfg.num_workers, shuffle_buffer=data_cfg.shuffle_buffer,
            seed=data_cfg.seed, transform=partial(_transform, encoder=encoder, video_fps=data_cfg.video_fps,
                                                  max_prompt_tokens=max_prompt_tokens, text_only=text_only),
            max_consecutive_failures=data_cfg.max_consecutive_failures, max_skip_rate=data_cfg.max_skip_rate,
            min_samples_for_skip_rate=data_cfg.min_samples_for_skip_rate,
        )

    def next_prompts(self, count: int) -> List[Prompt]:
        return [next(self.loader) for _ in range(count)]

    def state_dict(self) -> Dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])

    def stats(self) -> Dict[str, float]:
        loader = self.loader.stats()
        return {"prompts_seen": float(loader.get("seen", 0)), "prompts_skipped": float(loader.get("skipped", 0))}
