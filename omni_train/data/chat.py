"""A decoded conversation -> Thinker token ids, loss mask and media features (Qwen3-Omni conventions).

Layout (the Qwen3-Omni chat template, ChatML):

    <|im_start|>{role}\\n{content}<|im_end|>\\n            for every message, in order

with content parts concatenated as the template does: text as is; audio
``<|audio_start|><|audio_pad|>*n<|audio_end|>``; image ``<|vision_start|><|image_pad|>*n<|vision_end|>``;
video ``<|vision_start|><|video_pad|>*n<|vision_end|>``, or, with ``use_audio_in_video`` and an audio
track, ``<|vision_start|><|audio_start|>`` + video and audio placeholders interleaved by time +
``<|audio_end|><|vision_end|>`` (the processor's ``replace_video_with_audio_token``). ``n`` is what
``features.py`` computes, as the reference processor does.

The loss mask is True on assistant content and its closing ``<|im_end|>``, never on the
``<|im_start|>assistant\\n`` header or a media placeholder; the ``\\n`` after an assistant ``<|im_end|>`` is a
target only with ``target_newline_after_end`` (as trl's Qwen3 training template marks it).

Reasoning (``think``, see ``THINK_MODES``): an assistant turn's reasoning is its ``reasoning_content`` or
the ``<think>...</think>`` block its text starts with (split as Qwen3's template splits it); it is rendered
``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``, emptied or left out, per turn, by the mode.
Text is tokenized piece by piece between special tokens (the header on its own, as the generation
prompt is at inference), which equals tokenizing the whole rendered string except where a content
starts with whitespace that BPE would merge with the header's newline.

An assistant ``audio`` part is speech output (the Talker's target): it puts no token in the Thinker's
stream and is returned in ``speech_targets`` with its codec array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from omni_train.data.decode import DecodedVideo
from omni_train.data.errors import SampleError
from omni_train.data.features import (AudioFeatureConfig, VisionFeatureConfig, audio_features,
                                      audio_in_video_layout, image_patches, video_patches)
from omni_train.models.thinker.rope_index import tm_rope_position_ids

SPECIAL_TOKENS = {
    "pad": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
    "audio_start": "<|audio_start|>", "audio_end": "<|audio_end|>", "audio_pad": "<|audio_pad|>",
    "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>",
}
# attribute names transformers' Qwen3OmniMoeProcessor reads from the tokenizer
TOKENIZER_MEDIA_ATTRS = {
    "image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}
ROLES = ("system", "user", "assistant")
THINK_TOKENS = ("<think>", "</think>")
# raw: text as written; keep: a block in every assistant turn (empty where there is no reasoning);
# empty: an empty block in every assistant turn; strip: no block; last: keep after the last user message,
# strip before it (Qwen3's template)
THINK_MODES = ("raw", "keep", "empty", "strip", "last")


def split_reasoning(message: Dict[str, Any]) -> Tuple[str, Any]:
    """(reasoning, content without it) of an assistant message, as Qwen3's chat template splits them:
    ``reasoning_content`` if given, else the text before ``</think>`` (after ``<think>``) of a string
    content or of its first text part."""
    content = message.get("content")
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"], content

    def split(text: str) -> Tuple[str, str]:
        if "</think>" not in text:
            return "", text
        return (text.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n"),
                text.split("</think>")[-1].lstrip("\n"))

    if isinstance(content, str):
        return split(content)
    parts = list(content or [])
    for i, part in enumerate(parts):
        if part.get("type") == "text":
            reasoning, text = split(str(part.get("text", "")))
            return reasoning, parts[:i] + [{**part, "text": text}] + parts[i + 1:]
    return "", parts


def render_reasoning(message: Dict[str, Any], keep: Optional[bool]) -> Dict[str, Any]:
    """The assistant message with its reasoning as a leading ``<think>`` block (``keep`` True), an empty
    block (False) or none (None)."""
    reasoning, content = split_reasoning(message)
    block = "" if keep is None else f"<think>\n{reasoning.strip(chr(10)) if keep else ''}\n</think>\n\n"
    if message.get("token_ids") is not None:  # generated ids: the encoder renders them (_generated)
        return message
    rest = {k: v for k, v in message.items() if k not in ("content", "reasoning_content")}
    if isinstance(content, str):
        return {**rest, "content": block + (content.lstrip("\n") if block else content)}
    parts = list(content)
    first_text = next((i for i, p in enumerate(parts) if p.get("type") == "text"), None)
    if block and first_text is not None:
        parts[first_text] = {**parts[first_text], "text": str(parts[first_text].get("text", "")).lstrip("\n")}
    return {**rest, "content": ([{"type": "text", "text": block}] if block else []) + parts}


def apply_think_mode(messages: Sequence[Dict[str, Any]], mode: str) -> List[Dict[str, Any]]:
    """The conversation with every assistant turn's reasoning rendered as ``mode`` says (THINK_MODES)."""
    if mode not in THINK_MODES:
        raise ValueError(f"think mode must be one of {THINK_MODES}, got {mode!r}")
    if mode == "raw":
        return list(messages)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    out = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            out.append(message)
            continue
        keep = {"keep": True, "empty": False, "strip": None, "last": True if i > last_user else None}[mode]
        out.append(render_reasoning(message, keep))
    return out


