"""Our finalize_grads (megatron's reductions, the per-token scaling left to the optimizer step) against
megatron's finalize_model_grads."""

import torch
from megatron.core.distributed import finalize_model_grads

from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.parallel.update import GradScaling, finalize_grads
from omni_train.parallel.wrap import wrap_data_parallel

TINY = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2],
)


def test_finalize_grads_leaves_the_token_division_to_the_update(megatron_world1):
    torch.manual_seed(0)
    state = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32).state_dict()
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(16).expand(3, 2, 16)

    def grads(finalize):
        model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
        model.load_state_dict(state)
        ddp = wrap_data_parallel(model, ParallelConfig(), on_gpu=False)
        ddp.zero_grad_buffer()
        ddp(tokens, positions, None, labels=tokens.roll(-1, dims=1)).sum().backward()
        finalize([ddp], torch.tensor(21, dtype=torch.int))
        return {n: p.main_grad.clone() for n, p in model.named_parameters()}

    pending = GradScaling()
    ours = grads(lambda model, num_tokens: finalize_grads(model, num_tokens, pending=pending))
    theirs = grads(finalize_model_grads)
    unscaled = grads(lambda model, num_tokens: finalize_model_grads(model, None))
    assert float(pending.tokens) == 21  # what the update will divide by
    for name in theirs:
        torch.testing.assert_close(ours[name], unscaled[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ours[name] / 21, theirs[name], rtol=1e-6, atol=1e-9, msg=name)
    assert any(g.abs().sum() > 0 for g in ours.values())
