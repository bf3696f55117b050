"""omni_train.metrics' tower FLOP formulas against FLOPs counted on the real towers.

The towers are transformers' audio and vision encoders built from our tower configs as the stage builds
them (stages/multimodal_pretrain.py). torch's FlopCounterMode counts every matmul, convolution and
attention product of a forward (x 3: the formulas' training convention) and of a forward + backward
with inputs that require grad (so that the first layer's input gradient is computed too, as the
6 x MACs convention assumes). Eager attention: the counter does not see CPU SDPA's kernel.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoder,
    Qwen3OmniMoeVisionEncoder,
)

from omni_train.config import compose
from omni_train.config.schema import AudioTowerConfig, ThinkerConfig, VisionTowerConfig
from omni_train.metrics import audio_tower_flops, vision_tower_flops
from omni_train.models.thinker.hf_config import hf_thinker_config

IDS = dict(audio_pad=1, image_pad=2, video_pad=3, vision_start=4, audio_start=5)


def tiny_omni() -> ThinkerConfig:
    return OmegaConf.to_object(compose(["model=tiny_omni"])).model.thinker


def other_shapes() -> ThinkerConfig:
    """Different widths, mel bins, window ratio (400 / 100: 4 chunks per attention window), patching,
    one DeepStack level, LM width 48."""
    return ThinkerConfig(
        vocab_size=64, hidden_size=48, num_layers=1, num_attention_heads=2, num_query_groups=1,
        head_dim=8, num_experts=2, router_topk=1, moe_ffn_hidden_size=8, towers=True,
        audio_tower=AudioTowerConfig(num_layers=3, d_model=24, num_heads=3, ffn_dim=40, num_mel_bins=80,
                                     n_window=50, n_window_infer=400, downsample_hidden_size=12),
        vision_tower=VisionTowerConfig(depth=3, hidden_size=24, num_heads=3, intermediate_size=56, patch_size=8,
                                       num_position_embeddings=64, deepstack_visual_indexes=[1]),
    )


def towers(model: ThinkerConfig):
    hf = Qwen3OmniMoeThinkerConfig(**hf_thinker_config(model, IDS))
    built = []
    pairs = ((Qwen3OmniMoeAudioEncoder, hf.audio_config), (Qwen3OmniMoeVisionEncoder, hf.vision_config))
    for cls, config in pairs:
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        built.append(cls(config))
    return built


def counted(run, make_input):
    """(3 x forward FLOPs, forward + backward FLOPs with the input requiring grad)."""
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        run(make_input())
    x = make_input().requires_grad_(True)
    with FlopCounterMode(display=False) as training:
        outputs = run(x)
        sum(o.sum() for o in outputs).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    return 3 * forward.get_total_flops(), training.get_total_flops()


@pytest.mark.parametrize("model", [tiny_omni(), other_shapes()], ids=["tiny_omni", "other"])
def test_audio_tower_flops_match_counted(model):
    audio, _ = towers(model)
    mel = model.audio_tower.num_mel_bins
    # 60: one short chunk; 100: one full chunk; 250: a padded last chunk; 1730: 18 chunks, so 2 windows
    # of 104 tokens (tiny_omni) or 5 of 52 (other) plus a remainder
    for frames in (60, 100, 250, 1730):
        def run(x):
            return [audio(x, feature_lens=torch.tensor([frames])).last_hidden_state]

        forward3, training = counted(run, lambda: torch.randn(mel, frames))
        formula = audio_tower_flops(model, frames)
        assert math.isclose(formula, forward3, rel_tol=0.01), (frames, formula, forward3)
        assert math.isclose(formula, training, rel_tol=0.01), (frames, formula, training)


@pytest.mark.parametrize("model", [tiny_omni(), other_shapes()], ids=["tiny_omni", "other"])
def test_vision_tower_flops_match_counted(model):
    _, vision = towers(model)
    v = model.vision_tower
    patch = 3 * v.temporal_patch_size * v.patch_size ** 2
    # an image (t = 1), a wide image, a video of 3 temporal patches (attention within each frame)
    for grid in ((1, 4, 4), (1, 8, 12), (3, 6, 4)):
        def run(x):
            out = vision(x, grid_thw=torch.tensor([grid]))
            return [out.pooler_output, *out.deepstack_features]

        forward3, training = counted(run, lambda: torch.randn(math.prod(grid), patch))
        formula = vision_tower_flops(model, grid)
        assert math.isclose(formula, forward3, rel_tol=0.01), (grid, formula, forward3)
        assert math.isclose(formula, training, rel_tol=0.01), (grid, formula, training)


def released_widths() -> ThinkerConfig:
    """The 30B-A3B towers' widths (conf/model/qwen3_omni_30b_a3b.yaml) at depth 1 (depth enters the
    formulas linearly), one DeepStack level."""
    return OmegaConf.to_object(compose([
        "model=qwen3_omni_30b_a3b", "model.thinker.num_layers=1", "model.thinker.audio_tower.num_layers=1",
        "model.thinker.vision_tower.depth=1", "model.thinker.vision_tower.deepstack_visual_indexes=[0]"])).model.thinker


def test_released_widths_match_counted():
    model = released_widths()
    assert (model.audio_tower.d_model, model.vision_tower.hidden_size, model.hidden_size) == (1280, 1152, 2048)
    audio, vision = towers(model)
    frames, grid = 250, (1, 4, 6)
    forward3, training = counted(lambda x: [audio(x, feature_lens=torch.tensor([frames])).last_hidden_state],
                                 lambda: torch.randn(128, frames))
    assert math.isclose(audio_tower_flops(model, frames), forward3, rel_tol=0.01)
    assert math.isclose(audio_tower_flops(model, frames), training, rel_tol=0.01)

    def run(x):
        out = vision(x, grid_thw=torch.tensor([grid]))
        return [out.pooler_output, *out.deepstack_features]

    forward3, training = counted(run, lambda: torch.randn(math.prod(grid), 3 * 2 * 16 * 16))
    assert math.isclose(vision_tower_flops(model, grid), forward3, rel_tol=0.01)
    assert math.isclose(vision_tower_flops(model, grid), training, rel_tol=0.01)
