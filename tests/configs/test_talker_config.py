"""model.talker: the Talker flavors' sizes are the released Talker's (written out here from the release's
config.json, not read from our yaml), a Talker config that cannot run fails validation naming its key,
the dry run counts the Talker exactly as transformers' Talker built on the meta device (total, active per
token, by part) and estimates the memory of its training by the rules of planning/talker_memory.py, and
the Thinker's flavors and recipes stay Thinker-only."""

import re

import pytest
import torch
from omegaconf import OmegaConf
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeTalkerConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeTalkerForConditionalGeneration

from omni_train.config import CONF_DIR, ConfigError, compose, validate_config
from omni_train.config.schema import ParallelConfig, PhaseConfig, StageConfig, ThinkerConfig, TrainerConfig
from omni_train.config.talker import CodePredictorConfig, TalkerConfig
from omni_train.config.validate import smallest_world_size
from omni_train.models.talker.hf_config import talker_config_from_hf
from omni_train.planning.dry_run import print_dry_run
from omni_train.planning.param_inventory import talker_shapes
from omni_train.planning.talker_memory import estimate_talker_memory, talker_layer_activation_bytes, talker_logit_bytes
from cli import omni_train
from tests.configs.test_30b_talker_recipes import TALKER_RECIPES

# talker_config of Qwen/Qwen3-Omni-30B-A3B-Instruct's config.json (as released: rope_scaling, not
# rope_parameters), and the ids its top level holds
RELEASED_TALKER = dict(
    text_config=dict(
        vocab_size=3072, hidden_size=1024, intermediate_size=2048, num_hidden_layers=20, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, hidden_act="silu", max_position_embeddings=65536, rms_norm_eps=1e-6,
        rope_theta=1000000, rope_scaling=dict(interleaved=True, mrope_section=[24, 20, 20], rope_type="default"),
        attention_bias=False, decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=384,
        num_experts=128, num_experts_per_tok=6, norm_topk_prob=True, shared_expert_intermediate_size=768,
        router_aux_loss_coef=0.001, initializer_range=0.02),
    code_predictor_config=dict(
        vocab_size=2048, hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000, num_code_groups=16, attention_bias=False, initializer_range=0.02),
    accept_hidden_layer=24, num_code_groups=16, thinker_hidden_size=2048, spatial_merge_size=2,
    position_id_per_seconds=13, codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150,
    codec_nothink_id=2155, codec_think_bos_id=2156, codec_think_eos_id=2157,
    speaker_id=dict(chelsie=2301, ethan=2302, aiden=2303), audio_token_id=151675, image_token_id=151655,
    video_token_id=151656, vision_start_token_id=151652, audio_start_token_id=151669,
)
RELEASED_TOP = dict(im_start_token_id=151644, im_end_token_id=151645, user_token_id=872, assistant_token_id=77091,
                    tts_pad_token_id=151671, tts_bos_token_id=151672, tts_eos_token_id=151673)
TALKER_30B = ["model=qwen3_omni_30b_a3b_talker", "dry_run=true"]
THINKER_RECIPES = sorted({p.stem for p in (CONF_DIR / "recipe" / "qwen3_omni_30b_a3b").glob("*.yaml")}
                         - set(TALKER_RECIPES))


def _model(flavor):
    return OmegaConf.to_object(compose([f"model={flavor}"])).model


@pytest.fixture(scope="module")
def reference():
    """transformers' Talker (backbone, projections, code predictor) on the meta device from the release's
    talker_config: total, active per token (total - the routed experts a token leaves idle) and each part."""
    config = Qwen3OmniMoeTalkerConfig(**RELEASED_TALKER)
    with torch.device("meta"):
        model = Qwen3OmniMoeTalkerForConditionalGeneration(config)
    text = config.text_config
    count = lambda prefixes: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
    total = sum(p.numel() for p in model.parameters())
    idle = text.num_hidden_layers * (text.num_experts - text.num_experts_per_tok) * 3 * text.hidden_size \
        * text.moe_intermediate_size
    return dict(total=total, active=total - idle, backbone=count(("model.", "codec_head.")),
                backbone_active=count(("model.", "codec_head.")) - idle,
                projections=count(("text_projection.", "hidden_projection.")), code_predictor=count("code_predictor."))


