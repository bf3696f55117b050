"""Routed experts as two stacked weights per layer, computed with one grouped GEMM per projection
(torch._grouped_mm), on CPU and GPU alike; checkpoints keep megatron's per-expert layout.

megatron-core's grouped-GEMM experts need Transformer Engine or the ``grouped_gemm`` package, neither of
which the machines here have; its fallback, SequentialMLP, runs every expert as its own pair of matmuls
(at 128 experts: ~3,000 GEMM launches per layer per step, each too small to fill a GPU) and trains 256
separate weight tensors per layer, each with its own gradient hook, optimizer bookkeeping and norm: at
Qwen3-Omni's 128 experts, per-parameter host work that left the GPU idle for a fifth of the step.

GroupedExperts is built as SequentialMLP (same modules, same initialisation), then moves the experts'
weights into two parameters of this module:

    linear_fc1_weight  [local experts, 2 * ffn / tp, hidden]   (each expert's [gate; up] rows)
    linear_fc2_weight  [local experts, hidden, ffn / tp]

so a layer trains 2 tensors instead of 2 * experts. Everything that leaves the process still sees one
tensor per expert, exactly as SequentialMLP writes them: ``sharded_state_dict`` wraps each stacked weight
in a ShardedTensorFactory that expands into SequentialMLP's per-expert entries (same keys, offsets and
SwiGLU split; optimizer state follows the same factory), so dist checkpoints, the HF import/export and
resharding over expert / tensor parallel sizes are unchanged; ``load_state_dict`` also takes a
SequentialMLP state dict (per-expert keys).

Numerics match SequentialMLP's (same activation and probability weighting, same dtypes); only the GEMM
accumulation order may differ.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Dict, List, Sequence

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.transformer.moe.experts import SequentialMLP

from omni_train.kernels.compiled import fused

# torch._grouped_mm needs every row stride to be a multiple of 16 bytes.
_ALIGN_BYTES = 16
PROJECTIONS = ("linear_fc1", "linear_fc2")


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these shapes (``weight``: [experts, out, in]): rows of the input,
    the weights and the output (and their gradients) aligned to 16 bytes, and a dtype its kernels have on
    this device."""
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    per_row = _ALIGN_BYTES // x.element_size()
    return weight.shape[1] % per_row == 0 and weight.shape[2] % per_row == 0


