"""A real local OpenAI-compatible chat-completions server for tests, backed by a tiny transformers causal LM.

    with OpenAIServer(model_dir) as server:      # 127.0.0.1, a free port, a background thread
        url = server.url                         # "http://127.0.0.1:PORT/v1"
        ...                                      # POST {url}/chat/completions, GET {url}/models
        server.requests                          # one Request per HTTP request (path, prompt, status, body)

It generates for real, one request at a time (a lock around the model), as `vllm serve` answers:
- request: `messages` (content a string or a list of parts: `text` parts are joined, as Qwen's templates
  join them; `image_url`, `input_audio`, `video_url` parts are recorded in `server.media` and otherwise
  ignored), `max_tokens` or `max_completion_tokens`, `temperature` (0: greedy), `top_p`, `seed`,
  `chat_template_kwargs` (passed to `apply_chat_template`, e.g. enable_thinking), `logprobs` +
  `top_logprobs`, vLLM's `return_tokens_as_token_ids`.
- response: `choices[0].message.content` (the generated ids without the final eos, decoded without special
  tokens), `finish_reason` ("stop" on an eos id of the model's generation config, else "length"),
  `usage`, and with `logprobs`: `choices[0].logprobs.content[i] = {token, logprob, bytes, top_logprobs:
  [{token, logprob, bytes}]}` for every generated token including the eos, log_softmax of the raw logits
  (temperature 1). A token is "token_id:N" when asked and `token_ids` is on, else its decoded text with
  `bytes` its UTF-8 (as vLLM writes them).

Fault injection by the text of the request's messages: "FAIL500" gets HTTP 500 every time, "FAILONCE"
gets 500 on the first request with that text and an answer afterwards, "SLOW" sleeps `slow_seconds`
before answering. `faults = False` turns injection off. With `api_key`, a request without
`Authorization: Bearer <api_key>` gets 401. Also meant for the model-judge and teacher-logits tests:
subclass and override `complete(body) -> (status, response dict)` for another behaviour.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

MEDIA_PART_TYPES = ("image_url", "input_audio", "video_url", "audio_url")


@dataclass
class Request:
    path: str
    prompt: str  # the text of every message, joined by newlines ("" for a GET)
    status: int  # 0 until answered
    body: Dict[str, Any]


class OpenAIServer:
    def __init__(self, model_dir: str, api_key: Optional[str] = None, token_ids: bool = True,
                 slow_seconds: float = 3.0, served_model: str = "tiny-teacher"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [self.tokenizer.eos_token_id])
        self.api_key, self.token_ids, self.slow_seconds = api_key, token_ids, slow_seconds
        self.served_model, self.faults = served_model, True
        self.requests: List[Request] = []
        self.media: List[Tuple[str, Any]] = []  # (part type, its url / input_audio object)
        self._failed_once: set = set()
        self._lock, self._model_lock = threading.Lock(), threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None

    # ----------------------------------------------------------------------------------- lifetime
    def __enter__(self) -> "OpenAIServer":
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def count(self, text: str = "", path: str = "/v1/chat/completions") -> int:
        """Requests to `path` whose prompt contains `text`."""
        with self._lock:
            return sum(1 for r in self.requests if r.path == path and text in r.prompt)

    # ----------------------------------------------------------------------------------- protocol
    def handle(self, method: str, path: str, headers, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        prompt = "\n".join(_text(m.get("content")) for m in body.get("messages") or [])
        request = Request(path, prompt, 0, body)
        with self._lock:  # logged on arrival: a request the client gave up on still counts, at once
            self.requests.append(request)
        if self.api_key and headers.get("Authorization") != f"Bearer {self.api_key}":
            status, reply = 401, _error("invalid API key", "authentication_error")
        elif method == "GET" and path == "/v1/models":
            status, reply = 200, {"object": "list", "data": [{"id": self.served_model, "object": "model"}]}
        elif method == "POST" and path == "/v1/chat/completions":
            status, reply = self._fault(prompt) or self.complete(body)
        else:
            status, reply = 404, _error(f"no route {method} {path}", "not_found")
        request.status = status
        return status, reply

    def _fault(self, prompt: str) -> Optional[Tuple[int, Dict[str, Any]]]:
        if not self.faults:
            return None
        with self._lock:
            once = "FAILONCE" in prompt and prompt not in self._failed_once
            self._failed_once.add(prompt)
        if "FAIL500" in prompt or once:
            return 500, _error("injected failure", "server_error")
        if "SLOW" in prompt:
            time.sleep(self.slow_seconds)
        return None

    def complete(self, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        """One chat completion (module docstring): (HTTP status, response JSON)."""
        messages = []
        for message in body["messages"]:
            self._record_media(message.get("content"))
            messages.append({"role": message["role"], "content": _text(message.get("content"))})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **(body.get("chat_template_kwargs") or {}))
        prompt_ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        ids, logprobs = self._generate(prompt_ids, max_tokens, float(body.get("temperature", 1.0)),
                                       float(body.get("top_p", 1.0)), body.get("seed"))
        stopped = bool(ids) and ids[-1] in self.eos_ids
        content = self.tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        choice = {"index": 0, "message": {"role": "assistant", "content": content},
                  "finish_reason": "stop" if stopped else "length", "logprobs": None}
        if body.get("logprobs"):
            as_ids = bool(body.get("return_tokens_as_token_ids")) and self.token_ids
            k = int(body.get("top_logprobs") or 0)
            choice["logprobs"] = {"content": self._logprobs(ids, logprobs, k, as_ids)}
        usage = {"prompt_tokens": prompt_ids.shape[1], "completion_tokens": len(ids),
                 "total_tokens": prompt_ids.shape[1] + len(ids)}
        return 200, {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion",
                     "created": int(time.time()), "model": body.get("model", self.served_model),
                     "choices": [choice], "usage": usage}

    def _record_media(self, content) -> None:
        for part in content if isinstance(content, list) else []:
            if part.get("type") in MEDIA_PART_TYPES:
                value = part[part["type"]]
                with self._lock:
                    self.media.append((part["type"], value.get("url", value) if isinstance(value, dict) else value))

    def _generate(self, prompt_ids, max_tokens: int, temperature: float, top_p: float, seed):
        import torch
        from transformers import GenerationConfig

        sampled = temperature > 0
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=sampled, temperature=temperature if sampled else None,
                                  top_p=top_p if sampled else None, top_k=0 if sampled else None,
                                  eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
                                  output_logits=True, return_dict_in_generate=True)
        with self._model_lock, torch.no_grad():
            if sampled and seed is not None:
                torch.manual_seed(int(seed))
            out = self.model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), generation_config=config)
        ids = out.sequences[0, prompt_ids.shape[1]:].tolist()
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        ids = ids if end is None else ids[:end + 1]
        return ids, torch.stack(out.logits, 1)[0, :len(ids)].float().log_softmax(-1)

    def _logprobs(self, ids, logprobs, k: int, as_ids: bool) -> List[Dict[str, Any]]:
        def token(i: int, value: float) -> Dict[str, Any]:
            text = f"token_id:{i}" if as_ids else self.tokenizer.decode([i])
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", errors="replace"))}

        entries = []
        for step, chosen in enumerate(ids):
            top = logprobs[step].topk(k) if k else None
            entry = token(chosen, float(logprobs[step, chosen]))
            entry["top_logprobs"] = [token(int(i), float(v)) for v, i in zip(top.values, top.indices)] if k else []
            entries.append(entry)
        return entries


class _Handler(BaseHTTPRequestHandler):
    owner: OpenAIServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._respond(*self.owner.handle("GET", self.path, self.headers, {}))

    def do_POST(self) -> None:
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except ValueError:
            self._respond(400, _error("body is not JSON", "invalid_request_error"))
            return
        self._respond(*self.owner.handle("POST", self.path, self.headers, body))

    def _respond(self, status: int, reply: Dict[str, Any]) -> None:
        data = json.dumps(reply).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    def log_message(self, *args) -> None:  # keep test output clean
        pass


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")


def _error(message: str, kind: str) -> Dict[str, Any]:
    return {"error": {"message": message, "type": kind}}
