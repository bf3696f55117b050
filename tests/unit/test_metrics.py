"""flops_per_token, the MFU headline's numerator: against published figures, and against torch's
FlopCounterMode on transformers' Qwen3-Omni Thinker text model (an independent count, not our formula)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

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


def _hf_thinker_text(m: ThinkerConfig):
    """transformers' Thinker text model and lm_head at ``m``'s sizes, eager attention and eager experts
    (a Python loop of F.linear per expert hit), built on the meta device and given CPU weights:

    * values do not change a FLOP count, and neither does which experts a token picks (only how many:
      top-k), but the cost of the run does: backward through ``gate_up_proj[e]`` writes a full-size
      [num_experts, ...] gradient per expert hit (with all 128 experts stored, 17 s and 10 GB measured).
      So the route is fixed: o_proj is zero (the router sees the positive input through an RMSNorm of
      ones), router rows 0..7 are ones and the others zero, every token picks experts 0..7 (checked), and
      only those top-k experts' weights are stored: HF's loop never reads the others.
    * no embedding table (the input is ``inputs_embeds``, which requires grad as an embedding output).
    """
    text = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                head_dim=m.head_dim, moe_intermediate_size=m.moe_ffn_hidden_size, num_experts=m.num_experts,
                num_experts_per_tok=m.router_topk, norm_topk_prob=True, tie_word_embeddings=False,
                decoder_sparse_step=1, mlp_only_layers=[],
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[24, 20, 20],
                                     interleaved=True))
    config = Qwen3OmniMoeThinkerConfig(text_config=text)
    config.text_config._attn_implementation = "eager"
    config.text_config._experts_implementation = "eager"
    with torch.device("meta"):
        thinker = hf.Qwen3OmniMoeThinkerForConditionalGeneration(config)
    model, head = thinker.model.language_model, thinker.lm_head
    model.embed_tokens = None
    gen = torch.Generator().manual_seed(0)
    for module in [*model.modules(), head]:
        for name, p in list(module.named_parameters(recurse=False)):
            shape = (m.router_topk, *p.shape[1:]) if name in ("gate_up_proj", "down_proj") else p.shape
            if "RMSNorm" in type(module).__name__:
                value = torch.ones(shape)
            elif module is head:
                value = torch.zeros(shape)  # 311M values that need not be random
            else:
                value = torch.empty(shape).uniform_(-0.05, 0.05, generator=gen)
            setattr(module, name, torch.nn.Parameter(value))
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[: m.router_topk] = 1.0
    model.rotary_emb = type(model.rotary_emb)(config.text_config)  # its inv_freq buffer, on CPU
    return model, head


def test_flops_per_token_equals_flop_counter_on_transformers_thinker():
    """Forward + backward of one layer at the proxy width (Thinker/30B-A3B widths), 64 tokens, counted
    by FlopCounterMode. Every counted matmul is a linear layer's mm (q/k/v/o, router, experts, lm_head:
    forward, input gradient, weight gradient) or attention's bmm (QK^T and AV, forward and backward).
    The linear part equals flops_per_token at S=0 exactly; eager attention multiplies the whole S x S
    square and masks afterwards, so it counts twice the causal half that flops_per_token charges."""
    proxy, seq = _qwen3_moe_width(1), 64
    model, head = _hf_thinker_text(proxy)
    routes = []
    for layer in model.layers:
        layer.mlp.gate.register_forward_hook(lambda mod, args, out: routes.append(set(out[2].unique().tolist())))
    gen = torch.Generator().manual_seed(1)
    embeds = (0.5 + torch.rand(1, seq, proxy.hidden_size, generator=gen)).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        logits = head(model(inputs_embeds=embeds, use_cache=False).last_hidden_state)
        logits.backward(torch.randn(logits.shape, generator=gen))
    assert routes == [set(range(proxy.router_topk))] * proxy.num_layers
    counted = {str(op).split(".")[1]: flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert set(counted) <= {"mm", "addmm", "bmm"}, counted

    linear_per_token = flops_per_token(proxy, 0)
    attention_per_token = flops_per_token(proxy, seq) - linear_per_token
    assert counted.get("mm", 0) + counted.get("addmm", 0) == seq * linear_per_token  # 141,431,930,880
    assert counted["bmm"] == 2 * seq * attention_per_token  # 201,326,592: 12 S^2 q_dim per layer
