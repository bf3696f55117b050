"""Our megatron Thinker LM vs transformers' Qwen3-Omni thinker: same weights, same logits (fp32).

The HF weights go through ``save_pretrained`` so that the bridge reads the real on-disk names
(one tensor per expert), not the fused in-memory experts; the thinker alone is saved without the
``thinker.`` prefix that the full Qwen3-Omni checkpoint has, so the test adds it.
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerForConditionalGeneration,
)

from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.models.thinker.bridge import hf_to_megatron, megatron_to_hf

TINY = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2], rope_theta=10000.0, rms_norm_eps=1e-6,
)


def tiny_hf_thinker_config(m: ThinkerConfig) -> Qwen3OmniMoeThinkerConfig:
    text = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
        head_dim=m.head_dim, moe_intermediate_size=m.moe_ffn_hidden_size, num_experts=m.num_experts,
        num_experts_per_tok=m.router_topk, norm_topk_prob=True, tie_word_embeddings=False,
        rms_norm_eps=m.rms_norm_eps, decoder_sparse_step=1, mlp_only_layers=[],
        rope_parameters=dict(rope_type="default", rope_theta=m.rope_theta,
                             mrope_section=list(m.mrope_section), interleaved=True),
    )
    return Qwen3OmniMoeThinkerConfig(
        text_config=text,
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          output_dim=m.hidden_size, n_window=4, downsample_hidden_size=8),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=m.hidden_size, deepstack_visual_indexes=[0]),
        audio_token_id=100, image_token_id=101, video_token_id=102, vision_start_token_id=103,
        audio_start_token_id=104,
    )


@pytest.fixture(scope="module")
def hf_thinker():
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_hf_thinker_config(TINY))
    model.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-trivial norms and router, not the HF init
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_on_disk_state(hf_thinker, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_thinker")
    hf_thinker.save_pretrained(path)
    return {f"thinker.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}


def build_ours(hf_state):
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf_state, TINY), strict=False)
    assert not unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing
    return model.eval()


def position_cases(batch, seq):
    text = torch.arange(seq).expand(batch, seq)
    # Distinct temporal / height / width rows, like an image grid after a text prefix.
    t = torch.arange(seq).expand(batch, seq)
    h = (torch.arange(seq) // 3 + 2 * torch.arange(batch)[:, None])
    w = (torch.arange(seq) % 5) * 2 + 1
    return {"text": text, "thw": torch.stack([t, h, w.expand(batch, seq)])}


@pytest.mark.parametrize("case", ["text", "thw"])
def test_logits_match_transformers(megatron_world1, hf_thinker, hf_on_disk_state, case):
    ours = build_ours(hf_on_disk_state)
    torch.manual_seed(1)
    batch, seq = 2, 12
    input_ids = torch.randint(0, 96, (batch, seq))
    positions = position_cases(batch, seq)[case]
    hf_positions = positions if positions.dim() == 3 else positions.expand(3, -1, -1)
    with torch.no_grad():
        ref = hf_thinker(input_ids=input_ids, position_ids=hf_positions).logits
        got = ours(input_ids, positions, None)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_per_token_loss_matches_transformers(megatron_world1, hf_thinker, hf_on_disk_state):
    ours = build_ours(hf_on_disk_state)
    input_ids = torch.randint(0, 96, (2, 10))
    labels = torch.randint(0, 96, (2, 10))
    positions = position_cases(2, 10)["thw"]
    with torch.no_grad():
        ref_logits = hf_thinker(input_ids=input_ids, position_ids=positions).logits
        loss = ours(input_ids, positions, None, labels=labels)
    ref = torch.nn.functional.cross_entropy(ref_logits.transpose(1, 2), labels, reduction="none")
    assert loss.shape == (2, 10)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_bridge_round_trip(hf_on_disk_state):
    lm_state = {k: v for k, v in hf_on_disk_state.items() if k.startswith(("thinker.model.", "thinker.lm_head"))}
    back = megatron_to_hf(hf_to_megatron(lm_state, TINY), TINY)
    assert back.keys() == lm_state.keys()
    for name, tensor in lm_state.items():
        assert torch.equal(back[name], tensor), name
