"""One optimizer update in which the per-token loss scaling and the gradient clipping cost no pass of their own.

megatron's step scales the gradient buffers by ``1 / target tokens`` (finalize_model_grads), computes the
global norm (one read, then a host sync for the norm as a float), multiplies every gradient by the clip
coefficient, and only then runs AdamW: at 3B bf16 parameters, two extra read-and-write passes over 6 GB
(~9 ms a step on an H100) plus the sync. Both factors are scalars, and a fused AdamW kernel (ours in
parallel/adamw.py, or torch's) divides each gradient by a ``grad_scale`` tensor inside its one pass (the
hook torch's AMP GradScaler uses). So here:

- ``finalize_grads(..., pending=GradScaling)`` does megatron's reductions but only records the token count;
- ``grad_norm`` is the norm of the true gradient (buffers / tokens) as a device tensor, over the same
  tensors and process groups megatron's clipping uses;
- ``apply_update`` hands AdamW ``grad_scale = tokens * max(1, norm / clip_grad)``, megatron's clipping rule
  (coefficient ``clip_grad / (norm + 1e-6)`` when below 1), computed on the device.

The host waits for nothing here: the token count stays on the device, and a non-finite step is skipped by
the kernel itself (``skip``). The trainer reads the norm on the host once, with the step's other figures,
while the update runs (loops/supervised.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel.utils import get_pp_last_rank

from omni_train.kernels.compiled import fused
from omni_train.parallel import adamw
from omni_train.parallel.adamw import CompiledAdamW
from omni_train.parallel.wrap import torch_optimizers


@dataclass
class GradScaling:
    """What the gradient buffers still have to be divided by: the step's number of target tokens (at
    least 1), a device tensor that the host never waits for, or a number."""

    tokens: Union[torch.Tensor, float] = 1.0


def finalize_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False, *,
                   pending: GradScaling) -> None:
    """megatron's ``finalize_model_grads`` (gradient all-reduces, shared embeddings, expert bias) without
    its per-token scaling, which is left to ``apply_update``: ``pending`` gets the step's number of target
    tokens as a device tensor. Same groups as megatron: the count comes from the last pipeline stage and is
    summed over data x context parallel ranks."""
    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    if num_tokens is None:
        pending.tokens = 1.0
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    dist.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
    dist.all_reduce(num_tokens, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    pending.tokens = num_tokens.float().clamp(min=1.0)


def _stepping(optimizer) -> Iterator:
    """The megatron optimizers that own parameters (a ChainedOptimizer's parts, or itself)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not getattr(part, "is_stub_optimizer", False) and part.get_parameters():
            yield part


def grad_norm(optimizer, scaling: GradScaling) -> torch.Tensor:
    """Global L2 norm (fp32, 0-dim, on the grads' device) of the gradients divided by ``scaling.tokens``.

    Call after ``optimizer.prepare_grads()`` (which points the parameters' ``grad`` at their main grads).
    Same tensors as megatron's clipping (``get_main_grads_for_grad_norm``: no shared or TP-duplicate
    parameters) and the same reduction group per optimizer (``get_grad_stats_parallel_group``)."""
    squares: List[torch.Tensor] = []
    for part in _stepping(optimizer):
        grads = part.get_main_grads_for_grad_norm()
        local = _sum_of_squares(grads) if grads else torch.zeros((), dtype=torch.float32, device=_device(part))
        group = part.get_grad_stats_parallel_group()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(local, group=group)
        squares.append(local)
    if not squares:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack(squares).sum().sqrt() / scaling.tokens


def square_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a flat tensor, accumulated in fp32."""
    return x.float().square().sum()


def _sum_of_squares(grads: List[torch.Tensor]) -> torch.Tensor:
    """Sum of the squares of all ``grads`` (fp32, 0-dim): each large one as a compiled (on CUDA) reduction
    over its flat view, the rest in torch's multi-tensor norm kernel. On an H100 a 400M-element bf16
    gradient takes 0.37 ms (2.2 TB/s) this way against 0.43 ms in torch's kernel
    (benchmarks/kernel_bandwidth.py)."""
    large, small = [], []
    for g in grads:
        (large if g.numel() >= adamw.COMPILED_MIN_NUMEL and g.is_contiguous() else small).append(g)
    parts = [fused(square_sum, g.device, dynamic=True, tuned=True)(g.view(-1)) for g in large]
    if small:
        parts.append(torch.stack(torch._foreach_norm(small, 2.0, dtype=torch.float32)).square().sum())
    return torch.stack(parts).sum()


def _device(part) -> torch.device:
    return part.get_parameters()[0].device


def apply_update(optimizer, norm: torch.Tensor, scaling: GradScaling, clip_grad: float,
                 skip: Optional[torch.Tensor] = None) -> None:
    """AdamW on ``grad / scaling.tokens``, clipped to total norm ``clip_grad`` (0: no clipping), with the
    division done inside the fused AdamW kernel. Then megatron's own post-step work (copy of fp32 main
    params into the bf16 model, distributed-optimizer all-gather).

    ``skip``, a device flag (1.0: skip), is decided on the device: the fused kernel then leaves parameters,
    moments and step counts untouched (its ``found_inf``), so the host need not wait for the flag before
    launching the update."""
    divisor = torch.as_tensor(scaling.tokens, dtype=torch.float32).to(norm.device).reshape(())
    if clip_grad > 0:
        divisor = divisor * torch.clamp((norm + 1.0e-6) / clip_grad, min=1.0)
    found_inf = None if skip is None else skip.to(device=norm.device, dtype=torch.float32).reshape(())
    inners = list(torch_optimizers(optimizer))
    for inner in inners:
        if not (isinstance(inner, CompiledAdamW) or all(group.get("fused") for group in inner.param_groups)):
            raise TypeError(f"apply_update needs a fused AdamW kernel (wrap.use_fused_adamw), got "
                            f"{type(inner).__name__}")
        inner.grad_scale, inner.found_inf = divisor, found_inf
    try:
        optimizer.step_with_ready_grads()
    finally:
        for inner in inners:
            inner.__dict__.pop("grad_scale", None)
            inner.__dict__.pop("found_inf", None)
