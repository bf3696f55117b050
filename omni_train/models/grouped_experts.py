"""Routed experts through one grouped GEMM per projection (torch._grouped_mm), on CPU and GPU alike.

megatron-core's grouped-GEMM experts need Transformer Engine or the ``grouped_gemm`` package, neither of
which the machines here have; its fallback, SequentialMLP, runs every expert as its own pair of matmuls
(at 128 experts: ~3,000 GEMM launches per layer per step, each too small to fill a GPU). GroupedExperts
keeps SequentialMLP's modules, parameters, names and checkpoint layout (``local_experts.{i}.linear_fc1``,
``linear_fc2``: checkpoints, the HF bridge and parameter freezing see no difference) and replaces only its
forward: the local experts' weights are stacked for the kernel and every expert's tokens go through one
``torch._grouped_mm`` call per projection, forward and backward.

The per-expert weights of one projection are built as consecutive slices of one storage, so the kernel
reads them as one [experts, out, in] tensor without a copy. Whatever later gives a parameter storage of
its own (megatron's distributed optimizer moves every parameter into its contiguous buffer; ``to_empty``)
costs a stack per pass instead: the forward stacks, multiplies and drops the stack, the backward stacks
again. Either way the autograd graph keeps only the per-expert parameters themselves, so memory is what
SequentialMLP keeps (its inputs), not a second copy of every expert's weights per layer.

Numerics match SequentialMLP's (same activation and probability weighting, same dtypes); only the GEMM
accumulation order may differ.
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

# torch._grouped_mm needs every row stride to be a multiple of 16 bytes.
_ALIGN_BYTES = 16


def grouped_mm_supported(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether ``torch._grouped_mm`` takes these shapes: rows of the input, of the weights and of the
    output (and of their gradients) aligned to 16 bytes, and a dtype its kernels have on this device."""
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    n, k = weights[0].shape
    per_row = _ALIGN_BYTES // x.element_size()
    return n % per_row == 0 and k % per_row == 0


def stacked(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """[experts, out, in]: a view when the weights are consecutive slices of one storage, else a copy.

    Checks the first, a middle and the last weight (a per-weight check costs ~1 ms of host time per call at
    128 experts): whatever re-homes parameters (megatron's distributed optimizer, ``to_empty``, ``.to``)
    re-homes all of them."""
    first, count = weights[0], len(weights)
    numel, storage = first.numel(), first.untyped_storage().data_ptr()

    def in_place(i: int) -> bool:
        w = weights[i]
        return (w.untyped_storage().data_ptr() == storage and w.is_contiguous() and w.shape == first.shape
                and w.storage_offset() == first.storage_offset() + i * numel)

    if all(in_place(i) for i in {0, count // 2, count - 1}):
        return first.as_strided((count, *first.shape), (numel, *first.stride()), first.storage_offset())
    return torch.stack(weights)


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of expert e] = x[rows of expert e] @ W_e^T`` for per-expert weights ``W_e`` of shape
    [out, in], given as separate tensors; ``offsets`` are the cumulative row counts (int32, on x's
    device). Neither pass keeps the stacked weights."""

    @staticmethod
    def forward(ctx, x, offsets, *weights):
        ctx.save_for_backward(x, offsets, *weights)
        return torch._grouped_mm(x, stacked(weights).transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, offsets, *weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_out, stacked(weights), offs=offsets)
        if any(ctx.needs_input_grad[2:]):
            # dW_e = dy_e^T x_e: the grouped dimension is the rows (tokens) of both operands
            grad_w = torch._grouped_mm(grad_out.t(), x, offs=offsets).unbind(0)
            _accumulate_into_main_grads(weights, grad_w)
        else:
            grad_w = (None,) * len(weights)
        return (grad_x, None, *grad_w)


def _accumulate_into_main_grads(weights, grads) -> None:
    """Under megatron's DDP every parameter has a ``main_grad`` (its slice of the contiguous grad buffer)
    and DDP's per-parameter hook adds ``param.grad`` into it, one kernel per expert weight. Add all of them
    in one multi-tensor kernel instead and flag them as megatron's fused weight-gradient GEMMs do
    (``grad_added_to_main_grad``): the hook then only drops the returned grads (and, with overlapped
    reduction, marks the parameter ready)."""
    if not all(hasattr(w, "main_grad") and hasattr(w, "grad_added_to_main_grad") for w in weights):
        return
    torch._foreach_add_([w.main_grad for w in weights], list(grads))
    for w in weights:
        w.grad_added_to_main_grad = True


def grouped_linear(x: torch.Tensor, tokens_per_expert: torch.Tensor,
                   weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each expert's rows of ``x`` (consecutive, ``tokens_per_expert`` of them) times its weight's transpose.

    One grouped GEMM where the kernel takes the shapes (:func:`grouped_mm_supported`), else one matmul
    per expert (tiny or unaligned test sizes, fp32 on GPU)."""
    if not grouped_mm_supported(x, weights):
        pieces = x.split(tokens_per_expert.tolist())
        return torch.cat([piece @ w.t() for piece, w in zip(pieces, weights)])
    offsets = torch.cumsum(tokens_per_expert.to(device=x.device), 0, dtype=torch.int32)
    return _GroupedLinear.apply(x, offsets, *weights)


class GroupedExperts(SequentialMLP):
    """SequentialMLP's experts (and parameters, and checkpoint format), computed with grouped GEMMs."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        cfg = self.config
        if cfg.add_bias_linear or not cfg.gated_linear_unit or cfg.fp8 or cfg.fp4:
            raise ValueError("GroupedExperts computes bias-free gated (SwiGLU-style) experts in bf16/fp32; "
                             "use model.experts_impl=sequential for this configuration")
        if cfg.moe_apply_probs_on_input:
            raise ValueError("GroupedExperts does not support moe_apply_probs_on_input")
        for projection in ("linear_fc1", "linear_fc2"):
            self._share_storage(projection)

    @torch.no_grad()
    def _share_storage(self, projection: str) -> None:
        """Re-create the experts' ``projection`` weights as consecutive slices of one storage (same values,
        same megatron attributes), so that :func:`stacked` is a view."""
        layers = [getattr(expert, projection) for expert in self.local_experts]
        storage = torch.stack([layer.weight for layer in layers])
        for i, layer in enumerate(layers):
            old = layer.weight
            new = torch.nn.Parameter(storage[i], requires_grad=old.requires_grad)
            for name, value in vars(old).items():  # tensor_model_parallel, partition_dim, allreduce, ...
                setattr(new, name, value)
            layer.weight = new

    def _glu(self, x: torch.Tensor) -> torch.Tensor:
        gate, linear = torch.chunk(x, 2, dim=-1)
        clamp = self.config.activation_func_clamp_value
        if clamp is not None:
            gate = gate.clamp(min=None, max=clamp)
            linear = linear.clamp(min=-clamp, max=clamp)
        return self.config.activation_func(gate) * (linear + self.config.glu_linear_offset)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        fc1 = [expert.linear_fc1.weight for expert in self.local_experts]
        fc2 = [expert.linear_fc2.weight for expert in self.local_experts]
        intermediate = self._glu(grouped_linear(x, tokens_per_expert, fc1))
        # as megatron's MLP: routing probability applied after the activation, back in the input dtype
        intermediate = (intermediate * permuted_probs.unsqueeze(-1)).to(x.dtype)
        return grouped_linear(intermediate, tokens_per_expert, fc2), None

