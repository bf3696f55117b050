"""Distillation losses on the student's logits, with the vocabulary split over tensor-parallel ranks.

``top_k_kl``: forward KL(teacher || student) restricted to the teacher's stored top-k tokens plus one tail
bucket holding the rest of the probability. Per label position, with the teacher's top-k log-probabilities
``t_k`` and the student's log-probabilities ``s_k`` of the same tokens:

    KL = sum_k exp(t_k) (t_k - s_k) + T (log T - log S),   T = 1 - sum_k exp(t_k),  S = 1 - sum_k exp(s_k)

That is the exact KL between the two distributions coarsened to K+1 outcomes (what a teacher that stored
only its top-k tells us); it is 0 iff the student puts the teacher's mass on each of the k tokens. trl's
``generalized_jsd_loss`` with beta=0 over those K+1 outcomes computes the same number
(tests/posttrain/test_distill_losses.py).
"""

from __future__ import annotations

from typing import Optional

import torch

# floor of a tail bucket's probability (its log stays finite when the top-k hold all the mass)
TAIL_FLOOR = 1e-20


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def tp_group():
    """The tensor-parallel process group, or None at one rank (or before megatron's parallel_state is set up)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group() \
        if parallel_state.get_tensor_model_parallel_world_size() > 1 else None


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the tensor-parallel ranks; the gradient passes through unchanged (every rank holds the sum)."""
    if group is None:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x)


def student_log_probs(logits: torch.Tensor, ids: torch.Tensor, group=None) -> torch.Tensor:
    """log softmax(logits)[..., ids] over the whole vocabulary; ``logits`` [..., V_local] is this rank's
    vocabulary shard (rank r holds tokens [r * V_local, (r+1) * V_local)), ``ids`` [..., K] global ids."""
    x = _at_least_fp32(logits)
    vocab_local = x.shape[-1]
    top = x.max(dim=-1).values.detach()
    if group is not None:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
    lse = top + torch.log(_all_reduce_sum(torch.exp(x - top.unsqueeze(-1)).sum(-1), group))
    start = torch.distributed.get_rank(group) * vocab_local if group is not None else 0
    local = ids - start
    inside = (local >= 0) & (local < vocab_local)
    picked = x.gather(-1, local.clamp(0, vocab_local - 1)) * inside
    return _all_reduce_sum(picked, group) - lse.unsqueeze(-1)


def _tail_log(log_probs: torch.Tensor) -> torch.Tensor:
    return torch.log((1.0 - torch.exp(log_probs).sum(-1)).clamp_min(TAIL_FLOOR))


def top_k_kl(logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor, top_mask: torch.Tensor,
             group: Optional[object] = "auto") -> torch.Tensor:
    """Per-position KL(teacher || student) over the teacher's top-k + tail (module docstring), 0 where
    ``top_mask`` is False. logits [B, L, V_local], top_ids / top_logprobs [B, L, K], top_mask [B, L]."""
    group = tp_group() if group == "auto" else group
    student = student_log_probs(logits, top_ids, group)
    teacher = _at_least_fp32(top_logprobs)
    tail_teacher = _tail_log(teacher)
    kl = (torch.exp(teacher) * (teacher - student)).sum(-1) \
        + torch.exp(tail_teacher) * (tail_teacher - _tail_log(student))
    return torch.where(top_mask, kl, torch.zeros_like(kl))


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [B, L] of ``labels`` under logits [B, L, V_local] (vocab-parallel)."""
    if tp_group() is None:
        from omni_train.models.common.cross_entropy import cross_entropy

        return cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).view(labels.shape)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), labels)
