"""The per-rank memory estimate against hand computations on a small config (every number below is
worked out in the comments, from the rules in omni_train/planning/memory_estimate.py)."""

from omni_train.config.schema import (
    AudioTowerConfig,
    ThinkerConfig,
    ParallelConfig,
    PhaseConfig,
    StageConfig,
    TrainerConfig,
    VisionTowerConfig,
)
from omni_train.planning.memory_estimate import (
    audio_tower_bytes_per_chunk,
    estimate_memory,
    format_estimate,
    vision_tower_bytes_per_token,
)

# h=8, a=2 heads, g=1 group, d=4, E=4 experts top-2, F=6, V=32, 2 layers
MODEL = ThinkerConfig(vocab_size=32, hidden_size=8, num_layers=2, num_attention_heads=2,
                    num_query_groups=1, head_dim=4, num_experts=4, router_topk=2, moe_ffn_hidden_size=6,
                    mrope_section=[1, 1, 0])
EVERYTHING = StageConfig(name="s", trainable=[".*"], frozen=[], phases=[])


def _items(estimate):
    return {item.label: item.bytes for item in estimate.items}


def _trainer(**kw):
    base = dict(global_batch_size=16, micro_batch_size=2, seq_length=8, precision="bf16", max_steps=10)
    return TrainerConfig(**{**base, **kw})


