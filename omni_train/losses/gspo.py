"""GSPO (Group Sequence Policy Optimization, Zheng et al. 2025): a policy-gradient loss whose importance
ratio is per sequence, so that a mixture-of-experts policy trains stably without routing replay.

For a response y_i of |y_i| tokens, with the log-probabilities of the policy being trained (``logp``) and of
the policy that sampled it (``old``):

    s_i = exp( sum_t (logp_t - old_t) / |y_i| )                 (the geometric mean of the token ratios)
    loss_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)  [+ beta mean_t k3_t]
    loss = mean_i loss_i

``A_i`` is the response's reward normalised within its group of responses to one prompt
(``group_advantages``, trl's formula). Levels (``level``):

- ``sequence``: the above (trl's ``importance_sampling_level="sequence"`` with ``loss_type="grpo"``);
- ``sequence_token`` (GSPO-token): s_i,t = sg[s_i] exp(logp_t - sg[logp_t]), per-token advantages allowed;
  numerically s_i,t = s_i, and with one advantage per sequence its gradient equals GSPO's;
- ``token``: GRPO's token ratio exp(logp_t - old_t), each sequence's token mean (trl's default level).

The optional KL to a frozen reference is trl's per-token k3 estimator ``exp(ref - logp) - (ref - logp) - 1``,
averaged over each sequence's tokens and added with weight ``beta`` (off by default, as in the paper).

Rollout micro-batches are packed: several responses share a row, told apart by ``sample_ids`` (the sample's
index, -1 outside responses: loops/rollout.py). Per-sequence sums are ``index_add`` over those ids, so a
sequence must lie whole in one micro-batch (the rollout loop packs samples whole) and on one rank (no
context parallelism). The loss returned is the SUM over the micro-batch's sequences, with their count: the
loop divides by the mini-batch's sequences over all data-parallel ranks, giving trl's mean over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from omni_train.losses.distill import tp_group

LEVELS = ("sequence", "sequence_token", "token")
SCALES = ("group", "batch", "none")


def _nanstd(x: torch.Tensor, dim=None) -> torch.Tensor:
    """The unbiased standard deviation of the non-NaN values (over ``dim``, kept; else all)."""
    keep = dim is not None
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keep)
    var = torch.nanmean((x - torch.nanmean(x, dim=dim, keepdim=keep)) ** 2, dim=dim, keepdim=keep)
    return (var * count / (count - 1)).sqrt()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """(advantages, std) [N] of rewards [N] laid out group by group (``group_size`` responses per prompt):
    ``(r - group mean) / (std + eps)``, std the unbiased standard deviation of the group (``scale="group"``),
    of the whole batch (``"batch"``) or no division (``"none"``), as trl's GRPOTrainer. NaN rewards (failed
    samples) are left out of the means and deviations and get a NaN advantage (the caller drops them)."""
    if scale not in SCALES:
        raise ValueError(f"advantage scale must be one of {SCALES}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "batch":
        std = _nanstd(rewards).expand_as(grouped) if rewards.numel() > 1 else torch.zeros_like(grouped)
    else:
        std = _nanstd(grouped, dim=1).expand_as(grouped) if group_size > 1 else torch.zeros_like(grouped)
    advantages = grouped - mean
    if scale != "none":
        advantages = advantages / (std + eps)
    return advantages.reshape(-1), std.reshape(-1)


@dataclass
class SequenceIndex:
    """Which sequence each valid target token belongs to, in a packed micro-batch."""

    valid: torch.Tensor  # [B, L] bool: a target token of some sequence
    index: torch.Tensor  # [T] the local sequence index (0..count-1) of each valid token, row-major
    count: int  # sequences in the micro-batch
    tokens: torch.Tensor  # [count] target tokens per sequence (float)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums [count] of ``values`` [B, L] over each sequence's tokens."""
        out = values.new_zeros(self.count)
        return out.index_add(0, self.index, values[self.valid])

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum(values) / self.tokens.to(values.dtype)

    def pick(self, values: torch.Tensor) -> torch.Tensor:
        """The value ``values`` [B, L] holds on every token of each sequence (a per-sequence constant stored
        per token, e.g. the advantage), exactly: [count]."""
        return values.new_zeros(self.count).scatter(0, self.index, values[self.valid])

    def spread(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """[count] -> [B, L]: each sequence's value on its tokens, 0 elsewhere."""
        out = per_sequence.new_zeros(self.valid.shape)
        return out.masked_scatter(self.valid, per_sequence[self.index])


def sequence_index(sample_ids: torch.Tensor, mask: torch.Tensor) -> SequenceIndex:
    valid = mask & (sample_ids >= 0)
    ids = sample_ids[valid]
    unique, index = torch.unique(ids, return_inverse=True)
    tokens = torch.zeros(unique.numel(), device=ids.device).index_add(0, index, torch.ones_like(ids, dtype=torch.float))
    return SequenceIndex(valid, index, int(unique.numel()), tokens)


@dataclass
class GSPOTerms:
    loss_sum: torch.Tensor  # scalar: sum over sequences of each sequence's loss (differentiable)
    ratio: torch.Tensor  # [count] the importance ratio s_i (token level: its token mean), detached
    clipped: torch.Tensor  # [count] float: share of the sequence's tokens in the clipped region (0/1 per sequence)
    kl: Optional[torch.Tensor]  # [count] mean k3 KL to the reference per sequence, detached (None without one)


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """trl's per-token KL estimate exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              seq: SequenceIndex, epsilon_low: float, epsilon_high: float, level: str = "sequence",
              ref_logprobs: Optional[torch.Tensor] = None, beta: float = 0.0,
              kl_bias_correction: bool = True) -> GSPOTerms:
    """The GSPO loss of one packed micro-batch (module docstring). ``logprobs`` [B, L] (differentiable),
    ``old_logprobs`` and ``advantages`` [B, L] (per token; constant over a sequence for ``sequence``),
    ``ref_logprobs`` [B, L] when ``beta`` > 0. ``kl_bias_correction`` (trl's ``use_bias_correction_kl``,
    default on there too) weights the KL term by the importance ratio, so that its gradient is the unbiased
    reverse-KL gradient (DeepSeek-V3.2); the ratio is differentiable, so this changes the gradient even
    where the ratio is 1."""
    if level not in LEVELS:
        raise ValueError(f"GSPO level must be one of {LEVELS}, got {level!r}")
    if beta and ref_logprobs is None:
        raise ValueError("GSPO with beta > 0 needs the reference's log-probabilities")
    valid = seq.valid
    zero = torch.zeros_like(logprobs)
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), zero)  # no exp() of padding's garbage
    advantages = advantages.detach().to(logprobs.dtype)
    low, high = 1.0 - epsilon_low, 1.0 + epsilon_high
    if level == "sequence":
        ratio = torch.exp(seq.mean(log_ratio))  # [count]
        adv = seq.pick(advantages)
        per_sequence = -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)
        clipped = ((ratio < low) & (adv < 0)) | ((ratio > high) & (adv > 0))
        shown_ratio, clipped = ratio.detach(), clipped.float()
        kl_weight = seq.spread(ratio)
    else:
        if level == "sequence_token":
            seq_log_ratio = seq.mean(log_ratio).detach()
            token_log_ratio = seq.spread(seq_log_ratio) + logprobs - logprobs.detach()
        else:
            token_log_ratio = log_ratio
        ratio = torch.exp(torch.where(valid, token_log_ratio, zero))
        per_token = -torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages)
        per_sequence = seq.mean(torch.where(valid, per_token, zero))
        clipped = ((ratio < low) & (advantages < 0)) | ((ratio > high) & (advantages > 0))
        shown_ratio, clipped = seq.mean(ratio.detach()), seq.mean(clipped.float())
        kl_weight = ratio
    kl = None
    if ref_logprobs is not None:
        per_token_kl = torch.where(valid, k3(logprobs, ref_logprobs.detach()), zero)
        kl = seq.mean(per_token_kl.detach())
        if beta:
            weighted = per_token_kl * kl_weight if kl_bias_correction else per_token_kl
            per_sequence = per_sequence + beta * seq.mean(weighted)
    return GSPOTerms(per_sequence.sum(), shown_ratio, clipped, kl)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 1024,
                  group="auto") -> torch.Tensor:
    """The policy's entropy at each masked position [B, L] (0 elsewhere), of softmax(logits / T) over the full
    vocabulary; logits [B, L, V_local] split over tensor-parallel ranks. No gradient; fp32; ``chunk_tokens``
    positions at a time (a few [chunk, V_local] temporaries)."""
    group = tp_group() if group == "auto" else group
    flat = logits.detach().reshape(-1, logits.shape[-1])
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    out = torch.zeros(mask.numel(), dtype=torch.float32, device=logits.device)
    for start in range(0, idx.numel(), chunk_tokens):
        rows = idx[start:start + chunk_tokens]
        x = flat.index_select(0, rows).float()
        if temperature != 1.0:
            x.div_(temperature)
        top = x.amax(-1)
        if group is not None:
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
        e = (x - top.unsqueeze(-1)).exp_()
        sums = torch.stack([e.sum(-1), (e * x).sum(-1)])
        if group is not None:
            torch.distributed.all_reduce(sums, group=group)
        out[rows] = top + torch.log(sums[0]) - sums[1] / sums[0]
    return out.view(mask.shape)