@dataclass
class MediaItem:
    kind: str                 # "audio", "image" or "video"
    name: str                 # member name in the shard (e.g. "image0.jpg")
    span: Tuple[int, int]     # [start, end) in input_ids, start/end tokens included
    num_tokens: int           # placeholder tokens inside the span
    features: Dict[str, Any]  # audio: input_features [128,T]; image: pixel_values, grid_thw;
                              # video: pixel_values_videos, grid_thw, second_per_grid (+ "audio": audio features)


@dataclass
class EncodedSample:
    input_ids: torch.Tensor   # int64 [n]
    loss_mask: torch.Tensor   # bool [n]: this token is a training target (aligned with input_ids)
    media: List[MediaItem]    # in order of appearance
    speech_targets: List[Dict[str, Any]] = field(default_factory=list)  # assistant audio: name, audio, codec
    key: Optional[str] = None
    position_ids: Optional[torch.Tensor] = None  # [3, n] TM-RoPE ids (rope_index.py); int64, float32 if fractional
    # per assistant turn: [start, end) of its content and closing <|im_end|> in input_ids
    assistant_spans: List[Tuple[int, int]] = field(default_factory=list)
    # a teacher's top-k distribution over target tokens (data/responses.py): ids int [n, K],
    # logprobs float [n, K], mask bool [n] (True where the row holds the teacher's distribution of that token)
    top_logprobs: Optional[Dict[str, np.ndarray]] = None

    def labels(self, ignore_index: int = -100) -> torch.Tensor:
        """input_ids where the token is a target, ``ignore_index`` elsewhere (unshifted)."""
        return torch.where(self.loss_mask, self.input_ids, torch.full_like(self.input_ids, ignore_index))

    @property
    def media_spans(self) -> List[Tuple[int, int]]:
        return [m.span for m in self.media]

    @property
    def num_tokens(self) -> int:
        """Sequence length, placeholders included: what data.weight_by=tokens balances."""
        return int(self.input_ids.shape[0])


