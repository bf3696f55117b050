"""A model judge: the prompt (JudgeConfig.template) -> a reply -> a score in [0, 1].

Two backends, one behaviour:
- ``openai``: one POST to ``{url}/chat/completions`` per sample, ``concurrency`` in flight (a thread pool).
  A timeout, HTTP 429/5xx or a refused/reset connection is retried ``retries`` times, waiting
  ``backoff_s`` doubled each time; every retry is counted. HTTP 401/403/404 (key, address, model wrong)
  stops the run (JudgeError); another 4xx fails the sample. The same protocol as
  data_pipelines/teacher_endpoint.py, written again here because the library does not import the offline
  tools, and a judge counts retries and retries a reply without a score.
- ``hf``: a local transformers model, loaded on the first submit, generating in left-padded batches of
  ``batch_size`` on one background thread (a model is not shared between threads). An image-text-to-text
  model (AutoModelForImageTextToText) gets the request's images through its processor.

The score is the last match of ``score_pattern`` in the reply's answer (after any </think>), divided by
``max_score``; a reply with none, or one outside [0, max_score], is asked again only when sampling
(temperature > 0: greedy decoding would answer the same) and otherwise fails the sample.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from omni_train.config.rewards import JudgeConfig
from omni_train.rewards import media as media_items
from omni_train.rewards.rules import answer_text

NO_REFERENCE = "(none given)"


class JudgeError(RuntimeError):
    """The judge cannot be used at all (wrong URL, key or model): the run stops."""


@dataclass
class JudgeOutcome:
    score: Optional[float]  # in [0, 1]; None: failed
    error: str = ""  # why it failed
    retries: int = 0
    reply: Optional[str] = None  # the last reply's text


@dataclass
class JudgeInput:
    question: str
    response: str
    reference: Optional[str]
    media: List[Any]


def parse_score(reply: str, pattern: str, max_score: float) -> Optional[float]:
    """The last match of pattern's group 1 in the reply's answer, / max_score; None without a valid one."""
    matches = re.findall(pattern, answer_text(reply))
    if not matches:
        return None
    last = matches[-1] if isinstance(matches[-1], str) else matches[-1][0]
    try:
        value = float(last)
    except ValueError:
        return None
    return value / max_score if 0.0 <= value <= max_score else None


def judge_text(cfg: JudgeConfig, item: JudgeInput) -> str:
    reference = item.reference if item.reference is not None and str(item.reference).strip() else NO_REFERENCE
    return cfg.template.format(question=item.question, response=answer_text(item.response), reference=reference)


def build_judge(cfg: JudgeConfig):
    """The judge of cfg.backend, or None for "none"."""
    return {"none": lambda c: None, "openai": OpenAIJudge, "hf": HFJudge}[cfg.backend](cfg)


class OpenAIJudge:
    def __init__(self, cfg: JudgeConfig):
        self.cfg, self.url = cfg, cfg.url.rstrip("/") + "/chat/completions"
        self._api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="reward-judge")

    def submit(self, items: List[JudgeInput]) -> List[Future]:
        """One future per item, each resolving to [JudgeOutcome]."""
        return [self._pool.submit(self._judge_one, item) for item in items]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _body(self, item: JudgeInput) -> Dict[str, Any]:
        cfg, text = self.cfg, judge_text(self.cfg, item)
        content: Any = text
        if cfg.send_media and item.media:
            content = [media_items.openai_part(m) for m in item.media] + [{"type": "text", "text": text}]
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": content}]
        body = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature}
        if cfg.chat_template_kwargs:
            body["chat_template_kwargs"] = dict(cfg.chat_template_kwargs)
        return body

    def _judge_one(self, item: JudgeInput) -> List[JudgeOutcome]:
        cfg = self.cfg
        try:
            body = self._body(item)
        except (ValueError, OSError) as exc:
            return [JudgeOutcome(None, f"judge: media: {exc}")]
        retries, reply, error = 0, None, ""
        for attempt in range(cfg.retries + 1):
            if attempt:
                time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
                retries += 1
            try:
                reply = self._post(body)
            except _Transient as exc:
                error = str(exc)
                continue
            except _Failed as exc:
                return [JudgeOutcome(None, f"judge: {exc}", retries)]
            score = parse_score(reply, cfg.score_pattern, cfg.max_score)
            if score is not None:
                return [JudgeOutcome(score, "", retries, reply)]
            error = f"no score in the reply {reply[-80:]!r}"
            if cfg.temperature == 0:
                break
        return [JudgeOutcome(None, f"judge: {error} (after {retries + 1} attempts)", retries, reply)]

    def _post(self, body: Dict[str, Any]) -> str:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            if exc.code in (401, 403, 404):
                raise JudgeError(f"{self.url}: HTTP {exc.code} (API key, URL or served model name "
                                 f"stage.rewards.judge.model={self.cfg.model!r} wrong?): {detail}") from None
            if exc.code == 429 or exc.code >= 500:
                raise _Transient(f"HTTP {exc.code}: {detail}") from None
            raise _Failed(f"HTTP {exc.code}: {detail}") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
            reason = getattr(exc, "reason", exc)
            raise _Transient("timed out" if isinstance(reason, TimeoutError)
                             else f"{type(reason).__name__}: {reason}") from None
        try:
            return json.loads(data)["choices"][0]["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Failed(f"not a chat-completions response: {data[:100]!r}") from None


class _Transient(Exception):
    """Worth another attempt (timeout, 429/5xx, connection)."""


class _Failed(Exception):
    """This sample's request cannot succeed (a 4xx other than key/URL/model, a malformed response)."""


