"""On-policy distillation losses: the student samples, the teacher scores the student's own tokens.

Two forms, per position of a rollout (``p``: student, ``q``: teacher, both ``softmax(logits / T)`` over the
whole vocabulary, split over tensor-parallel ranks; ``s = log p``, ``t = log q``):

**Full-vocabulary divergence** (``full_vocab_divergence``), trl's ``GKDTrainer.generalized_jsd_loss``
per position (masked sum / valid positions is its ``batchmean``):

    forward_kl   KL(q || p) = sum_v q_v (t_v - s_v)
    reverse_kl   KL(p || q) = sum_v p_v (s_v - t_v)
    jsd, beta    beta KL(q || m) + (1 - beta) KL(p || m),   m = (1 - beta) p + beta q

"jsd" at beta 0 and 1 is forward and reverse KL, as in trl (the mixture formula itself tends to 0 at both
ends, so the end points are defined, not limits). The gradient with respect to the student's logits ``z``
is written out, so backward needs no autograd graph over the vocabulary and no collective:

    forward_kl   (p - q) / T
    reverse_kl   p (s - t - KL(p || q)) / T
    jsd          (1 - beta) p (s - log m - KL(p || m)) / T

**Sampled-token form** (``sampled_token_advantage``, ``sampled_token_loss``): the per-token reverse-KL
estimate on the sampled token y_t is ``s(y_t) - t(y_t)``; its negative is the advantage

    A_t = sg[t(y_t) - s(y_t)]
    loss_t = -A_t * exp(s(y_t) - sg[s_rollout(y_t)])

the importance-weighted policy gradient: at the first update (student == rollout log-probs) the ratio is
1 and the gradient is ``-A_t * grad s(y_t)``, the policy gradient of the sampled reverse KL.

**Memory** of ``full_vocab_divergence``: the positions where ``mask`` holds are processed ``chunk_tokens``
at a time in forward and again in backward (one autograd Function over all chunks; masked positions cost
nothing). Saved for backward: the student's and teacher's logits themselves (alive anyway; referenced, not
copied, when contiguous) and three numbers per valid position. Peak beyond the inputs, measured with torch's profiler on
CPU: forward 4 ``[chunk_tokens, V_local]`` fp32 temporaries for "jsd", 3 for the KLs; backward the same
count plus the student logits' gradient ``[B, L, V_local]`` in their own dtype (what autograd allocates for
any loss on them). At V_local = 152k and chunk 1024 a temporary is 0.62 GB: 2.5 GB at most, whatever the
number of positions; trl's unchunked generalized_jsd_loss peaks at ~15 full-size fp32 tensors for jsd,
~7 for a KL, gradient included (at 8k positions, 5 GB each). The backward redoes the forward's arithmetic
once per chunk and needs no collective (the all-reduced per-position sums are saved). Logits must be
finite: a ``-inf`` logit makes ``0 * inf``; leave vocabulary out with ``shared_vocab`` instead.

``token_logprobs`` is ``distill.student_log_probs`` at K = 1 after the temperature, not chunked: its peak
is 3 fp32 copies of the logits shard (measured, bf16 logits, forward and backward).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from omni_train.losses.distill import student_log_probs, tp_group

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


# ----------------------------------------------------------------------------- full-vocabulary divergence
def _kind(divergence: str, beta: float) -> str:
    """The divergence actually computed: "jsd" at its end points is a KL, as in trl."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd wants 0 <= beta <= 1, got {beta}")
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def _all_reduce(x: torch.Tensor, group, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd: the Function below writes its backward out, so the all-reduced
    per-position sums need no gradient path of their own."""
    if group is not None:
        torch.distributed.all_reduce(x, op=op, group=group)
    return x


def _rows(src: torch.Tensor, idx: torch.Tensor, columns: int, dtype: torch.dtype, temperature: float):
    """``src[idx, :columns] / T`` as a fresh [chunk, columns] tensor in ``dtype`` (never aliases ``src``)."""
    x = src[:, :columns].index_select(0, idx).to(dtype)
    return x.div_(temperature) if temperature != 1.0 else x


def _log_sum_exp(x: torch.Tensor, y: torch.Tensor, group) -> torch.Tensor:
    """Per-row log-sum-exp over the full vocabulary of two [chunk, V_local] shards: [2, chunk]."""
    if x.shape[-1]:
        top = torch.stack([x.amax(-1), y.amax(-1)])
    else:  # a rank holding none of the shared ids
        top = x.new_full((2, x.shape[0]), -math.inf)
    _all_reduce(top, group, torch.distributed.ReduceOp.MAX)
    sums = torch.stack([(x - top[0].unsqueeze(-1)).exp_().sum(-1), (y - top[1].unsqueeze(-1)).exp_().sum(-1)])
    return top + torch.log(_all_reduce(sums, group))


def _log_mixture(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """log m = log((1 - beta) p + beta q), with one temporary besides the result."""
    log_m = s + math.log1p(-beta)
    return torch.logaddexp(log_m, t + math.log(beta), out=log_m)


def _forward_chunk(x, y, kind: str, beta: float, group):
    """(value, lse_s, lse_t, aux) per row, each [chunk]; aux is the all-reduced sum backward needs.
    Overwrites x and y; at most 4 [chunk, V_local] tensors live (3 for the KLs)."""
    lse_s, lse_t = _log_sum_exp(x, y, group)
    s, t = x.sub_(lse_s.unsqueeze(-1)), y.sub_(lse_t.unsqueeze(-1))
    if kind == "forward_kl":
        q = torch.exp(t)
        value = _all_reduce(t.sub_(s).mul_(q).sum(-1), group)
        return value, lse_s, lse_t, value
    if kind == "reverse_kl":
        p = torch.exp(s)
        value = _all_reduce(s.sub_(t).mul_(p).sum(-1), group)
        return value, lse_s, lse_t, value
    log_m = _log_mixture(s, t, beta)
    p = torch.exp(s)
    kl_p = s.sub_(log_m).mul_(p).sum(-1)
    del p
    q = torch.exp(t)
    kl_q = t.sub_(log_m).mul_(q).sum(-1)
    kl_q, kl_p = _all_reduce(torch.stack([kl_q, kl_p]), group)
    return beta * kl_q + (1.0 - beta) * kl_p, lse_s, lse_t, kl_p


def _grad_chunk(x, y, lse_s, lse_t, aux, kind: str, beta: float) -> torch.Tensor:
    """d divergence / d (z / T) per row, [chunk, V_local] (module docstring). Overwrites x and y; at most
    4 [chunk, V_local] tensors live (3 for the KLs)."""
    s, t = x.sub_(lse_s.unsqueeze(-1)), y.sub_(lse_t.unsqueeze(-1))
    if kind == "forward_kl":
        return s.exp_().sub_(t.exp_())
    if kind == "reverse_kl":
        p = torch.exp(s)
        return s.sub_(t).sub_(aux.unsqueeze(-1)).mul_(p)
    log_m = _log_mixture(s, t, beta)
    p = torch.exp(s)
    return s.sub_(log_m).sub_(aux.unsqueeze(-1)).mul_(p).mul_(1.0 - beta)


class _FullVocabDivergence(torch.autograd.Function):
    """Per-position divergence of the rows ``idx`` of student / teacher [N, V] over their first ``columns``
    columns, chunk by chunk; backward writes the student's gradient chunk by chunk into one buffer."""

    @staticmethod
    def forward(ctx, student, teacher, idx, columns, kind, beta, temperature, chunk, dtype, group):
        stats = torch.empty(3, idx.numel(), dtype=dtype, device=student.device)  # lse_s, lse_t, aux
        value = torch.empty(idx.numel(), dtype=dtype, device=student.device)
        for start in range(0, idx.numel(), chunk):
            rows, part = idx[start:start + chunk], slice(start, start + chunk)
            value_part, lse_s, lse_t, aux = _forward_chunk(_rows(student, rows, columns, dtype, temperature),
                                                           _rows(teacher, rows, columns, dtype, temperature),
                                                           kind, beta, group)
            value[part], stats[:, part] = value_part, torch.stack((lse_s, lse_t, aux))
        ctx.save_for_backward(student, teacher, idx, stats)
        ctx.options = (columns, kind, beta, temperature, chunk, dtype)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        student, teacher, idx, stats = ctx.saved_tensors
        columns, kind, beta, temperature, chunk, dtype = ctx.options
        grad = torch.zeros_like(student)
        for start in range(0, idx.numel(), chunk):
            rows, part = idx[start:start + chunk], slice(start, start + chunk)
            g = _grad_chunk(_rows(student, rows, columns, dtype, temperature),
                            _rows(teacher, rows, columns, dtype, temperature), *stats[:, part], kind, beta)
            g.mul_((grad_value[part].to(dtype) / temperature).unsqueeze(-1))
            grad[:, :columns].index_copy_(0, rows, g.to(grad.dtype))
            del g  # not alive beside the next chunk's temporaries
        return grad, None, None, None, None, None, None, None, None, None


def _shared_columns(v_student: int, v_teacher: int, shared_vocab: Optional[int], group) -> int:
    """How many of this rank's columns take part: those holding ids < shared_vocab (all when None)."""
    if shared_vocab is None:
        if v_student != v_teacher:
            raise ValueError(f"student vocabulary {v_student} != teacher's {v_teacher} (per rank): pass shared_vocab")
        return v_student
    if group is None:
        if not 0 < shared_vocab <= min(v_student, v_teacher):
            raise ValueError(f"shared_vocab {shared_vocab} outside the vocabularies ({v_student}, {v_teacher})")
        return shared_vocab
    if v_student != v_teacher:
        raise ValueError(f"under tensor parallelism the teacher's logits must have the student's shard layout "
                         f"(V_local {v_student} != {v_teacher}): pad the smaller vocabulary to the other's size")
    if not 0 < shared_vocab <= v_student * torch.distributed.get_world_size(group):
        raise ValueError(f"shared_vocab {shared_vocab} outside the vocabulary "
                         f"({v_student} x {torch.distributed.get_world_size(group)} ranks)")
    return min(max(shared_vocab - torch.distributed.get_rank(group) * v_student, 0), v_student)


def full_vocab_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                          divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                          chunk_tokens: int = 1024, shared_vocab: Optional[int] = None,
                          group="auto") -> torch.Tensor:
    """Per-position divergence [B, L] between the student's and the teacher's next-token distributions
    (module docstring), 0 where ``mask`` [B, L] is False. Logits [B, L, V_local] are each rank's vocabulary
    shard (rank r holds ids [r V_local, (r+1) V_local)), the teacher's in the student's layout; no gradient
    reaches the teacher. Computed in fp32 (fp64 if either input is), ``chunk_tokens`` positions at a time.
    ``shared_vocab``: only ids below it take part, both distributions renormalised over them. Every
    tensor-parallel rank passes the same ``mask`` (the chunks' all-reduces must pair up)."""
    kind = _kind(divergence, beta)
    group = tp_group() if group == "auto" else group
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)} and "
                         f"mask {tuple(mask.shape)} must agree on [B, L]")
    if chunk_tokens < 1 or temperature <= 0:
        raise ValueError(f"chunk_tokens must be >= 1 and temperature > 0, got {chunk_tokens}, {temperature}")
    columns = _shared_columns(student_logits.shape[-1], teacher_logits.shape[-1], shared_vocab, group)
    dtype = _compute_dtype(student_logits, teacher_logits)
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    value = _FullVocabDivergence.apply(student_logits.reshape(-1, student_logits.shape[-1]),
                                       teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]), idx,
                                       columns, kind, float(beta), float(temperature), int(chunk_tokens), dtype,
                                       group)
    out = torch.zeros(mask.numel(), dtype=dtype, device=value.device).index_put((idx,), value)
    return out.view(mask.shape)