class _Builder:
    """Accumulates ids/mask; text is buffered so adjacent text pieces tokenize together."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.mask: List[bool] = []
        self._text, self._text_train = "", False

    def text(self, text: str, train: bool) -> None:
        if self._text and train != self._text_train:
            self.flush()
        self._text += text
        self._text_train = train

    def flush(self) -> None:
        if self._text:
            ids = self.tokenizer(self._text, add_special_tokens=False)["input_ids"]
            self.ids.extend(ids)
            self.mask.extend([self._text_train] * len(ids))
        self._text = ""

    def tokens(self, ids: Sequence[int], train: bool) -> None:
        self.flush()
        self.ids.extend(int(i) for i in ids)
        self.mask.extend([train] * len(ids))


class ChatEncoder:
    """Encodes samples from ``decode_sample`` for the Thinker."""

    def __init__(self, tokenizer, audio_cfg: AudioFeatureConfig = AudioFeatureConfig(),
                 vision_cfg: VisionFeatureConfig = VisionFeatureConfig(), position_id_per_seconds: float = 13.0,
                 think: str = "raw", system_prompt: Optional[str] = None, target_newline_after_end: bool = False):
        if think not in THINK_MODES:
            raise ValueError(f"think mode must be one of {THINK_MODES}, got {think!r}")
        self.tokenizer = tokenizer
        self.think, self.system_prompt = think, system_prompt
        self.target_newline_after_end = target_newline_after_end
        self.audio_cfg = audio_cfg
        self.vision_cfg = vision_cfg
        self.position_id_per_seconds = position_id_per_seconds
        self.ids = {}
        for name, token in SPECIAL_TOKENS.items():
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id or not (0 <= tid < len(tokenizer)):
                raise ValueError(f"tokenizer has no id for {token}")
            self.ids[name] = int(tid)

    @classmethod
    def from_pretrained(cls, local_dir: str, **kwargs) -> "ChatEncoder":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(local_dir), **kwargs)

    # --------------------------------------------------------------------------------------- media
    def _audio(self, b: _Builder, name: str, audio: np.ndarray) -> MediaItem:
        feats = audio_features(audio, self.audio_cfg)
        b.flush()
        start = len(b.ids)
        b.tokens([self.ids["audio_start"]] + [self.ids["audio_pad"]] * feats["num_tokens"]
                 + [self.ids["audio_end"]], False)
        return MediaItem("audio", name, (start, len(b.ids)), feats["num_tokens"], feats)

    def _image(self, b: _Builder, name: str, image: np.ndarray) -> MediaItem:
        feats = image_patches(image, self.vision_cfg)
        b.flush()
        start = len(b.ids)
        b.tokens([self.ids["vision_start"]] + [self.ids["image_pad"]] * feats["num_tokens"]
                 + [self.ids["vision_end"]], False)
        return MediaItem("image", name, (start, len(b.ids)), feats["num_tokens"], feats)

    def _video(self, b: _Builder, name: str, video: DecodedVideo, with_audio: bool) -> MediaItem:
        feats = video_patches(video.frames, self.vision_cfg, fps=video.fps)
        b.flush()
        start = len(b.ids)
        if with_audio and video.audio is not None:
            feats["audio"] = audio_features(video.audio, self.audio_cfg)
            layout = audio_in_video_layout(feats["grid_thw"], feats["second_per_grid"],
                                           feats["audio"]["num_tokens"], self.vision_cfg.merge_size,
                                           self.position_id_per_seconds)
            body = np.where(layout, self.ids["video_pad"], self.ids["audio_pad"]).tolist()
            body = [self.ids["audio_start"]] + body + [self.ids["audio_end"]]
            count = len(layout)
        else:
            body, count = [self.ids["video_pad"]] * feats["num_tokens"], feats["num_tokens"]
        b.tokens([self.ids["vision_start"]] + body + [self.ids["vision_end"]], False)
        return MediaItem("video", name, (start, len(b.ids)), count, feats)

    # --------------------------------------------------------------------------------------- parts
    def _part(self, b: _Builder, part: Dict[str, Any], role: str, media: Dict[str, Any],
              items: List[MediaItem], speech: List[Dict[str, Any]]) -> None:
        kind = part.get("type")
        train = role == "assistant"
        if kind == "text":
            b.text(str(part.get("text", "")), train)
            return
        if kind not in ("audio", "image", "video"):
            raise ValueError(f"unknown content part type {kind!r}")
        name = part.get(kind)
        if name not in media:
            raise ValueError(f"{kind} part names {name!r}, which was not decoded")
        if kind == "audio" and role == "assistant":
            speech.append({"name": name, "audio": media[name], "codec": media.get(part.get("codec")),
                           "codec_name": part.get("codec")})
        elif kind == "audio":
            items.append(self._audio(b, name, media[name]))
        elif kind == "image":
            items.append(self._image(b, name, media[name]))
        else:
            items.append(self._video(b, name, media[name], bool(part.get("use_audio_in_video"))))

    def _generated(self, b: _Builder, message: Dict[str, Any]) -> None:
        """An assistant turn given as the token ids a model generated (a teacher's stored tokens): trained on
        exactly those ids, not on a re-tokenization of its text. The ids follow what the think mode puts
        before an answer without reasoning (an empty block, when the text has no block of its own); a final
        ``<|im_end|>`` among them is the one the turn closes with."""
        ids = [int(i) for i in message["token_ids"]]
        if ids and ids[-1] == self.ids["im_end"]:
            ids = ids[:-1]
        text = message.get("content") if isinstance(message.get("content"), str) else ""
        if "</think>" not in text and self.think in ("keep", "empty", "last"):
            b.text("<think>\n\n</think>\n\n", True)
        b.tokens(ids, True)

    def encode_messages(self, messages: Sequence[Dict[str, Any]], media: Dict[str, Any],
                        add_generation_prompt: bool = False, key: Optional[str] = None) -> EncodedSample:
        b = _Builder(self.tokenizer)
        items: List[MediaItem] = []
        speech: List[Dict[str, Any]] = []
        spans: List[Tuple[int, int]] = []
        if self.system_prompt is not None and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        for message in apply_think_mode(messages, self.think):
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}")
            b.tokens([self.ids["im_start"]], False)
            b.text(f"{role}\n", False)
            if role == "assistant":
                b.flush()
            start = len(b.ids)
            content = message.get("content")
            if role == "assistant" and message.get("token_ids") is not None:
                self._generated(b, message)
            elif isinstance(content, str):
                b.text(content, role == "assistant")
            else:
                for part in content or []:
                    self._part(b, part, role, media, items, speech)
            b.tokens([self.ids["im_end"]], role == "assistant")
            if role == "assistant":
                spans.append((start, len(b.ids)))
            b.text("\n", role == "assistant" and self.target_newline_after_end)
        if add_generation_prompt:
            b.tokens([self.ids["im_start"]], False)
            b.text("assistant\n", False)
        b.flush()
        input_ids = torch.tensor(b.ids, dtype=torch.long)
        return EncodedSample(input_ids=input_ids, loss_mask=torch.tensor(b.mask, dtype=torch.bool), media=items,
                             speech_targets=speech, key=key, position_ids=self.position_ids(input_ids, items),
                             assistant_spans=spans)

    def position_ids(self, input_ids: torch.Tensor, items: Sequence[MediaItem]) -> torch.Tensor:
        """TM-RoPE ids [3, n] of one encoded conversation, as the reference thinker's ``get_rope_index``."""
        return tm_rope_position_ids(
            input_ids, items, image_token_id=self.ids["image_pad"], video_token_id=self.ids["video_pad"],
            audio_token_id=self.ids["audio_pad"], vision_start_token_id=self.ids["vision_start"],
            audio_start_token_id=self.ids["audio_start"], spatial_merge_size=self.vision_cfg.merge_size,
            position_id_per_seconds=self.position_id_per_seconds)

    def encode(self, sample: Dict[str, Any]) -> EncodedSample:
        """A ``decode_sample`` result -> ``EncodedSample``; failures raise ``SampleError``."""
        key = str(sample.get("__key__", "?"))
        try:
            return self.encode_messages(sample["messages"], sample.get("media", {}), key=key)
        except SampleError:
            raise
        except Exception as e:
            raise SampleError(key, "json", f"cannot encode: {type(e).__name__}: {e}") from None


def build_test_tokenizer(out_dir: str, extra_texts: Sequence[str] = (), vocab_size: int = 512):
    """A small byte-level BPE tokenizer with Qwen's special tokens (ids < vocab), saved to ``out_dir``
    so ``AutoTokenizer.from_pretrained(out_dir)`` loads it. For tests and demos, not for training."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(SPECIAL_TOKENS.values()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["You are a helpful assistant.", "What do you hear and see?", "A dog barking in a park.",
              "system\n", "user\n", "assistant\n", "Hello, world! 1234 The quick brown fox.", *extra_texts]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=dict(TOKENIZER_MEDIA_ATTRS))
    # Qwen3's reasoning markers: whole tokens, but not special (decoding keeps them), as in Qwen's tokenizer
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast.save_pretrained(out_dir)
    return fast