# ----- the flavors ---------------------------------------------------------------------------------------


def test_30b_talker_flavor_is_the_released_talker():
    model = _model("qwen3_omni_30b_a3b_talker")
    released = Qwen3OmniMoeConfig(talker_config=RELEASED_TALKER, **RELEASED_TOP).to_dict()
    assert model.talker == talker_config_from_hf(released["talker_config"], released)
    t = model.talker  # the sizes issue 17 names, spelled out
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.num_query_groups, t.head_dim) == (
        20, 1024, 16, 2, 128)
    assert (t.num_experts, t.router_topk, t.moe_ffn_hidden_size, t.shared_expert_ffn_hidden_size) == (128, 6, 384, 768)
    cp = t.code_predictor
    assert (cp.num_layers, cp.num_attention_heads, cp.num_query_groups, cp.ffn_hidden_size) == (5, 16, 8, 3072)
    assert (t.codec_vocab_size, t.num_code_groups, cp.codebook_size, t.accept_hidden_layer) == (3072, 16, 2048, 24)
    # the Thinker is the Thinker flavor's, composed from it
    assert model.thinker == _model("qwen3_omni_30b_a3b").thinker


def test_tiny_talker_flavor_fits_the_tiny_thinker_and_the_codec():
    model = _model("tiny_omni_talker")
    assert model.thinker == _model("tiny_omni").thinker
    t = model.talker
    assert t.thinker_hidden_size == model.thinker.hidden_size and t.accept_hidden_layer <= model.thinker.num_layers
    # `omni-data codec` targets (16 codebooks of at most 2048 codes) fit it as they fit the released Talker
    release = TalkerConfig()
    assert (t.num_code_groups, t.code_predictor.codebook_size, t.codec, t.codec_vocab_size) == (
        release.num_code_groups, release.code_predictor.codebook_size, release.codec, release.codec_vocab_size)
    cfg = compose(["model=tiny_omni_talker", "dry_run=true"])
    validate_config(cfg, world_size=1, cuda_available=False)


def test_thinker_flavors_have_no_talker():
    for flavor in ("tiny", "tiny_gpu", "tiny_omni", "qwen3_omni_30b_a3b"):
        assert _model(flavor).talker is None, flavor


# ----- the parameter table: our Talker, and transformers' counts -------------------------------------------


def _built_shapes(cfg, device):
    from omni_train.models.talker.model import build_talker

    with torch.device(device):
        model = build_talker(cfg, ParallelConfig(), device=torch.device(device), params_dtype=torch.float32)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _table(cfg):
    return {name: shape for shapes in talker_shapes(cfg).values() for name, shape in shapes}


@pytest.mark.parametrize("experts_impl", ["grouped", "sequential"])
def test_tiny_talker_builds_on_cpu_as_the_table_says(experts_impl, megatron_world1):
    import dataclasses

    cfg = dataclasses.replace(_model("tiny_omni_talker").talker, experts_impl=experts_impl)
    shapes = _built_shapes(cfg, "cpu")
    assert shapes == _table(cfg)
    assert 2e6 < sum(torch.Size(s).numel() for s in shapes.values()) < 3e6


def test_released_talker_on_the_meta_device_is_the_table(megatron_world1):
    cfg = _model("qwen3_omni_30b_a3b_talker").talker
    assert _built_shapes(cfg, "meta") == _table(cfg)


def _talker_counts(out):
    total, active = re.search(r"Talker: ([\d,]+) parameters .* total, ([\d,]+) .* active per token", out).groups()
    parts = re.search(r"backbone ([\d,]+) \(([\d,]+) .*\), projections ([\d,]+), code predictor ([\d,]+)", out).groups()
    names = ("total", "active", "backbone", "backbone_active", "projections", "code_predictor")
    return dict(zip(names, (int(v.replace(",", "")) for v in (total, active, *parts))))


