"""A teacher behind an OpenAI-compatible chat-completions endpoint (`vllm serve` and the like).

One POST to `{url}/chat/completions` per sample, `workers` at a time (a thread pool). The think mode goes
in `chat_template_kwargs.enable_thinking`, as vLLM takes it; media go as `image_url` / `input_audio` /
`video_url` parts with base64 data (teacher_prompts.py), plus `mm_processor_kwargs.use_audio_in_video`
when a video part asks for its audio track. A request that fails with HTTP 429 or 5xx, a reset or
refused connection, or a timeout is retried `retries` times (waiting `backoff` seconds, doubled each
time), then its sample is reported; HTTP 401/403/404 (key, address or model wrong) stops the run.

Top-k log-probabilities: `logprobs: true, top_logprobs: K, return_tokens_as_token_ids: true` (a vLLM
extension: tokens come as "token_id:123"). vLLM's log-probabilities are those of the raw logits and its
last entry is the eos token when the response stopped on one. A server that sends plain token strings
needs `--tokenizer`: a token's `bytes` map to the byte-level BPE alphabet and then to an id. One short
probe request checks this before any sample is generated. The API key is only ever put in the
Authorization header.
"""

import http.client
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

from data_pipelines.teacher_prompts import (Answer, SampleFailed, TeacherError, openai_messages,
                                            uses_audio_in_video)

TOKEN_ID_PREFIX = "token_id:"
PROBE_MESSAGES = [{"role": "user", "content": "Hi"}]


class _Transient(Exception):
    """A failure worth retrying (server error, reset connection, timeout)."""


