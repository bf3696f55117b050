"""models.common.cross_entropy against torch's F.cross_entropy (value and gradient), eager and compiled."""

import pytest
import torch
import torch.nn.functional as F

import omni_train.models.common.cross_entropy as ce
from omni_train.kernels.compiled import compiled


def _case(dtype, rows=37, vocab=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[[3, 11]] = -100  # ignored rows
    weights = torch.rand(rows, generator=g)
    return logits, target, weights


def _reference(logits, target, weights):
    ref_logits = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(ref_logits.float(), target, reduction="none")
    (grad,) = torch.autograd.grad((loss * weights).sum(), ref_logits)
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_torch_cross_entropy_over_chunks(dtype, monkeypatch):
    monkeypatch.setattr(ce, "_EAGER_CHUNK_BYTES", 16 * 301 * 8)  # 8 rows per chunk: 5 chunks, the last short
    logits, target, weights = _case(dtype)
    loss = ce.cross_entropy(logits, target)
    (grad,) = torch.autograd.grad((loss * weights).sum(), logits)
    ref_loss, ref_grad = _reference(logits, target, weights)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert loss[3] == 0 and loss[11] == 0 and not grad[[3, 11]].any()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    else:  # ours rounds the fp32 gradient once to bf16, as torch's downcast does
        torch.testing.assert_close(grad, ref_grad, rtol=1e-2, atol=1e-4)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"logits \[rows, vocab\] and target \[rows\]"):
        ce.cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long))


def test_compiled_kernels_equal_eager(inductor_cpu):
    """The functions CUDA runs through torch.compile, compiled here by inductor's CPU backend: same values
    as their eager run (the code path the GPU takes, minus Triton)."""
    logits, target, weights = _case(torch.bfloat16, rows=16, vocab=512, seed=1)
    logits = logits.detach()
    lse, loss = ce._lse_and_loss(logits, target)
    c_lse, c_loss = compiled(ce._lse_and_loss)(logits, target)
    torch.testing.assert_close(c_lse, lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-5)
    grad = ce._logits_grad(logits, lse, target, weights)
    c_grad = compiled(ce._logits_grad)(logits, lse, target, weights)
    torch.testing.assert_close(c_grad.float(), grad.float(), rtol=1e-2, atol=1e-5)
