"""What megatron-core 0.16.1 needs when Transformer Engine is not installed (on CPU and on GPU alike).

Not a CPU accommodation: the GPU machines' image has no Transformer Engine either (nor Apex).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from omni_train.compat.registry import Patch


def foreach_l2_norm(chunk_size: int, noop_flag, tensor_lists: Sequence[List[torch.Tensor]], per_tensor: bool,
                    *args) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Drop-in for Apex's ``multi_tensor_l2norm`` (as megatron calls it through ``multi_tensor_applier``):
    the fp32 L2 norm of all tensors together, as a [1] tensor on their device.

    megatron's own fallback computes one norm per tensor, gathers them into a host tensor (a device sync
    per parameter) and returns a fresh CUDA tensor: ~1,000 kernel launches and as many syncs per step at
    the size of the 30B Thinker. ``torch._foreach_norm`` does it in a few multi-tensor kernels."""
    tensors = tensor_lists[0]
    norms = torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


def foreach_scale(chunk_size: int, noop_flag, tensor_lists: Sequence[List[torch.Tensor]], scale: float) -> None:
    """Drop-in for Apex's ``multi_tensor_scale``: ``dst = src * scale`` for each pair, in multi-tensor
    kernels (megatron's fallback runs one multiply and one copy per tensor)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, src)  # casts, e.g. fp32 main params into bf16 model params
        if scale != 1.0:
            torch._foreach_mul_(dst, scale)


def clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    """megatron's ``clip_grad_by_total_norm_fp32`` for fp32 or bf16 grads on any device: scale every grad
    by max_norm / total_norm when that is below 1, in one multi-tensor multiply. (Upstream asserts the grads
    are ``torch.cuda.FloatTensor``, which rules out the CPU and bf16 grads without fp32 main params.)"""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [g.detach() for g in (getattr(p, attr, None) for p in parameters) if g is not None]
    for grad in grads:
        if grad.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gradient clipping expects fp32 or bf16 grads, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def bind_router_gemm() -> None:
    """Bind ``moe_utils.te_general_gemm`` to None where TE did not bind it (a no-op with TE)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def use_foreach_multi_tensor_ops() -> None:
    """Point megatron's optimizer and grad-norm at ``foreach_l2_norm`` / ``foreach_scale`` where megatron
    chose its own per-tensor fallback (an installed Apex or TE is left in place)."""
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl.__module__ == "megatron.core.utils":
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl.__module__ == "megatron.core.utils":
            module.multi_tensor_scale_impl = foreach_scale


def use_any_device_grad_clipping() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm


_MEGATRON = dict(library="megatron-core", written_for=("0.16.1",))

PATCHES = [
    Patch("router_gemm_without_te", targets=("megatron.core.transformer.moe.moe_utils.te_general_gemm",),
          why="RouterGatingLinearFunction reads the module global te_general_gemm, bound only when Transformer "
              "Engine imports: every MoE router forward raises NameError without it; None selects megatron's "
              "own torch.mm branch",
          apply=bind_router_gemm, **_MEGATRON),
    Patch("foreach_multi_tensor_ops",
          targets=("megatron.core.optimizer.clip_grads.l2_norm_impl",
                   "megatron.core.optimizer.clip_grads.multi_tensor_scale_impl",
                   "megatron.core.optimizer.optimizer.multi_tensor_scale_impl"),
          why="without Apex or TE megatron's fallbacks loop over tensors with a host sync per parameter "
              "(~1,000 launches and syncs a step at 30B); torch._foreach_* does it in a few kernels",
          apply=use_foreach_multi_tensor_ops, **_MEGATRON),
    Patch("grad_clipping_any_device",
          targets=("megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
                   "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32"),
          why="upstream asserts the grads are torch.cuda.FloatTensor, which rules out the CPU and bf16 grads "
              "without fp32 main params; one multi-tensor multiply instead",
          apply=use_any_device_grad_clipping, **_MEGATRON),
]