class EndpointTeacher:
    def __init__(self, url, options, served_model=None, api_key=None, workers=4, timeout=60.0, retries=2,
                 backoff=1.0, tokenizer_dir=None):
        self.base_url, self.options = url.rstrip("/"), options
        self.workers, self.timeout, self.retries, self.backoff = max(1, workers), timeout, retries, backoff
        self._api_key = api_key
        self.token_ids = TokenIds(tokenizer_dir)
        self.served_model = served_model or self._first_served_model()
        self.identity = f"{self.base_url} model={self.served_model}"  # what the resume fingerprint knows it by
        self._probed = not options.top_logprobs

    def prepare(self, messages, members):
        """The request body for a sample's prompt."""
        opts = self.options
        body = {"model": self.served_model, "messages": openai_messages(messages, members),
                "max_tokens": opts.max_new_tokens, "temperature": opts.temperature, "top_p": opts.top_p,
                "seed": opts.seed, "chat_template_kwargs": {"enable_thinking": opts.mode == "think"}}
        if opts.top_logprobs:
            body.update(logprobs=True, top_logprobs=opts.top_logprobs, return_tokens_as_token_ids=True)
        if uses_audio_in_video(messages):
            body["mm_processor_kwargs"] = {"use_audio_in_video": True}
        return body

    def answer(self, prompts, on_done=lambda n: None):
        """[(key, request body)] -> {key: Answer or SampleFailed}; TeacherError stops everything."""
        if prompts and not self._probed:
            self._probe(prompts[0][1])
        answers = {}
        pool = ThreadPoolExecutor(self.workers)
        try:
            futures = {pool.submit(self._answer_one, body): key for key, body in prompts}
            for future in as_completed(futures):
                try:
                    answers[futures[future]] = future.result()
                except SampleFailed as exc:
                    answers[futures[future]] = exc
                on_done(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return answers

    def _answer_one(self, body):
        return self._parse(self._post_with_retries(body))

    def _probe(self, body):
        """One short request: does the server return log-probabilities whose tokens we can turn into ids?"""
        try:
            probe = {k: v for k, v in body.items() if k != "mm_processor_kwargs"}
            reply = self._post_with_retries({**probe, "messages": PROBE_MESSAGES, "max_tokens": 1})
            self._parse(reply)
        except SampleFailed as exc:
            raise TeacherError(f"probe request to {self.base_url} failed: {exc}") from None
        self._probed = True

    def _parse(self, reply):
        try:
            choice = reply["choices"][0]
            text, finish = choice["message"].get("content") or "", choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise SampleFailed(f"not a chat-completions response ({type(exc).__name__}: {exc})") from None
        if finish not in ("stop", "length"):
            raise SampleFailed(f"finish_reason {finish!r} (expected stop or length)")
        answer = Answer(text, finish)
        if self.options.top_logprobs:
            self._add_logprobs(answer, (choice.get("logprobs") or {}).get("content"))
        return answer

    def _add_logprobs(self, answer, entries):
        k = self.options.top_logprobs
        if not entries:
            raise SampleFailed("the response has no logprobs.content (does the server support logprobs?)")
        rows = [sorted(e.get("top_logprobs") or [], key=lambda t: -t["logprob"])[:k] for e in entries]
        if any(len(row) < k for row in rows):
            raise SampleFailed(f"the server returned fewer than top_logprobs={k} alternatives for a token")
        answer.tokens = np.array([self.token_ids(e) for e in entries], np.int32)
        answer.top_ids = np.array([[self.token_ids(t) for t in row] for row in rows], np.int32)
        answer.top_logprobs = np.array([[t["logprob"] for t in row] for row in rows], np.float32)

    def _first_served_model(self):
        request = urllib.request.Request(f"{self.base_url}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException) as exc:
            raise TeacherError(f"cannot list the served models at {self.base_url}/models ({_describe(exc)}); "
                               f"give --served-model") from None

    def _headers(self):
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _post_with_retries(self, body):
        for attempt in range(self.retries + 1):
            try:
                return self._post(body)
            except _Transient as exc:
                last = exc
                if attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
        raise SampleFailed(f"{last} (after {self.retries + 1} attempts)")

    def _post(self, body):
        url = f"{self.base_url}/chat/completions"
        request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=self._headers(),
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            _raise_for_status(url, exc.code, exc.read()[:300].decode("utf-8", "replace"))
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
            raise _Transient(_describe(exc)) from None
        try:
            return json.loads(data)
        except ValueError:
            raise SampleFailed(f"the response is not JSON: {data[:100]!r}") from None


def _raise_for_status(url, status, detail):
    if status in (401, 403):
        raise TeacherError(f"{url}: HTTP {status}, the endpoint refused the request (API key?): {detail}")
    if status == 404:
        raise TeacherError(f"{url}: HTTP 404 (wrong URL or served model name?): {detail}")
    if status == 429 or status >= 500:
        raise _Transient(f"HTTP {status}: {detail}")
    raise SampleFailed(f"HTTP {status}: {detail}")


def _describe(exc):
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, TimeoutError):
        return "timed out"
    return f"{type(reason).__name__}: {reason}"


class TokenIds:
    """A logprobs entry -> its token id: "token_id:N" (vLLM's return_tokens_as_token_ids) or, with a local
    tokenizer (byte-level BPE), the token's `bytes` -> the byte-to-unicode alphabet -> convert_tokens_to_ids."""

    def __init__(self, tokenizer_dir=None):
        self.tokenizer = self.alphabet = None
        if tokenizer_dir:
            from transformers import AutoTokenizer
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self.tokenizer, self.alphabet = AutoTokenizer.from_pretrained(tokenizer_dir), bytes_to_unicode()

    def __call__(self, entry):
        token = entry.get("token", "")
        if token.startswith(TOKEN_ID_PREFIX):
            return int(token[len(TOKEN_ID_PREFIX):])
        if self.tokenizer is None:
            raise TeacherError(f"the endpoint returns tokens as text ({token!r}), not as 'token_id:N' "
                               f"(vLLM's return_tokens_as_token_ids): give --tokenizer DIR to map them to ids")
        if entry.get("bytes") is None:
            raise SampleFailed(f"token {token!r} comes without its bytes")
        piece = "".join(self.alphabet[b] for b in entry["bytes"])
        token_id = self.tokenizer.convert_tokens_to_ids(piece)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and piece != self.tokenizer.unk_token):
            raise SampleFailed(f"token {token!r} (bytes {entry['bytes']}) is not in the --tokenizer vocabulary")
        return token_id