class HFJudge:
    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.model = self.tokenizer = self.processor = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="reward-judge-hf")

    def submit(self, items: List[JudgeInput]) -> List[Future]:
        """One future per batch of cfg.batch_size items, each resolving to its [JudgeOutcome]."""
        if self.model is None:
            from omni_train.parallel.process_state import preserved_rng

            with preserved_rng():  # loading leaves no trace in the trained model's or the data's RNGs
                self._load()
        size = self.cfg.batch_size
        return [self._pool.submit(self._judge_batch, items[i:i + size]) for i in range(0, len(items), size)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
        import torch
        from transformers import (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, AutoConfig, AutoModelForCausalLM,
                                  AutoModelForImageTextToText, AutoProcessor, AutoTokenizer)

        cfg = self.cfg
        device = cfg.device if cfg.device != "auto" else (
            f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
            cfg.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if type(AutoConfig.from_pretrained(cfg.path)) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            self.processor = AutoProcessor.from_pretrained(cfg.path)
            self.tokenizer = self.processor.tokenizer
            model_cls = AutoModelForImageTextToText
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
            model_cls = AutoModelForCausalLM
        self.tokenizer.padding_side = "left"
        self.model = model_cls.from_pretrained(cfg.path, dtype=dtype).to(device).eval()

    def _messages(self, item: JudgeInput, images: List[Any]) -> List[Dict[str, Any]]:
        text = judge_text(self.cfg, item)
        content: Any = text
        if self.processor is not None:
            content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        return system + [{"role": "user", "content": content}]

    def _judge_batch(self, items: List[JudgeInput]) -> List[JudgeOutcome]:
        cfg = self.cfg
        outcomes: List[Optional[JudgeOutcome]] = [None] * len(items)
        conversations = {}
        for i, item in enumerate(items):
            try:
                images = [media_items.pil_image(m) for m in item.media] if self.processor and cfg.send_media else []
                conversations[i] = self._messages(item, images)
            except (ValueError, OSError) as exc:
                outcomes[i] = JudgeOutcome(None, f"judge: media: {exc}")
        retries = {i: 0 for i in conversations}
        pending = list(conversations)
        for attempt in range(cfg.retries + 1 if cfg.temperature > 0 else 1):
            if not pending:
                break
            if attempt:
                for i in pending:
                    retries[i] += 1
            still = []
            for i, reply in zip(pending, self._generate([conversations[i] for i in pending])):
                score = parse_score(reply, cfg.score_pattern, cfg.max_score)
                error = "" if score is not None else \
                    f"judge: no score in the reply {reply[-80:]!r} (after {retries[i] + 1} attempts)"
                outcomes[i] = JudgeOutcome(score, error, retries[i], reply)
                if score is None:
                    still.append(i)
            pending = still
        return outcomes

    def _generate(self, conversations: List[List[Dict[str, Any]]]) -> List[str]:
        import torch

        cfg, kwargs = self.cfg, dict(self.cfg.chat_template_kwargs)
        if self.processor is not None:
            inputs = self.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt", padding=True,
                                                        **kwargs)
        else:
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True, **kwargs)
                     for c in conversations]
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.model.device)
        sampled = cfg.temperature > 0
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=cfg.max_tokens, do_sample=sampled,
                                      temperature=cfg.temperature if sampled else None, top_p=None, top_k=None,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)
