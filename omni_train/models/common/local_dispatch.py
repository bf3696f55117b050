"""Token dispatch for an MoE layer whose experts all live on this rank (expert parallel = expert tensor
parallel = 1), without communication and without host synchronisation.

megatron-core's alltoall dispatcher, run without Transformer Engine's fused permutation, stops the host
three times per MoE layer and step: ``masked_select`` for the permutation indices and for the routing
probabilities (their sizes are data-dependent) and a copy of the per-expert token counts to the host. Each
stop drains the GPU's queue and leaves it idle while Python launches the next kernels. With every expert
local and dropless top-k routing none of those sizes is unknown: every token goes to exactly k experts,
so the permuted batch has ``tokens * k`` rows, and the grouped-GEMM experts take the per-expert counts as a
device tensor.

The permutation is megatron's (rows ordered by expert, then by token), so the experts see the same rows in
the same order; the combine sums each token's k weighted expert outputs back into place. Both directions,
forward and backward, are row gathers plus a sum over the k copies: no scatter-add, whose atomics cost
~1 ms per call on a [tokens * k, hidden] tensor at Qwen3-Omni width.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from omni_train.kernels.compiled import fused


class _Dispatch(torch.autograd.Function):
    """[T, H] -> [T*k, H]: row ``p`` is token ``token_of[p]``. Backward: the k rows of each token, found
    through ``inverse`` (token-major position -> permuted row), summed."""

    @staticmethod
    def forward(ctx, hidden, token_of, inverse, topk):
        ctx.save_for_backward(inverse)
        ctx.topk = topk
        return hidden.index_select(0, token_of)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _sum_copies(grad, inverse, ctx.topk), None, None, None


class _Combine(torch.autograd.Function):
    """[T*k, H] -> [T, H]: each token's k rows summed. Backward: each row gets its token's gradient."""

    @staticmethod
    def forward(ctx, rows, token_of, inverse, topk):
        ctx.save_for_backward(token_of)
        return _sum_copies(rows, inverse, topk)

    @staticmethod
    def backward(ctx, grad):
        (token_of,) = ctx.saved_tensors
        return grad.index_select(0, token_of), None, None, None


def _sum_copies(rows: torch.Tensor, inverse: torch.Tensor, topk: int) -> torch.Tensor:
    """On CUDA one compiled kernel that gathers and sums (the [T*k, H] gathered rows are never written):
    0.145 ms against 0.314 ms eager at [65536, 2048] bf16 on an H100 with its block sizes tuned, 0.352 ms
    with inductor's defaults (benchmarks/kernel_bandwidth.py)."""
    return fused(sum_copies, rows.device, dynamic=False, tuned=True)(rows, inverse, topk)


def sum_copies(rows: torch.Tensor, inverse: torch.Tensor, topk: int) -> torch.Tensor:
    """Token t's k rows (``rows[inverse[t*k : (t+1)*k]]``) summed: [T*k, H] -> [T, H]."""
    return rows.index_select(0, inverse).view(-1, topk, rows.shape[-1]).sum(dim=1)


class LocalTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """MoEAlltoAllTokenDispatcher's interface, for ep = expert tp = 1 and dropless top-k routing."""

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, self.hidden_shape[-1])
        num_tokens, topk = routing_map.shape[0], self.config.moe_router_topk
        # each token's k experts (dropless top-k: exactly k per row), then rows sorted by (expert, token)
        experts = torch.topk(routing_map.to(torch.uint8), topk, dim=1).indices.reshape(-1)
        tokens = torch.arange(num_tokens, device=hidden.device).repeat_interleave(topk)
        order = torch.argsort(experts * num_tokens + tokens)  # permuted row -> token-major position
        self.sorted_tokens = tokens[order]
        self.inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        self.tokens_per_expert = routing_map.sum(dim=0)
        permuted_probs = probs[self.sorted_tokens, experts[order]]
        return _Dispatch.apply(hidden, self.sorted_tokens, self.inverse, topk), permuted_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Sum each token's expert outputs (already weighted by their routing probabilities)."""
        out = _Combine.apply(hidden_states, self.sorted_tokens, self.inverse, self.config.moe_router_topk)
        self.sorted_tokens = self.inverse = None
        return out.view(self.hidden_shape)


class OmniMoELayer(MoELayer):
    """megatron's MoELayer; with every expert on this rank and dropless routing, its tokens go through
    LocalTokenDispatcher instead of the alltoall dispatcher."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:  # as MoELayer itself resolves it
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection)
        dispatcher = self.token_dispatcher
        local = (isinstance(dispatcher, MoEAlltoAllTokenDispatcher) and dispatcher.ep_size == 1
                 and dispatcher.tp_size == 1 and config.moe_expert_capacity_factor is None
                 and not config.moe_router_padding_for_quantization and not config.moe_permute_fusion)
        if local:
            self.token_dispatcher = LocalTokenDispatcher(self.num_local_experts, self.local_expert_indices,
                                                         config=config, pg_collection=pg_collection)