def grouped_linear(x: torch.Tensor, tokens_per_expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each expert's rows of ``x`` (consecutive, ``tokens_per_expert`` of them) times its weight's transpose;
    ``weight`` is [experts, out, in]. One grouped GEMM (torch's autograd gives both gradients as grouped
    GEMMs too) where the kernel takes the shapes, else one matmul per expert (tiny or unaligned test sizes,
    fp32 on GPU)."""
    if not grouped_mm_supported(x, weight):
        pieces = x.split(tokens_per_expert.tolist())
        return torch.cat([piece @ w.t() for piece, w in zip(pieces, weight.unbind(0))])
    offsets = torch.cumsum(tokens_per_expert.to(device=x.device), 0, dtype=torch.int32)
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)


def weighted_glu(x: torch.Tensor, probs: torch.Tensor, activation, clamp, linear_offset) -> torch.Tensor:
    """SwiGLU-style gating of the first projection's output ``x`` ([rows, 2 * ffn]: gate, then linear),
    times each row's routing probability, in ``x``'s dtype; megatron's SequentialMLP computes the same."""
    gate, linear = torch.chunk(x, 2, dim=-1)
    if clamp is not None:
        gate = gate.clamp(min=None, max=clamp)
        linear = linear.clamp(min=-clamp, max=clamp)
    intermediate = activation(gate) * (linear + linear_offset)
    return (intermediate * probs.unsqueeze(-1)).to(x.dtype)


def stacked_name(projection: str) -> str:
    return f"{projection}_weight"


class GroupedExperts(SequentialMLP):
    """SequentialMLP's experts (and checkpoint format) with stacked weights and grouped GEMMs."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        cfg = self.config
        if cfg.add_bias_linear or not cfg.gated_linear_unit or cfg.fp8 or cfg.fp4:
            raise ValueError("GroupedExperts computes bias-free gated (SwiGLU-style) experts in bf16/fp32; "
                             "use model.thinker.experts_impl=sequential for this configuration")
        if cfg.moe_apply_probs_on_input:
            raise ValueError("GroupedExperts does not support moe_apply_probs_on_input")
        for projection in PROJECTIONS:
            self._stack(projection)

    @torch.no_grad()
    def _stack(self, projection: str) -> None:
        """Move the experts' ``projection`` weights into one [experts, out, in] parameter of this module,
        with megatron's attributes (the tensor-parallel partition dim shifted past the expert axis)."""
        layers = [getattr(expert, projection) for expert in self.local_experts]
        first = layers[0].weight
        stack = torch.nn.Parameter(torch.stack([layer.weight for layer in layers]),
                                   requires_grad=first.requires_grad)
        for name, value in vars(first).items():  # tensor_model_parallel, partition_dim, allreduce, ...
            setattr(stack, name, value)
        if hasattr(first, "partition_dim"):
            stack.partition_dim = first.partition_dim + 1
        for layer in layers:
            del layer._parameters["weight"]
        self.register_parameter(stacked_name(projection), stack)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        cfg = self.config
        glu = fused(weighted_glu, x.device)  # one Triton kernel forward and one backward on CUDA
        intermediate = glu(grouped_linear(x, tokens_per_expert, self.linear_fc1_weight), permuted_probs,
                           cfg.activation_func, cfg.activation_func_clamp_value, cfg.glu_linear_offset)
        return grouped_linear(intermediate, tokens_per_expert, self.linear_fc2_weight), None

    @contextlib.contextmanager
    def _per_expert_weights(self):
        """Give every expert's linear layers their slice of the stacked weights as ``weight`` for the
        duration (what SequentialMLP's own checkpoint code reads)."""
        try:
            for projection in PROJECTIONS:
                stack = getattr(self, stacked_name(projection))
                for i, expert in enumerate(self.local_experts):
                    getattr(expert, projection)._parameters["weight"] = stack[i]
            yield
        finally:
            for expert in self.local_experts:
                for projection in PROJECTIONS:
                    getattr(expert, projection)._parameters.pop("weight", None)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        with self._per_expert_weights():
            legacy = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        out = {}
        for projection in PROJECTIONS:
            entries = [legacy.pop(f"{prefix}local_experts.{i}.{projection}.weight")
                       for i in range(self.num_local_experts)]
            out[f"{prefix}{stacked_name(projection)}"] = _per_expert_factory(
                entries, getattr(self, stacked_name(projection)))
        out.update(legacy)  # the experts' (empty) extra states
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also takes SequentialMLP's state dict: per-expert weights are stacked into ours."""
        for projection in PROJECTIONS:
            keys = [f"{prefix}local_experts.{i}.{projection}.weight" for i in range(self.num_local_experts)]
            if all(key in state_dict for key in keys):
                pieces = [state_dict.pop(key) for key in keys]
                state_dict.setdefault(f"{prefix}{stacked_name(projection)}", torch.stack(pieces))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _per_expert_factory(entries: List, stack: torch.Tensor) -> ShardedTensorFactory:
    """A factory over ``stack`` (or any tensor of its shape, e.g. its Adam moments) that builds the given
    per-expert checkpoint entries (ShardedTensors, or SwiGLU factories) on its slices, and stacks them back
    when loading."""
    first = entries[0]

    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError("stacked expert weights with a flattened (fully sharded) layout")
        built: Dict[str, object] = {}
        for i, entry in enumerate(entries):
            if isinstance(entry, ShardedTensorFactory):
                built[str(i)] = replace(entry, key=key, data=data[i], replica_id=replica_id).build()
            else:  # the data may be an optimizer moment of another dtype than the weight
                built[str(i)] = replace(entry, key=key, data=data[i], replica_id=replica_id, dtype=data.dtype)
        return built

    def merge(loaded: Dict[str, object]) -> torch.Tensor:
        pieces: Sequence[torch.Tensor] = [
            entry.merge_fn(loaded[str(i)]) if isinstance(entry, ShardedTensorFactory) else loaded[str(i)]
            for i, entry in enumerate(entries)]
        return torch.stack(list(pieces))

    return ShardedTensorFactory(first.key, stack, build, merge, first.replica_id)