def test_dry_run_counts_the_talker_as_transformers_builds_it(reference, capsys):
    cfg = OmegaConf.to_object(compose(TALKER_30B + ["parallel.ep=8", "dry_run_world_size=8"]))
    print_dry_run(cfg, 8, build=False)
    out = capsys.readouterr().out
    assert _talker_counts(out) == reference
    assert (round(reference["total"] / 1e9, 2), round(reference["backbone_active"] / 1e9, 2)) == (3.32, 0.29)
    assert out.startswith("model qwen3_omni_30b_a3b_talker (Thinker): 30,532,646,912 parameters")
    # one rank: the dense part (backbone without routed experts, projections, code predictor) + 16 of 128
    routed = 20 * 128 * 3 * 1024 * 384
    assert f"Talker layout tp=1 pp=1 cp=1 ep=8: {reference['total'] - routed + routed // 8:,} parameters" in out
    assert "training the Talker, the Thinker frozen beside it" in out and "Thinker (frozen)" in out


# ----- the memory estimate, by hand --------------------------------------------------------------------------

# Talker: h=8, 1 layer, a=2 heads, g=1 group, d=4, E=4 experts top-2, F=2, shared Fs=4, codec vocab V=16,
# projections Ht=8 -> Fp=4 -> 8; code predictor h=8, 1 layer, a=2, g=1, d=4, F=8, G=3 groups of C=4 codes.
TALKER = TalkerConfig(hidden_size=8, num_layers=1, num_attention_heads=2, num_query_groups=1, head_dim=4,
                      num_experts=4, router_topk=2, moe_ffn_hidden_size=2, shared_expert_ffn_hidden_size=4,
                      codec_vocab_size=16, mrope_section=[1, 1, 0], thinker_hidden_size=8,
                      projection_ffn_hidden_size=4, accept_hidden_layer=1, num_code_groups=3,
                      code_predictor=CodePredictorConfig(hidden_size=8, num_layers=1, num_attention_heads=2,
                                                         num_query_groups=1, head_dim=4, ffn_hidden_size=8,
                                                         codebook_size=4))
# tests/unit/test_memory_estimate.py's model: 1,592 parameters per rank at ep=2
THINKER = ThinkerConfig(vocab_size=32, hidden_size=8, num_layers=2, num_attention_heads=2, num_query_groups=1,
                        head_dim=4, num_experts=4, router_topk=2, moe_ffn_hidden_size=6, mrope_section=[1, 1, 0])