# ------------------------------------------------------------------------------------- sampled-token form
def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, group="auto") -> torch.Tensor:
    """log softmax(logits / T)[ids], [B, L], over the full vocabulary; logits [B, L, V_local] (this rank's
    shard), ids [B, L] global ids. fp32 (fp64 kept); differentiable through the logits. An id outside the
    vocabulary (a label's -100) gives a finite, meaningless value: mask it."""
    group = tp_group() if group == "auto" else group
    x = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    return student_log_probs(x, ids.unsqueeze(-1), group).squeeze(-1)


def sampled_token_advantage(student_token_logprobs: torch.Tensor,
                            teacher_token_logprobs: torch.Tensor) -> torch.Tensor:
    """A = teacher_logp - student_logp of the sampled tokens, detached: minus the sampled reverse-KL estimate."""
    return (teacher_token_logprobs - student_token_logprobs).detach()


def sampled_token_loss(student_token_logprobs: torch.Tensor, rollout_token_logprobs: torch.Tensor,
                       advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token loss -A * exp(student_logp - sg[rollout_logp]); 0, with no gradient, where ``mask`` is False."""
    log_ratio = student_token_logprobs - rollout_token_logprobs.detach()
    log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))  # no exp() of padding's garbage
    loss = -advantages.detach() * torch.exp(log_ratio)
    return torch.where(mask, loss, torch.zeros_like(loss))
