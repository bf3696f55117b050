"""The rollout engine: responses sampled from the policy being trained (on-policy distillation, GSPO).

One interface for every backend (``stage.rollout.backend``, config/rollout.py):

    engine.sync(model)                         -> SyncReport (the engine sees the model's current weights)
    engine.generate(prompts, sampling, seed)   -> [Sample] (prompt-major: prompt 0's n samples first)

Prompts are ``data.prompts.Prompt`` (a conversation without its final assistant turn, encoded with the
generation header; media included). Per sample the engine returns the response's token ids (ending with
the stop id when one ended it), the log-probability of each under the sampling policy and the finish
reason ("stop" | "length").

The log-probabilities are those of the temperature-scaled distribution, ``log_softmax(logits / T)`` (T = 1
for greedy decoding), before top-k / top-p truncation: what the trainer recomputes from its own logits
(losses/onpolicy.py ``token_logprobs``), so that the two can be compared token for token
(loops/rollout.py logs the difference every step).

Backends: ``hf`` (rollout/hf.py: transformers' Thinker in this process, CPU and GPU, every modality) and
``megatron`` (rollout/megatron.py: megatron-core's static inference path over the trained model itself, no
weight copy; text prompts, tp = pp = cp = ep = 1). Sampling is seeded: the same prompts, weights and seed
give the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from omni_train.config.rollout import BACKENDS, SamplingConfig
from omni_train.data.prompts import Prompt

FINISH_REASONS = ("stop", "length")


@dataclass
class Sample:
    prompt: Prompt
    index: int  # which of the prompt's n samples
    token_ids: List[int]
    logprobs: List[float]  # one per token id, under the sampling policy (module docstring)
    finish_reason: str  # "stop": ended by a stop id (the last token); "length": max_new_tokens reached
    extra: dict = field(default_factory=dict)  # what a stage adds (rewards, teacher scores)

    def __post_init__(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"sample of {self.prompt.key}: {len(self.token_ids)} tokens, "
                             f"{len(self.logprobs)} log-probabilities")


@dataclass
class RolloutPlan:
    """What a stage makes of a step's samples (``Stage.plan_rollout``, loops/rollout.py): the mini-batches to update on, in
    order (one optimizer update each; the default is one of all the samples), the per-sample ``extra``
    fields the micro-batches carry, and values to log."""

    minibatches: List[List[Sample]]
    # sample.extra fields the micro-batches carry (a mini-batch carries those all its samples have)
    fields: Tuple[str, ...] = ()
    values: Dict[str, float] = field(default_factory=dict)
    # report names logged from the first update only (what the policy looked like before this step's
    # updates), the others averaged over the updates (``*_max``: their largest)
    first_only: Tuple[str, ...] = ()


def sampling_seed(base: int, step: int, dp_rank: int) -> int:
    """The seed of a step's rollout on one data-parallel rank: a pure function of the run's seed, the step
    and the rank, so a resumed run samples exactly what an uninterrupted one does."""
    return (base * 1_000_003 + step * 7919 + dp_rank * 104_729) % (2**63 - 1)


def check_sampling(sampling: SamplingConfig, key: str = "stage.rollout.sampling") -> None:
    """ValueError naming the key of a sampling parameter out of range."""
    if sampling.n < 1:
        raise ValueError(f"{key}.n: {sampling.n}, need at least 1 sample per prompt")
    if sampling.temperature < 0:
        raise ValueError(f"{key}.temperature: {sampling.temperature} < 0")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"{key}.top_p: {sampling.top_p}, need 0 < top_p <= 1")
    if sampling.top_k < 0:
        raise ValueError(f"{key}.top_k: {sampling.top_k} < 0 (0: off)")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"{key}.max_new_tokens: {sampling.max_new_tokens} < 1")


def build_engine(backend: str, model_cfg, encoder, device, dtype, generation_batch: int = 0):
    """The rollout engine of ``backend`` for a Thinker of sizes ``model_cfg`` (``model.thinker``) whose
    prompts ``encoder`` (data.chat.ChatEncoder) writes."""
    if backend == "hf":
        from omni_train.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(model_cfg, encoder, device, dtype, generation_batch)
    if backend == "megatron":
        from omni_train.rollout.megatron import MegatronRolloutEngine

        return MegatronRolloutEngine(model_cfg, encoder, device, dtype, generation_batch)
    raise ValueError(f"stage.rollout.backend: {backend!r}, expected one of {', '.join(BACKENDS)}")


def model_logits(model, batch) -> torch.Tensor:
    """A model's logits [B, L, V / tp] on a packed rollout micro-batch (loops/rollout.py): the trained model
    or a frozen one (frozen.FrozenModel), a Thinker with towers or an LM alone (text only: 1-D positions)."""
    from megatron.core.utils import unwrap_model

    from omni_train.frozen import FrozenModel
    from omni_train.models.common.attention import document_attention

    inner = unwrap_model(model.module if isinstance(model, FrozenModel) else model)
    attention = document_attention(batch)
    if hasattr(inner, "prepare_media"):
        media = inner.prepare_media(batch["media"], batch["media_sizes"], batch["input_ids"].device)
        return model(batch["input_ids"], batch["position_ids"], labels=None, **attention, **media)
    if any(v is not None for v in batch["media_sizes"].values()):
        raise ValueError("a text-only model got a prompt with media (stage.loss.text_prompts_only filters them)")
    return model(batch["input_ids"], batch["position_ids"][0], labels=None, **attention)


def stop_ids(encoder, sampling: SamplingConfig) -> List[int]:
    """The ids that end a response: end of turn, end of text (where the tokenizer has one), and the
    recipe's ``stop_ids``."""
    ids = [encoder.ids["im_end"]]
    eos = encoder.tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    return ids + [int(i) for i in sampling.stop_ids if int(i) not in ids]


__all__ = ["FINISH_REASONS", "Prompt", "RolloutPlan", "Sample", "build_engine", "check_sampling", "model_logits", "sampling_seed",
           "stop_ids"]
