"""Per-token cross-entropy over [tokens, vocab] logits that never holds an fp32 copy of the logits.

At Qwen3-Omni's 152k vocabulary and 8k tokens per micro-batch the bf16 logits are 2.5 GB; every pass over
an fp32 copy of them costs ~1.5 ms on an H100 and 5 GB of memory. torch's ``F.cross_entropy`` on upcast
logits makes about six such passes (upcast, log-softmax, NLL; in backward the log-softmax gradient and the
downcast) and keeps the fp32 log-probabilities for backward. Here:

- forward: one pass reads the logits and writes each row's log-sum-exp (fp32) and loss;
- backward: one pass reads the logits again and writes their gradient in the logits' dtype,
  ``grad_loss * (softmax - onehot)``, computed in fp32 registers;
- saved for backward: the logits themselves (alive anyway as the output layer's result) and one fp32
  number per row.

On CUDA both passes are ``torch.compile``d (inductor fuses each into one Triton kernel); elsewhere the same
functions run eagerly over row chunks that bound their fp32 temporaries. Targets below 0 (``ignore_index``
-100, as torch's) get loss 0 and no gradient.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from omni_train.kernels.compiled import fused

# eager path: fp32 temporaries of at most this many bytes per chunk of rows
_EAGER_CHUNK_BYTES = 1 << 28


def _lse_and_loss(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
    return lse, torch.where(target >= 0, lse - picked, 0.0)


def _logits_grad(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                 grad_loss: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    probs = torch.exp(x - lse.unsqueeze(1))
    columns = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    probs = torch.where(columns == target.unsqueeze(1), probs - 1.0, probs)
    scale = torch.where(target >= 0, grad_loss.float(), 0.0)
    return (probs * scale.unsqueeze(1)).to(logits.dtype)


def _kernels(device: torch.device) -> Tuple[Callable, Callable, bool]:
    """(forward, backward, whole): compiled and applied to all rows at once on CUDA when Triton is there;
    eager over row chunks otherwise."""
    forward = fused(_lse_and_loss, device)
    return forward, fused(_logits_grad, device), forward is not _lse_and_loss


def _row_chunks(rows: int, vocab: int, whole: bool):
    step = rows if whole else max(1, _EAGER_CHUNK_BYTES // (16 * vocab))  # ~4 fp32 temporaries per element
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        forward, _, whole = _kernels(logits.device)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        loss = torch.empty_like(lse)
        for start, end in _row_chunks(logits.shape[0], logits.shape[1], whole):
            lse[start:end], loss[start:end] = forward(logits[start:end], target[start:end])
        ctx.save_for_backward(logits, target, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        _, backward, whole = _kernels(logits.device)
        if whole:
            return backward(logits, lse, target, grad_loss.contiguous()), None
        grad = torch.empty_like(logits)
        for start, end in _row_chunks(logits.shape[0], logits.shape[1], whole):
            grad[start:end] = backward(logits[start:end], lse[start:end], target[start:end], grad_loss[start:end])
        return grad, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row loss ``logsumexp(logits) - logits[target]`` (fp32, [rows]) of ``logits`` [rows, vocab] (any
    float dtype, read as fp32) and ``target`` [rows] (int64; < 0: ignored, loss 0)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy wants logits [rows, vocab] and target [rows], got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    return _CrossEntropy.apply(logits.contiguous(), target.contiguous())
