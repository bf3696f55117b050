"""What a teacher is asked and what it answers, shared by the local and the endpoint teacher.

The prompt of a sample is its `messages` up to and including the last user message: trailing assistant
turns are dropped (they are what the teacher answers instead), earlier ones stay as history. A chat
template gets text only (content parts joined, as Qwen's templates concatenate them); an OpenAI
chat-completions endpoint gets media too, as content parts with base64 `data:` URLs of the member bytes
(what `vllm serve` accepts). An assistant turn's media (speech output) is never part of a prompt.
"""

import base64
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_pipelines.schema import MEDIA_KINDS

MIME_TYPES = {"flac": "audio/flac", "wav": "audio/wav", "mp3": "audio/mpeg", "jpg": "image/jpeg",
              "png": "image/png", "webp": "image/webp", "mp4": "video/mp4", "webm": "video/webm"}
MEDIA_PROMPT = "media prompt: teacher takes text only"


class SampleFailed(Exception):
    """This sample gets no teacher response; the message is the reason written to the report."""


class TeacherError(ValueError):
    """The teacher cannot be used at all (wrong address, key, model, options): the run stops."""


@dataclass
class GenerateOptions:
    mode: str = "think"  # "think" | "no_think": the chat template's enable_thinking
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    top_logprobs: int = 0  # K > 0: keep the top-K log-probabilities of every generated token


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: Optional[np.ndarray] = None  # int32 [n], the generated ids (with the final eos when generated)
    top_ids: Optional[np.ndarray] = None  # int32 [n, K]
    top_logprobs: Optional[np.ndarray] = None  # float32 [n, K], descending, log_softmax of the raw logits


def prompt_messages(messages):
    """The conversation up to and including its last user message."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise SampleFailed("no user message to answer")
    if len(messages) - users[-1] > 2:  # the answer would replace the last of them, not the one after the user
        raise SampleFailed(f"{len(messages) - users[-1] - 1} messages after the last user message: a teacher "
                           f"answer would not take the place of the one that answers it")
    return messages[:users[-1] + 1]


def joined_text(content):
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


def has_media(message):
    return message["role"] != "assistant" and isinstance(message["content"], list) \
        and any(p.get("type") in MEDIA_KINDS for p in message["content"])


def text_messages(messages):
    """The prompt for a chat template: [{"role", "content": str}]; SampleFailed when it has media."""
    prompt = prompt_messages(messages)
    if any(has_media(m) for m in prompt):
        raise SampleFailed(MEDIA_PROMPT)
    return [{"role": m["role"], "content": joined_text(m["content"])} for m in prompt]


def openai_messages(messages, members):
    """The prompt as OpenAI chat-completions messages; members: {suffix: bytes} of the sample."""
    out = []
    for message in prompt_messages(messages):
        if has_media(message):
            content = [_openai_part(part, members) for part in message["content"]]
        else:
            content = joined_text(message["content"])
        out.append({"role": message["role"], "content": content})
    return out


def uses_audio_in_video(messages):
    return any(isinstance(m["content"], list) and any(p.get("use_audio_in_video") for p in m["content"])
               for m in prompt_messages(messages))


def data_url(name, data):
    ext = name.rsplit(".", 1)[-1]
    return f"data:{MIME_TYPES[ext]};base64,{base64.b64encode(data).decode('ascii')}"


def _openai_part(part, members):
    kind = part["type"]
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    name = part[kind]
    if name not in members:
        raise SampleFailed(f"{kind} member {name} is missing")
    if kind == "audio":
        encoded = base64.b64encode(members[name]).decode("ascii")
        return {"type": "input_audio", "input_audio": {"data": encoded, "format": name.rsplit(".", 1)[-1]}}
    field = "image_url" if kind == "image" else "video_url"
    return {"type": field, field: {"url": data_url(name, members[name])}}
