import pytest

from omni_train.config import ThinkerConfig
from omni_train.metrics import flops_per_token


def _qwen3_moe_width(num_layers):
    return ThinkerConfig(vocab_size=152064, hidden_size=2048, num_layers=num_layers,
                       num_attention_heads=32, num_query_groups=4, head_dim=128, num_experts=128,
                       router_topk=8, moe_ffn_hidden_size=768)


def test_flops_per_token_matches_published_figures():
    # stack_facts.md: the 4-layer Thinker-width LM at S=4096 costs 3.63 GFLOP/token (measured on H100),
    # and Qwen3-30B-A3B (48 layers) ~23.0 GFLOP/token at 4k sequence (Megatron formula).
    assert flops_per_token(_qwen3_moe_width(4), 4096) == pytest.approx(3.63e9, rel=0.01)
    assert flops_per_token(_qwen3_moe_width(48), 4096) == pytest.approx(23.0e9, rel=0.01)
