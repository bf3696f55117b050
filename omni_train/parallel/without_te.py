"""What megatron-core 0.16.1 needs when Transformer Engine is not installed (on CPU and on GPU alike).

Not a CPU accommodation: the GPU machines' image has no Transformer Engine either.
"""

from __future__ import annotations


def apply_without_te() -> None:
    """moe_utils.RouterGatingLinearFunction reads the module global ``te_general_gemm``, which is only
    bound when Transformer Engine imports, so every MoE router forward raises NameError without it.
    Binding it to None selects megatron's own plain torch.mm branch. Idempotent; a no-op with TE."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
