"""How GSPO scores its samples: the schema of ``stage.rewards`` (omni_train/rewards/ builds the Rewarder).

A sample's reward is the weighted sum of rule functions (``functions``, by registered name or
``module.path:function``) and, with ``judge.backend`` set, a model judge's normalised 0-1 score. A sample
whose reward cannot be computed (the judge timed out or answered no score, math-verify timed out, no
reference) is failed: NaN, counted, never scored 0; the run stops once the cumulative share of failed
samples passes ``max_failure_rate``. A sample's own JSON may change its scoring under ``spec_key``
(docs/rewards.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

JUDGE_BACKENDS = ("none", "hf", "openai")

DEFAULT_JUDGE_TEMPLATE = (
    "You are grading an answer to a question. Compare the response with the reference answer when one is "
    "given, and judge correctness first, then completeness and clarity.\n\n"
    "Question:\n{question}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Response:\n{response}\n\n"
    "Reply with one line in the form \"Score: N\", where N is an integer from 0 (wrong or useless) to 10 "
    "(fully correct and well explained)."
)


@dataclass
class RewardFunctionConfig:
    name: str  # a registered name (exact_match, math, ...; docs/rewards.md) or "module.path:function"
    weight: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the function after the request


@dataclass
class JudgeConfig:
    backend: str = "none"  # none | hf (a local transformers model) | openai (an OpenAI-compatible server)
    name: str = "judge"  # its key in per_function, stats and a sample's spec
    weight: float = 1.0
    # hf: a local Hugging Face model dir, a text causal LM (AutoModelForCausalLM + its chat template) or an
    # image-text-to-text model (AutoModelForImageTextToText + AutoProcessor), which also sees the media
    path: Optional[str] = None
    device: str = "auto"  # hf: "auto" (the current CUDA device when there is one, else CPU), "cpu", "cuda:1"
    dtype: str = "auto"  # hf: "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp16", "fp32"
    batch_size: int = 8  # hf: prompts per generate call
    url: Optional[str] = None  # openai: the base URL ending in /v1 (`vllm serve` prints it)
    model: str = ""  # openai: the served model name sent with each request
    api_key_env: Optional[str] = None  # openai: the environment variable holding the API key (never the key)
    # {question} {response} {reference}: str.format placeholders (a literal brace is written {{ or }})
    template: str = DEFAULT_JUDGE_TEMPLATE
    system: Optional[str] = None  # a system message before the template's user message
    # give the request's media to the judge: only for a judge that takes them (an image-text model; a text
    # model behind vLLM answers HTTP 400 to image parts); off, the judge reads the text only
    send_media: bool = False
    score_pattern: str = r"[Ss]core\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)"  # group 1 is the score; the last match counts
    max_score: float = 10.0  # score / max_score in [0, 1]; a score outside [0, max_score] is no score
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (a reply without a score is then not asked again)
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    timeout_s: float = 60.0  # openai: per request
    retries: int = 3  # openai: extra attempts after a timeout, HTTP 429/5xx or a reset connection
    backoff_s: float = 1.0  # wait before the first retry, doubled each time
    concurrency: int = 8  # openai: requests in flight (threads)


@dataclass
class RewardsConfig:
    functions: List[RewardFunctionConfig] = field(
        default_factory=lambda: [RewardFunctionConfig(name="normalized_match")])
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # the run stops when the cumulative share of failed samples passes this, once at least
    # min_samples_for_failure_rate samples were scored
    max_failure_rate: float = 0.1
    min_samples_for_failure_rate: int = 32
    # where a sample's own reward spec lives in its JSON (Prompt.meta[spec_key]): {"reference": str,
    # "functions": [name | {name, weight, kwargs}], "weights": {name: float}}
    spec_key: str = "reward"
