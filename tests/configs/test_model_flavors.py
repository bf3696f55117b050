"""Model flavors: qwen3_omni_30b_a3b against transformers' Qwen3-Omni config, and tiny's size."""

from omegaconf import OmegaConf
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig

from omni_train.config import compose
from omni_train.models.thinker.lm import count_parameters

# Sizes where transformers' Qwen3OmniMoeTextConfig defaults are those of the released 30B-A3B thinker.
FROM_DEFAULTS = {
    "hidden_size": "hidden_size",
    "num_query_groups": "num_key_value_heads",
    "num_experts": "num_experts",
    "router_topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "aux_loss_coeff": "router_aux_loss_coef",
}
# Sizes where the class defaults differ from the released checkpoint's config.json
# (thinker_config.text_config of Qwen/Qwen3-Omni-30B-A3B-Instruct): the released values are used.
RELEASED = {"vocab_size": 152064, "num_layers": 48, "num_attention_heads": 32, "head_dim": 128,
            "max_position_embeddings": 65536, "mrope_section": [24, 20, 20]}


def test_qwen3_omni_30b_a3b_matches_transformers_config():
    model = OmegaConf.to_object(compose(["model=qwen3_omni_30b_a3b"])).model.thinker
    reference = Qwen3OmniMoeTextConfig()
    for ours, theirs in FROM_DEFAULTS.items():
        assert getattr(model, ours) == getattr(reference, theirs), ours
    assert model.rope_theta == reference.rope_parameters["rope_theta"]
    for key, value in RELEASED.items():
        assert getattr(model, key) == value, key
    # A transformers config built with the released sizes round-trips through ours.
    released = Qwen3OmniMoeTextConfig(vocab_size=model.vocab_size, num_hidden_layers=model.num_layers,
                                      num_attention_heads=model.num_attention_heads, head_dim=model.head_dim)
    assert released.head_dim == 128 and released.num_hidden_layers == 48


def test_parameter_counts():
    total, active = count_parameters(OmegaConf.to_object(compose(["model=qwen3_omni_30b_a3b"])).model.thinker)
    assert 30.0e9 < total < 31.0e9 and 3.0e9 < active < 3.6e9  # "30B-A3B"
    tiny_total, _ = count_parameters(OmegaConf.to_object(compose([])).model.thinker)
    assert 1e6 < tiny_total < 1e7  # "a few million"


def test_every_flavor_composes_with_a_section_per_network():
    from omni_train.models import NETWORKS, flavors

    found = flavors()
    assert {"tiny", "tiny_omni", "tiny_gpu", "qwen3_omni_30b_a3b"} <= set(found)
    for name in found:
        model = OmegaConf.to_object(compose([f"model={name}"])).model
        assert model.flavor == name  # the file's name is the flavor's
        sections = {key for key in ("thinker", "talker") if getattr(model, key) is not None}
        assert sections <= set(NETWORKS) and "thinker" in sections
