"""Which assistant turns a conversation trains on: its own, or a teacher's (off-policy distillation).

A sample's ``teacher`` list (docs/data_format.md) holds responses of teacher models. An entry's
``messages`` replace the conversation's assistant turns aligned from the end: the slots are the
assistant turns, plus one after the last message when the conversation ends with a user turn; k teacher
messages fill the last k slots in order (earlier assistant turns stay as the conversation's history).

With ``top_logprobs`` K > 0 the entry's stored top-k log-probabilities (``logprobs``: members ``tokens``
[n], ``top_ids`` [n, >=K], ``top_logprobs`` [n, >=K]) are laid on the tokens of its last message, and that
message trains on the stored ``tokens`` themselves rather than on a re-tokenization of its text (a model's
generated ids need not be the canonical tokenization of the text they decode to). The stored tokens end
the rendered turn (after the empty think block that a no-think template put in the prompt, when the
think mode renders one); a teacher response that ended without ``<|im_end|>`` is truncated and not used
(``drop_truncated``). Every problem
raises ``SampleError`` naming the sample: the loader skips it and counts it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List

import numpy as np

from omni_train.data.chat import ChatEncoder, EncodedSample
from omni_train.data.errors import SampleError


def _matching(sample: Dict[str, Any], cfg) -> List[Dict[str, Any]]:
    entries = sample.get("teacher") or []
    return [e for e in entries if isinstance(e, dict)
            and (not cfg.teachers or e.get("model") in cfg.teachers)
            and (not cfg.modes or e.get("mode") in cfg.modes)]


def pick_teacher(sample: Dict[str, Any], cfg, seed: int) -> Dict[str, Any]:
    """The teacher entry this sample trains on (``cfg``: data.responses)."""
    key = str(sample.get("__key__", "?"))
    entries = _matching(sample, cfg)
    if not entries:
        wanted = f" (teachers {list(cfg.teachers) or 'any'}, modes {list(cfg.modes) or 'any'})"
        raise SampleError(key, "teacher", "no teacher response" + wanted)
    if cfg.pick == "first":
        entry = entries[0]
    else:  # "random": the same choice for this sample in every epoch, rank and resume
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        entry = entries[int.from_bytes(digest[:8], "little") % len(entries)]
    if cfg.drop_truncated and entry.get("finish_reason") == "length":
        raise SampleError(key, "teacher", f"response of {entry.get('model')!r} stopped at its length limit")
    return entry


def with_teacher_turns(messages: List[Dict[str, Any]], teacher_messages: List[Dict[str, Any]],
                       key: str = "?") -> List[Dict[str, Any]]:
    """``messages`` with the teacher's turns in the last slots (module docstring)."""
    if not teacher_messages or any(m.get("role") != "assistant" for m in teacher_messages):
        raise SampleError(key, "teacher", "a teacher entry's messages must be assistant turns")
    slots = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    out = list(messages)
    if messages and messages[-1].get("role") == "user":
        slots.append(len(out))
        out.append(None)
    if len(teacher_messages) > len(slots):
        raise SampleError(key, "teacher", f"{len(teacher_messages)} teacher turns for {len(slots)} assistant slots")
    for slot, message in zip(slots[len(slots) - len(teacher_messages):], teacher_messages):
        out[slot] = message
    return out


def lay_top_logprobs(encoded: EncodedSample, entry: Dict[str, Any], media: Dict[str, Any], k: int,
                     vocab: int, key: str = "?") -> Dict[str, np.ndarray]:
    """The entry's top-k arrays on ``encoded``'s tokens (rows of the last assistant turn; zero elsewhere)."""
    refs = entry.get("logprobs")
    if not isinstance(refs, dict):
        raise SampleError(key, "teacher", f"response of {entry.get('model')!r} has no stored top log-probabilities")
    arrays = {}
    for field in ("tokens", "top_ids", "top_logprobs"):
        if refs.get(field) not in media:
            raise SampleError(key, str(refs.get(field)), f"teacher logprobs member `{field}` is missing")
        arrays[field] = np.asarray(media[refs[field]])
    tokens, ids, logprobs = arrays["tokens"].reshape(-1), arrays["top_ids"], arrays["top_logprobs"]
    n = tokens.shape[0]
    if ids.ndim != 2 or ids.shape != logprobs.shape or ids.shape[0] != n:
        raise SampleError(key, refs["top_ids"], f"top_ids {ids.shape} / top_logprobs {logprobs.shape} do not "
                                                f"match {n} tokens")
    if ids.shape[1] < k:
        raise SampleError(key, refs["top_ids"], f"stores top-{ids.shape[1]}, data.responses.top_logprobs={k}")
    ids, logprobs = ids[:, :k], logprobs[:, :k]
    if ((ids < 0) | (ids >= vocab)).any():
        raise SampleError(key, refs["top_ids"], f"token ids outside the tokenizer's {vocab}")
    if not np.isfinite(logprobs).all() or (logprobs > 1e-4).any():
        raise SampleError(key, refs["top_logprobs"], "log-probabilities must be finite and <= 0")
    start, end = encoded.assistant_spans[-1]
    target = encoded.input_ids[start:end].numpy()
    # the stored tokens end the turn; what precedes them (an empty <think> block that a no-think template
    # puts in the prompt) was not generated and has no teacher distribution
    if n > len(target) or not np.array_equal(tokens, target[len(target) - n:]):
        raise SampleError(key, refs["tokens"], f"the teacher's {n} tokens are not the end of the rendered "
                                               f"response ({len(target)} tokens): another tokenizer or template?")
    start = end - n
    total = encoded.num_tokens
    out = {"ids": np.zeros((total, k), np.int64), "logprobs": np.zeros((total, k), np.float32),
           "mask": np.zeros(total, bool)}
    out["ids"][start:end] = ids
    out["logprobs"][start:end] = logprobs
    out["mask"][start:end] = True
    return out


def encode_with_responses(sample: Dict[str, Any], encoder: ChatEncoder, cfg, seed: int) -> EncodedSample:
    """A decoded sample -> EncodedSample trained on the responses ``cfg`` (data.responses) names."""
    key = str(sample.get("__key__", "?"))
    if cfg.source == "messages":
        encoded = encoder.encode(sample)
    else:
        encoded = _encode_teacher(sample, encoder, cfg, seed, key)
    if cfg.require_targets and not bool(encoded.loss_mask.any()):
        raise SampleError(key, "json", "no assistant turn to train on")
    return encoded


def _encode_teacher(sample, encoder, cfg, seed, key) -> EncodedSample:
    entry = pick_teacher(sample, cfg, seed)
    turns = list(entry.get("messages") or [])
    if cfg.top_logprobs and turns and isinstance(entry.get("logprobs"), dict):
        # train on the very tokens the teacher's distributions belong to (module docstring)
        tokens = sample.get("media", {}).get(entry["logprobs"].get("tokens"))
        if tokens is not None:
            turns[-1] = {**turns[-1], "token_ids": np.asarray(tokens).reshape(-1).tolist()}
    messages = with_teacher_turns(list(sample["messages"]), turns, key)
    encoded = encoder.encode({**sample, "messages": messages})
    if cfg.top_logprobs:
        encoded.top_logprobs = lay_top_logprobs(encoded, entry, sample.get("media", {}), cfg.top_logprobs,
                                                len(encoder.tokenizer), key)
    return encoded