# Parameters on one rank with ep=2 (tp=pp=1):
#   per layer, dense: input norm 8 + qkv (2+2*1)*4 x 8 = 128 + q/k norms 4 + 4 + proj 8 x 8 = 64
#                     + pre-MLP norm 8 + router 4 x 8 = 32                                       = 248
#   per layer, experts: 4/2 = 2 local, each fc1 12 x 8 = 96 + fc2 8 x 6 = 48                      = 288
#   embedding 32 x 8 = 256, final norm 8, output 32 x 8 = 256                                      = 520
#   dense 2 x 248 + 520 = 1016, expert 2 x 288 = 576, held 1592
# On 4 GPUs: dense optimizer state sharded over 4 / (tp*pp) = 4, experts over 4 / (tp*ep*pp) = 2.
STATES = {"parameters": 2 * 1592, "gradients": 4 * 1592, "optimizer": 12 * (1016 // 4 + 576 // 2)}
# Activations of one layer, tokens = b*S/cp = 2*8 = 16, bf16:
#   attention 2 bytes x 16 x (2h + (5a + 3g) d = 16 + 13*4 = 68)           = 2176
#   router    2 x 16 x 2h = 512, + fp32 softmax 4 x 16 x E = 256             = 768
#   experts   2 x 16 x (k h + 5 k F = 16 + 60 = 76) = 2432, + fp32 probs 4 x 16 x k = 128 = 2560
LAYER = 2176 + 768 + 2560
SDPA_MASK = 2 * 2 * 8 * 8  # bf16 [b, 1, S, S] per layer
LOGITS = 16 * 32 * (2 + 4)  # bf16 logits + fp32 softmax


def test_no_recompute_by_hand():
    (estimate,) = estimate_memory(MODEL, ParallelConfig(ep=2), _trainer(), EVERYTHING, world_size=4,
                                  document_mask=True)
    assert estimate.micro_batches == 16 // (2 * 4)
    assert _items(estimate) == {
        **STATES,
        "LM activations": 2 * (LAYER + SDPA_MASK),
        "document mask": 2 * 8 * 8,  # bool
        "embeddings": 3 * 2 * 16 * 8,
        "logits and loss": LOGITS,
    }
    assert estimate.total == 3184 + 6368 + 6504 + 11520 + 128 + 768 + 3072


def test_full_recompute_keeps_layer_inputs_and_one_layer():
    (estimate,) = estimate_memory(MODEL, ParallelConfig(ep=2), _trainer(recompute="full"), EVERYTHING,
                                  world_size=4, document_mask=True)
    items = _items(estimate)
    assert items["LM layer inputs"] == 2 * (2 * 16 * 8)
    # the recomputed layer (5,760 B) is larger than the logits (3,072 B) and not live at the same time
    assert items["recomputed layer"] == LAYER + SDPA_MASK and "logits and loss" not in items
    assert estimate.total == 3184 + 6368 + 6504 + 512 + 128 + 768 + 5760


def test_frozen_parameters_hold_no_gradient_or_optimizer_state_per_phase():
    stage = StageConfig(name="s", phases=[
        PhaseConfig(name="router", steps=5, trainable=[r"\.router\."]),
        PhaseConfig(name="experts", steps=5, trainable=[r"\.experts\."]),
    ])
    router, experts = estimate_memory(MODEL, ParallelConfig(ep=2), _trainer(), stage, world_size=4,
                                      document_mask=False)
    assert _items(router)["parameters"] == _items(experts)["parameters"] == 2 * 1592  # frozen ones too
    assert (_items(router)["gradients"], _items(router)["optimizer"]) == (4 * 64, 12 * 64 // 4)  # dense
    assert (_items(experts)["gradients"], _items(experts)["optimizer"]) == (4 * 576, 12 * 576 // 2)
    assert (router.trainable, router.frozen) == (64, 1592 - 64)
    text = format_estimate([router, experts], gpu_memory_gb=80)
    assert "peak in phase experts" in text and "per phase: router" in text and "fits" in text


def test_pipeline_first_stage_keeps_pp_micro_batches_in_flight():
    # pp=2 on 4 GPUs with ep=2: dp = 2, 16 / (2*2) = 4 micro-batches per step; dense state sharded over
    # 4 / (tp*pp) = 2 ranks, experts over 4 / (tp*ep*pp) = 1.
    # stage 0: one layer + embedding: dense 248 + 256 = 504, expert 288; keeps min(pp - 0, 4) = 2
    #   micro-batches: 2*792 + 4*792 + 12*(504/2 + 288) + 2*LAYER + 2*3*2*16*8                = 23,776
    # stage 1: one layer + final norm + output: dense 512, expert 288; 1 micro-batch and the logits:
    #   2*800 + 4*800 + 12*(512/2 + 288) + LAYER + LOGITS                                      = 19,904
    (worst,) = estimate_memory(MODEL, ParallelConfig(ep=2, pp=2), _trainer(), EVERYTHING, world_size=4,
                               document_mask=False)
    assert (worst.pipeline_stage, worst.micro_batches) == (0, 4)
    assert (worst.layout.dense_shards, worst.layout.expert_shards) == (2, 1)
    assert _items(worst) == {"parameters": 2 * 792, "gradients": 4 * 792, "optimizer": 12 * (252 + 288),
                             "LM activations": 2 * LAYER, "embeddings": 2 * 3 * 2 * 16 * 8}
    assert worst.total == 23776


def test_audio_tower_bytes_by_hand():
    # 16 mel bins, n_window 2 -> chunks of 4 frames; 3 channels; d=4, ffn=8, 2 layers.
    # convolutions: input 16*4 = 64; then (bins, frames) 8x2, 4x1, 2x1, each output + GELU output kept:
    #   2*3*16 = 96, 2*3*4 = 24, 2*3*2 = 12                           -> 196 per chunk, 1 token per chunk
    # layers: 2 x (9d + 2 ffn) = 2 x 52 = 104 (checkpointed: 2 x d = 8); head 4d = 16
    audio = AudioTowerConfig(num_layers=2, d_model=4, num_heads=1, ffn_dim=8, num_mel_bins=16, n_window=2,
                             downsample_hidden_size=3)
    assert audio_tower_bytes_per_chunk(audio, act=2, checkpointed=False) == 2 * (196 + 104 + 16)
    assert audio_tower_bytes_per_chunk(audio, act=2, checkpointed=True) == 2 * (196 + 8 + 16)


def test_vision_tower_bytes_by_hand():
    # 2x2 patches per token, patch embedding input 3*2*2*2 = 24 per patch; hv=4, intermediate 8, 2 blocks:
    # per patch 24 + 2 x (11*4 + 2*8 = 60) = 144 (checkpointed 24 + 2*4 = 32); mergers 16*4 + 12*4*1 = 112
    vision = VisionTowerConfig(depth=2, hidden_size=4, num_heads=1, intermediate_size=8, patch_size=2,
                               deepstack_visual_indexes=[0])
    assert vision_tower_bytes_per_token(vision, act=2, checkpointed=False) == 2 * (4 * 144 + 112)
    assert vision_tower_bytes_per_token(vision, act=2, checkpointed=True) == 2 * (4 * 32 + 112)


def test_towers_worst_case_and_frozen_towers_keep_nothing():
    model = ThinkerConfig(**{**MODEL.__dict__, "towers": True, "num_layers": 2,
                           "audio_tower": AudioTowerConfig(num_layers=2, d_model=4, num_heads=1, ffn_dim=8,
                                                           num_mel_bins=16, n_window=2,
                                                           downsample_hidden_size=3),
                           "vision_tower": VisionTowerConfig(depth=2, hidden_size=4, num_heads=1,
                                                             intermediate_size=8, patch_size=2,
                                                             deepstack_visual_indexes=[0])})
    trainer = _trainer()
    audio_only = StageConfig(name="s", trainable=["^audio_tower\\."])
    (estimate,) = estimate_memory(model, ParallelConfig(ep=2), trainer, audio_only, 4, document_mask=True)
    # 16 tokens, 1 token per audio chunk -> 16 chunks of 632 bytes; the frozen vision tower keeps nothing
    assert _items(estimate)["tower activations"] == 16 * 632
    (estimate,) = estimate_memory(model, ParallelConfig(ep=2), trainer, EVERYTHING, 4, document_mask=True)
    assert _items(estimate)["tower activations"] == max(16 * 632, 16 * 1376)  # vision is the worse here
    lm_only = StageConfig(name="s", trainable=["^language_model\\."])
    (estimate,) = estimate_memory(model, ParallelConfig(ep=2), trainer, lm_only, 4, document_mask=True)
    assert "tower activations" not in _items(estimate)


# ---------------------------------------------------------------------------------------------------
# Anchored to measured peaks: tests/fixtures/measured_memory_h200.jsonl holds one multimodal Thinker step
# per row, measured on the lent H200 (`bash benchmarks/arch_check.sh memory`, 2026-12-03: 30B-A3B widths
# and towers, 4 LM layers, 32 experts, world size 1, packed documents through their boundaries, the
# micro-batch's tokens all audio or all image placeholders). The estimate must cover the measured peak
# (it is what the dry run promises) and not overshoot it by more than OVERSHOOT where the media are the
# worst case the estimate assumes (audio: its tower term is the larger one); the states at the start of a
# step (weights, grads, optimizer) within STATES_TOLERANCE.
OVERSHOOT = 1.12
STATES_TOLERANCE = 0.03


def _measured():
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "fixtures" / "measured_memory_h200.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_estimate_covers_the_peaks_measured_on_the_device():
    from omegaconf import OmegaConf

    from omni_train.config import compose

    rows = _measured()
    assert len(rows) >= 5 and {r["attention"] for r in rows} == {"packed"}
    for row in rows:
        cfg = OmegaConf.to_object(compose(row["overrides"]))
        stage = cfg.stage
        if stage.phases:  # the probe measures the named phase, else the last
            phase = next(p for p in stage.phases if p.name == row["phase"]) if row["phase"] else stage.phases[-1]
            stage = StageConfig(name=stage.name, trainable=list(phase.trainable), frozen=list(phase.frozen))
        estimate = estimate_memory(cfg.model.thinker, cfg.parallel, cfg.trainer, stage, world_size=1,
                                   document_mask=False, master_weights=cfg.optim.master_weights)[0]
        items = _items(estimate)
        measured = row["measured"]["peak_gb"] * 1e9
        label = f"{row['overrides'][-3:]} {row['media']}"
        assert estimate.total >= measured, label
        if row["media"] == "audio":
            assert estimate.total <= OVERSHOOT * measured, label
        states = items["parameters"] + items["gradients"] + items["optimizer"]
        assert abs(states - row["measured"]["states_gb"] * 1e9) <= STATES_TOLERANCE * states, label
