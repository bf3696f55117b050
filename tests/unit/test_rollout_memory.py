"""The dry run's terms for a stage's frozen models and rollout engine (omni_train/planning/frozen_memory.py):
a teacher's per-rank parameter bytes against transformers' own modules built on the meta device from the
same config.json (split by hand over the layout), the KV cache against a hand computation, and a rollout
too large for the GPU failing the dry run with a message naming the term."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from omni_train.config import ConfigError, compose
from omni_train.planning.dry_run import print_dry_run
from omni_train.planning.frozen_memory import flavor_thinker, plan_side_models
from omni_train.planning.param_inventory import count_thinker_parameters

QWEN3_32B = dict(vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                 num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                 rope_parameters=dict(rope_type="default", rope_theta=1e6))
TIED_SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
MOE_SMALL = dict(vocab_size=4096, hidden_size=256, moe_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 norm_topk_prob=True, tie_word_embeddings=False)
CASES = {  # name: (config class, model class, sizes, tp, ep)
    "qwen3_32b_tp1": (Qwen3Config, Qwen3ForCausalLM, QWEN3_32B, 1, 1),
    "qwen3_32b_tp4": (Qwen3Config, Qwen3ForCausalLM, QWEN3_32B, 4, 8),  # dense: replicated over ep
    "tied_tp2": (Qwen3Config, Qwen3ForCausalLM, TIED_SMALL, 2, 1),
    "moe_tp2_ep2": (Qwen3MoeConfig, Qwen3MoeForCausalLM, MOE_SMALL, 2, 2),
}


def _train_config(*overrides):
    return OmegaConf.to_object(compose(["model=qwen3_omni_30b_a3b", "dry_run=true", *overrides]))


def _items(side, pp_stage=0):
    return {item.label: item.bytes for item in side.items(pp_stage)}


def _rank_share(model, tp: int, ep: int) -> int:
    """One rank's parameters, split by hand: norms and the router replicated, routed experts over tp * ep,
    every other matrix (attention, dense MLP, embedding, lm_head) over tp."""
    share = 0
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("mlp.gate.weight"):
            share += p.numel()
        elif ".experts." in name:
            share += p.numel() // (tp * ep)
        else:
            share += p.numel() // tp
    return share


@pytest.mark.parametrize("case", sorted(CASES))
def test_teacher_parameter_bytes_match_transformers_modules(tmp_path, case):
    config_cls, model_cls, sizes, tp, ep = CASES[case]
    config = config_cls(**sizes, architectures=[model_cls.__name__])
    config.save_pretrained(tmp_path)  # config.json only: no weights
    with torch.device("meta"):
        reference = model_cls(config)
    overrides = [f"parallel.tp={tp}", f"parallel.ep={ep}", "parallel.sequence_parallel=true",
                 f"stage.frozen_models=[{{name: teacher, source: 'hf:{tmp_path}'}}]"]
    side = plan_side_models(_train_config(*overrides), world_size=tp * ep)
    assert _items(side)["teacher parameters"] == 2 * _rank_share(reference, tp, ep)  # bf16
    # the whole model counted once too (tied: one table)
    assert f"{sum(p.numel() for p in reference.parameters()):,} parameters" in side.lines[0]
    # one micro-batch of fp32 logits over this rank's vocabulary shard (trainer: 1 x 8192 tokens here)
    cfg = _train_config(*overrides)
    tokens = cfg.trainer.micro_batch_size * cfg.trainer.seq_length
    assert _items(side)["teacher logits"] == 4 * tokens * sizes["vocab_size"] // tp


def test_flavor_names_a_teacher_that_is_not_here(tmp_path):
    """`model: qwen3_32b` gives the sizes of the released config.json when the directory is absent; with
    neither, the dry run names the field to set."""
    config = Qwen3Config(**QWEN3_32B, architectures=["Qwen3ForCausalLM"])
    config.save_pretrained(tmp_path)
    from_dir = plan_side_models(_train_config(f"stage.frozen_models=[{{name: t, source: 'hf:{tmp_path}'}}]"), 8)
    from_flavor = plan_side_models(_train_config(
        "stage.frozen_models=[{name: t, source: 'hf:/not/here', model: qwen3_32b}]"), 8)
    assert _items(from_dir) == _items(from_flavor)
    assert "sizes from conf/model/qwen3_32b.yaml" in from_flavor.lines[0]
    assert flavor_thinker("qwen3_32b", "k").num_experts == 0
    with pytest.raises(ConfigError, match=r"stage.frozen_models\[0\].model: .*not on this machine"):
        plan_side_models(_train_config("stage.frozen_models=[{name: t, source: 'hf:/not/here'}]"), 8)
    with pytest.raises(ConfigError, match=r"stage.frozen_models\[0\].model: no model flavor 'nope'"):
        plan_side_models(_train_config("stage.frozen_models=[{name: t, source: init, model: nope}]"), 8)


ROLLOUT = ["stage.loop=rollout", "stage.rollout.prompts_per_step=6", "stage.rollout.sampling.n=4",
           "stage.rollout.max_prompt_tokens=100", "stage.rollout.sampling.max_new_tokens=28"]


def test_kv_cache_by_hand():
    # tiny: 4 layers, 2 kv heads of 32; T = 100 + 28 = 128 tokens per sequence
    # hf on 4 ranks (dp 4): S = ceil(6 / 4) * 4 = 8 sequences; all layers and kv heads: 4*2*2*32*128*8*2
    cfg = OmegaConf.to_object(compose(["dry_run=true", *ROLLOUT]))
    items = _items(plan_side_models(cfg, world_size=4))
    assert items["rollout KV cache"] == 4 * 2 * 2 * 32 * 128 * 8 * 2 == 1_048_576
    assert items["rollout policy copy"] == 2 * count_thinker_parameters(cfg.model.thinker)[0]
    # megatron at tp=2 on 4 ranks (dp 2): S = ceil(6 / 2) * 4 = 12; its tp shard holds 1 kv head; no copy
    cfg = OmegaConf.to_object(compose(["dry_run=true", *ROLLOUT, "stage.rollout.backend=megatron",
                                       "parallel.tp=2", "parallel.sequence_parallel=true"]))
    items = _items(plan_side_models(cfg, world_size=4))
    assert items["rollout KV cache"] == 4 * 2 * 1 * 32 * 128 * 12 * 2 == 786_432
    assert "rollout policy copy" not in items
    # generation_batch sets the sequences in flight; a supervised stage has no rollout terms
    cfg = OmegaConf.to_object(compose(["dry_run=true", *ROLLOUT, "stage.rollout.generation_batch=5"]))
    assert _items(plan_side_models(cfg, world_size=4))["rollout KV cache"] == 4 * 2 * 2 * 32 * 128 * 5 * 2
    assert _items(plan_side_models(OmegaConf.to_object(compose(["dry_run=true"])), world_size=4)) == {}


def test_too_large_rollout_fails_the_dry_run_naming_the_term(capsys):
    # 1e5 sequences x 4 layers x 2 x 2 x 32 x 128 tokens x 2 bytes = 13.1 GB > 10 GB
    cfg = OmegaConf.to_object(compose(["dry_run=true", *ROLLOUT, "stage.rollout.generation_batch=100000",
                                       "dry_run_gpu_memory_gb=10"]))
    assert not print_dry_run(cfg, 1, build=False)
    out = capsys.readouterr().out
    assert "rollout engine hf: KV cache 13.11 GB per rank" in out
    verdict = out.splitlines()[-1]
    assert verdict.startswith("  DOES NOT FIT") and "largest terms: rollout KV cache 13.11 GB" in verdict
    assert math.isclose(4 * 2 * 2 * 32 * 128 * 100000 * 2 / 1e9, 13.1072)