# One rank at ep=2:
#   backbone dense: codec embedding 16x8 = 128, layer (norms 8 + 8, qkv (2+2*1)*4 x 8 = 128, q/k norms 4 + 4,
#     proj 8x8 = 64, router 4x8 = 32 -> 248), shared expert (gate 8, fc1 8x8 = 64, fc2 8x4 = 32 -> 104),
#     final norm 8, codec head 16x8 = 128                                                      = 616
#   backbone experts: 2 local, fc1 2 x 4x8 = 64, fc2 2 x 8x2 = 32                               = 96
#   projections: 2 x (fc1 4x8 + 4, fc2 8x4 + 8) = 2 x 76                                        = 152
#   code predictor: q 8x8, k 4x8, v 4x8, o 8x8 (192), q/k norms 8, MLP 3 x 8x8 = 192, norms 16 (-> 408),
#     final norm 8, 2 embeddings + 2 heads of 4x8 = 128                                        = 544
#   held 1,408: dense 1,312, expert 96. On 4 GPUs: dense optimizer state over 4, experts over 4 / 2 = 2.
STATES = {"parameters": 2 * 1408, "gradients": 4 * 1408, "optimizer": 12 * (1312 // 4 + 96 // 2),
          "Thinker (frozen)": 2 * 1592}
# Activations, tokens = b*S = 2*8 = 16, bf16:
#   layer: attention 2 x 16 x (2h + (5a+3g)d = 16 + 52) = 2176; router 2 x 16 x 2h = 512 + fp32 4 x 16 x E = 256;
#          experts 2 x 16 x (kh + 5kF = 16 + 20) = 1152 + fp32 4 x 16 x k = 128;
#          shared expert 2 x 16 x (5Fs + h + 2 = 30) = 960                                     = 5184
#   inputs 3 x 2 x 16 x 8 = 768; conditioning 2 x 16 x (3 Ht + 2 Fp = 32) = 1024
#   code predictor per frame: G=3 x (layer 2h + (5a+3g)d + 2h + 4F = 16 + 52 + 16 + 32 = 116, + 2h = 16)
#     = 396 elements x 2 bytes, x 16 frames                                                     = 12672
#   logits 16 x (V + (G-1) x C = 16 + 8) x (2 + 4)                                              = 2304
#   the frozen Thinker's forward (no_grad, before the Talker's, stopped after the accept layer: no logits): one
#     THINKER layer (attention 2 x 16 x (16 + 52) = 2176, router 512 + 256, experts 2 x 16 x (kh + 5kF = 16 + 60)
#     + 128 = 2560)                                                                             = 5504
#   Only the largest of the logits, the Thinker's forward and (with recompute) one recomputed layer counts: here
#   the Thinker's forward.
ACTIVATIONS = {"Talker activations": 5184, "Talker inputs": 768, "conditioning": 1024, "code predictor": 12672,
               "Thinker forward": 5504}


def _trainer(**kw):
    return TrainerConfig(**{**dict(global_batch_size=16, micro_batch_size=2, seq_length=8, precision="bf16",
                                   max_steps=10), **kw})


def _estimate(stage=StageConfig(name="s"), **trainer):
    (estimate,) = estimate_talker_memory(TALKER, THINKER, ParallelConfig(ep=2), _trainer(**trainer), stage,
                                         world_size=4)
    return estimate, {item.label: item.bytes for item in estimate.items}


def test_talker_memory_by_hand():
    estimate, items = _estimate()
    assert items == {**STATES, **ACTIVATIONS}
    assert (estimate.trainable, estimate.frozen) == (1408, 1592)
    assert talker_logit_bytes(TALKER, 16, 2) == 2304  # the peak's other candidate, outweighed here


def test_talker_memory_with_full_recompute_keeps_layer_inputs_and_one_layer():
    _, items = _estimate(recompute="full")
    expected = {k: v for k, v in {**STATES, **ACTIVATIONS}.items() if k != "Talker activations"}
    # layer inputs 2 x 16 x 8; the recomputed layer (5,184 B) outweighs the logits (2,304 B), never live with them,
    # and the Thinker's forward (5,504 B) outweighs both
    assert items == {**expected, "Talker layer inputs": 256}
    assert talker_layer_activation_bytes(TALKER, 16, 2) == 5184


def test_talker_phase_patterns_choose_what_trains():
    predictor = PhaseConfig(name="predictor", steps=10, trainable=[r"^talker\.code_predictor\."])
    stage = StageConfig(name="s", phases=[predictor])
    estimate, items = _estimate(stage=stage)
    assert (estimate.trainable, estimate.frozen) == (544, 1408 - 544 + 1592)
    assert (items["gradients"], items["optimizer"]) == (4 * 544, 12 * (544 // 4))


# ----- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,key,words", [
    (["model.talker.accept_hidden_layer=49"], "model.talker.accept_hidden_layer", "model.thinker.num_layers=48"),
    (["model.talker.thinker_hidden_size=1024"], "model.talker.thinker_hidden_size", "model.thinker.hidden_size"),
    (["model.talker.code_predictor.hidden_size=512"], "model.talker.code_predictor.hidden_size", "1024"),
    (["model.talker.mrope_section=[24,20,10]"], "model.talker.mrope_section", "head_dim/2=64"),
    (["model.talker.router_topk=129"], "model.talker.router_topk", "num_experts=128"),
    (["model.talker.num_query_groups=3"], "model.talker.num_query_groups", "does not divide"),
    (["model.talker.num_layers=0"], "model.talker.num_layers", "> 0"),
    (["model.talker.codec.eos=3072"], "model.talker.codec.eos", "2048..3071"),
    (["model.talker.codec.speakers.ethan=100"], "model.talker.codec.speakers.ethan", "2048..3071"),
    (["model.talker.code_predictor.codebook_size=2049"], "model.talker.code_predictor.codebook_size", "2048"),
    (["model.talker.text.tts_pad=152064"], "model.talker.text.tts_pad", "vocab_size=152064"),
    (["model.talker.experts_impl=fused"], "model.talker.experts_impl", "grouped"),
    (["parallel.tp=2"], "parallel.sequence_parallel", "needs sequence_parallel=true"),
    (["parallel.pp=7"], "parallel.pp", "not divisible by pp=7"),
    (["parallel.cp=2"], "parallel.cp", "the Talker runs at cp=1 only"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", "needs tp > 1"),
    (["model.talker.num_experts=96", "parallel.ep=64"], "parallel.ep", "model.talker.num_experts=96"),
    (["dry_run=false"], "model.talker", "does not train the Talker"),
])
def test_a_talker_config_that_cannot_run_names_its_key(overrides, key, words):
    cfg = compose(TALKER_30B + overrides)
    with pytest.raises(ConfigError) as error:
        validate_config(cfg, world_size=smallest_world_size(cfg), cuda_available=True)
    assert error.value.key == key and words in error.value.problem, str(error.value)


def test_a_talker_value_of_the_wrong_type_names_its_key():
    with pytest.raises(ConfigError) as error:
        compose(TALKER_30B + ["model.talker.hidden_size=wide"])
    assert error.value.key == "model.talker.hidden_size"


def test_the_tiny_talker_reads_a_layer_its_thinker_has():
    cfg = compose(["model=tiny_omni_talker", "dry_run=true", "model.talker.accept_hidden_layer=5"])
    with pytest.raises(ConfigError, match=r"accept_hidden_layer: 5 must be in 1..model.thinker.num_layers=4"):
        validate_config(cfg, world_size=1, cuda_available=False)


# ----- the Thinker's recipes stay Thinker-only -----------------------------------------------------------------


@pytest.mark.parametrize("recipe", THINKER_RECIPES)
def test_thinker_recipes_plan_the_thinker_alone(recipe, capsys):
    cfg = OmegaConf.to_object(compose([f"recipe=qwen3_omni_30b_a3b/{recipe}", "dry_run=true"]))
    assert cfg.model.talker is None and cfg.model.flavor == "qwen3_omni_30b_a3b"
    print_dry_run(cfg, cfg.dry_run_world_size, build=False)
    out = capsys.readouterr().out
    assert "Talker" not in out and "talker" not in out
    assert re.match(r"(language )?model qwen3_omni_30b_a3b: 30,532,646,912 parameters", out)


# ----- the CLI -----------------------------------------------------------------------------------------------


def test_cli_dry_run_of_the_tiny_talker_builds_it_on_meta(tmp_path):
    proc = omni_train(["model=tiny_omni_talker", "dry_run=true", f"run_dir={tmp_path / 'run'}"], timeout=300)
    counts = _talker_counts(proc.stdout)
    built = f"Talker built on the meta device: {counts['total']:,} parameters (matches the analytic count)"
    assert built in proc.stdout
    assert "fits:" in proc.stdout and not (tmp_path / "run").exists()
    refused = omni_train(["model=tiny_omni_talker", f"run_dir={tmp_path / 'run'}"], check=False)
    assert refused.returncode == 2
    assert "config error: model.talker: stage 'text_pretrain' does not train the Talker" in refused.stderr
