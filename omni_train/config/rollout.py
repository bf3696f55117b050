"""How a stage that learns from the model's own samples (on-policy distillation, GSPO) generates them: the
schema of ``stage.rollout`` (omni_train/rollout/ builds the engine from it).

Per optimizer step the rollout loop takes ``prompts_per_step`` prompts (over all data-parallel ranks), draws
``sampling.n`` responses for each from the current policy, scores them and updates. Sampling is seeded by
(trainer.seed, step, data-parallel rank): a resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

BACKENDS = ("hf", "megatron")
# stage.loss.divergence of distill_onpolicy (losses/onpolicy.py)
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled_token")


@dataclass
class SamplingConfig:
    n: int = 4  # responses per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling; 1: off
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64
    # ids that end a response besides the tokenizer's end of turn (<|im_end|>) and end of text
    stop_ids: List[int] = field(default_factory=list)


@dataclass
class RolloutConfig:
    # "hf": transformers' Thinker in this process, its weights synced from the trained model in memory
    # (CPU and GPU, every modality); "megatron": megatron-core's inference engine over the trained model
    # itself (GPU, text prompts)
    backend: str = "hf"
    prompts_per_step: int = 4  # prompts per optimizer step, over all data-parallel ranks
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # a prompt longer than this (tokens, media placeholders included) is skipped and counted
    max_prompt_tokens: int = 1024
    # sequences generated together per forward (per rank); 0: all of the rank's prompts x n at once.
    # The trainer packs the samples whole into its usual micro-batches (trainer.micro_batch_size rows of
    # trainer.seq_length tokens): max_prompt_tokens + sampling.max_new_tokens must fit in seq_length.
    generation_batch: int = 0


ADVANTAGE_SCALES = ("group", "batch", "none")
GSPO_LEVELS = ("sequence", "sequence_token", "token")
OLD_LOGPROBS = ("recompute", "rollout")


@dataclass
class GSPOConfig:
    """stage.gspo: the policy update of the gspo stage (losses/gspo.py, stages/gspo.py)."""

    # importance ratio: "sequence" (GSPO), "sequence_token" (GSPO-token), "token" (GRPO)
    level: str = "sequence"
    epsilon_low: float = 3e-4  # clip range [1 - epsilon_low, 1 + epsilon_high] (the paper's defaults)
    epsilon_high: float = 4e-4
    # optimizer steps per rollout batch: its samples split into this many mini-batches (the paper: 4)
    minibatches: int = 4
    # the old policy's log-probabilities: "recompute" (the trainer's, before the batch's first update: the
    # first mini-batch's ratio is exactly 1) or "rollout" (the engine's, which also corrects the
    # rollout-vs-trainer mismatch)
    old_logprobs: str = "recompute"
    # advantage = (reward - group mean) / (std + advantage_eps): std of the "group", of the "batch", or
    # "none" (no division: Dr. GRPO)
    advantage_scale: str = "group"
    advantage_eps: float = 1e-4
    # KL to the frozen model named "reference" (k3 estimator), weighted by beta; 0: off, no reference needed
    beta: float = 0.0
    kl_bias_correction: bool = True  # the KL term weighted by the ratio (trl's use_bias_correction_kl)
    # groups whose rewards are all equal carry no signal: counted always; with dynamic_sampling, more
    # prompts are drawn (at most max_refills more rounds per step) until every group of the batch has signal
    dynamic_sampling: bool = False
    max_refills: int = 2
