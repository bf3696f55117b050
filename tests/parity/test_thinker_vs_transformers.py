"""OmniThinker (HF towers + megatron LM) vs transformers' Qwen3-Omni thinker: same weights, same logits.

A tiny random HF thinker (vision depth 2 with two DeepStack levels, 2 audio layers, 4 experts top-2,
GQA) is saved with ``save_pretrained``; the LM goes through thinker_lm_bridge, the towers load by name
(``audio_tower.*`` / ``visual.*``, the on-disk names minus ``thinker.``). Position ids come from the HF
model's own ``get_rope_index`` and both models get the same ones. Logits compared in fp32.
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerForConditionalGeneration,
    _get_feat_extract_output_lengths,
)

from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.models.thinker.omni import build_omni_thinker
from omni_train.models.thinker.bridge import hf_to_megatron

LM = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=3, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2], rope_theta=10000.0, rms_norm_eps=1e-6,
)
AUDIO, IMAGE, VIDEO, VISION_START, AUDIO_START, VISION_END, AUDIO_END = 100, 101, 102, 103, 104, 105, 106
PATCH, MEL, N_WINDOW = 4, 16, 50
PATCH_DIM = 3 * 2 * PATCH * PATCH  # channels * temporal patch * patch * patch
MAX_ABS_DIFF = 1e-4


# A second toy shape: GQA 8/2 with head dim 8, 6 experts top-3, DeepStack into layer 0 only.
LM_B = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=8,
    num_query_groups=2, head_dim=8, num_experts=6, router_topk=3, moe_ffn_hidden_size=16,
    mrope_section=[2, 1, 1], rope_theta=1000000.0, rms_norm_eps=1e-6,
)


def tiny_hf_thinker_config(m: ThinkerConfig, deepstack=(0, 1)) -> Qwen3OmniMoeThinkerConfig:
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
        # n_window stays 50: get_rope_index's audio length formula assumes 13 tokens per 100 frames.
        audio_config=dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                          output_dim=m.hidden_size, n_window=N_WINDOW, num_mel_bins=MEL,
                          downsample_hidden_size=8),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=PATCH,
                           num_position_embeddings=16, out_hidden_size=m.hidden_size,
                           deepstack_visual_indexes=list(deepstack)),
        audio_token_id=AUDIO, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VISION_START, audio_start_token_id=AUDIO_START,
    )


@pytest.fixture(scope="module")
def hf_thinker():
    return random_hf_thinker(tiny_hf_thinker_config(LM))


def random_hf_thinker(config):
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    model.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-trivial norms and router, not the HF init
            is_norm = "norm" in name or ".ln_" in name
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if is_norm else 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_on_disk_state(hf_thinker, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_thinker")
    hf_thinker.save_pretrained(path)
    return {f"thinker.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}


def build_ours(hf_thinker, hf_state, lm=LM):
    model = build_omni_thinker(hf_thinker.config, lm, ParallelConfig(), device="cpu",
                               params_dtype=torch.float32)
    missing, unexpected = model.language_model.load_state_dict(hf_to_megatron(hf_state, lm), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    for tower in ("audio_tower", "visual"):
        prefix = f"thinker.{tower}."
        tower_state = {k[len(prefix):]: v for k, v in hf_state.items() if k.startswith(prefix)}
        getattr(model, tower).load_state_dict(tower_state, strict=True)
    return model.eval()


# ----- inputs: token sequences laid out as the processor does, features of matching sizes ------------


def text(n, gen):
    return torch.randint(0, 96, (n,), generator=gen).tolist()


def audio_len(frames):
    return int(_get_feat_extract_output_lengths(torch.tensor(frames), N_WINDOW))


def vision_len(grid):
    return int(torch.tensor(grid).prod()) // 4  # spatial merge 2 x 2


def pixels(grids, gen):
    rows = sum(int(torch.tensor(g).prod()) for g in grids)
    return torch.randn(rows, PATCH_DIM, generator=gen)


def audio_inputs(frames, gen):
    longest = max(frames)
    mask = torch.zeros(len(frames), longest, dtype=torch.long)
    for i, f in enumerate(frames):
        mask[i, :f] = 1
    features = torch.randn(len(frames), MEL, longest, generator=gen)
    return dict(input_features=features, feature_attention_mask=mask)


def audio_in_video_tokens(grid, frames, second_per_grid, position_id_per_seconds=25):
    """Video and audio tokens interleaved by temporal position (video first on ties), as the processor."""
    per_frame = vision_len((1,) + tuple(grid[1:]))
    video = [(t * second_per_grid * position_id_per_seconds, VIDEO)
             for t in range(grid[0]) for _ in range(per_frame)]
    audio = [(float(a), AUDIO) for a in range(audio_len(frames))]
    merged, v, a = [], 0, 0
    while v < len(video) or a < len(audio):
        if a == len(audio) or (v < len(video) and video[v][0] <= audio[a][0]):
            merged.append(video[v][1])
            v += 1
        else:
            merged.append(audio[a][1])
            a += 1
    return [VISION_START, AUDIO_START] + merged + [AUDIO_END, VISION_END]


IMAGE_GRIDS, VIDEO_GRIDS = [(1, 4, 4), (1, 4, 6)], [(2, 4, 4), (2, 4, 6)]
SECONDS_PER_GRID = torch.tensor([0.08, 0.16])
AUDIO_FRAMES = [130, 60]  # 13 + 4 and 8 audio tokens: a full 100-frame chunk and partial ones


def vision_block(token, grid):
    return [VISION_START] + [token] * vision_len(grid) + [VISION_END]


def text_case(gen):
    return [text(12, gen), text(12, gen)], {}, {}


def audio_case(gen):
    rows = [text(3, gen) + [AUDIO_START] + [AUDIO] * audio_len(f) + [AUDIO_END] + text(20 - audio_len(f), gen)
            for f in AUDIO_FRAMES]
    return rows, audio_inputs(AUDIO_FRAMES, gen), dict(audio_seqlens=torch.tensor(AUDIO_FRAMES))


def image_case(gen):
    rows = [text(2, gen) + vision_block(IMAGE, g) + text(9 - vision_len(g), gen) for g in IMAGE_GRIDS]
    grid = torch.tensor(IMAGE_GRIDS)
    return rows, dict(pixel_values=pixels(IMAGE_GRIDS, gen), image_grid_thw=grid), dict(image_grid_thw=grid)


def video_case(gen):
    rows = [text(2, gen) + vision_block(VIDEO, g) + text(15 - vision_len(g), gen) for g in VIDEO_GRIDS]
    grid = torch.tensor(VIDEO_GRIDS)
    kwargs = dict(pixel_values_videos=pixels(VIDEO_GRIDS, gen), video_grid_thw=grid)
    return rows, kwargs, dict(video_grid_thw=grid, second_per_grids=SECONDS_PER_GRID)


def image_and_video_case(gen):
    rows = []
    for i, v in zip(IMAGE_GRIDS, VIDEO_GRIDS):
        rest = 30 - vision_len(i) - vision_len(v)
        middle = vision_block(IMAGE, i) + text(1, gen) + vision_block(VIDEO, v)
        rows.append(text(2, gen) + middle + text(rest, gen))
    ig, vg = torch.tensor(IMAGE_GRIDS), torch.tensor(VIDEO_GRIDS)
    kwargs = dict(pixel_values=pixels(IMAGE_GRIDS, gen), image_grid_thw=ig,
                  pixel_values_videos=pixels(VIDEO_GRIDS, gen), video_grid_thw=vg)
    return rows, kwargs, dict(image_grid_thw=ig, video_grid_thw=vg, second_per_grids=SECONDS_PER_GRID)


def video_with_audio_case(gen):
    rows = []
    for g, f, s in zip(VIDEO_GRIDS, AUDIO_FRAMES, SECONDS_PER_GRID.tolist()):
        mixed = audio_in_video_tokens(g, f, s)
        rows.append(text(2, gen) + mixed + text(40 - len(mixed), gen))
    grid = torch.tensor(VIDEO_GRIDS)
    kwargs = dict(pixel_values_videos=pixels(VIDEO_GRIDS, gen), video_grid_thw=grid,
                  **audio_inputs(AUDIO_FRAMES, gen))
    rope = dict(video_grid_thw=grid, second_per_grids=SECONDS_PER_GRID, use_audio_in_video=True,
                audio_seqlens=torch.tensor(AUDIO_FRAMES))
    return rows, kwargs, rope


CASE_BUILDERS = {
    "text": text_case, "audio": audio_case, "image": image_case, "video": video_case,
    "image_and_video": image_and_video_case, "video_with_audio": video_with_audio_case,
}


def case_inputs(case):
    """(token rows of equal length, model kwargs, get_rope_index kwargs)."""
    return CASE_BUILDERS[case](torch.Generator().manual_seed(7))


CASES = list(CASE_BUILDERS)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(megatron_world1, hf_thinker, hf_on_disk_state, case):
    ours = build_ours(hf_thinker, hf_on_disk_state)
    rows, kwargs, rope_kwargs = case_inputs(case)
    input_ids = torch.tensor(rows)
    ones = torch.ones_like(input_ids)
    positions, _ = hf_thinker.model.get_rope_index(input_ids, attention_mask=ones, **rope_kwargs)
    assert positions.shape == (3, *input_ids.shape)
    if case not in ("text", "audio"):  # vision grids give distinct temporal / height / width rows
        assert not torch.equal(positions[0], positions[1])
    with torch.no_grad():
        ref = hf_thinker(input_ids=input_ids, attention_mask=ones, position_ids=positions, **kwargs).logits
        got = ours(input_ids, positions, None, **kwargs)
    diff = (got - ref).abs().max().item()
    print(f"\n[thinker parity] {case}: max |logits diff| = {diff:.3e} over {tuple(ref.shape)}")
    assert got.shape == ref.shape
    assert diff <= MAX_ABS_DIFF


@pytest.mark.parametrize("case", ["text", "image_and_video", "video_with_audio"])
def test_logits_match_transformers_second_shape(megatron_world1, tmp_path, case):
    hf_thinker = random_hf_thinker(tiny_hf_thinker_config(LM_B, deepstack=(0,)))
    hf_thinker.save_pretrained(tmp_path)
    state = {f"thinker.{k}": v for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    ours = build_ours(hf_thinker, state, lm=LM_B)
    rows, kwargs, rope_kwargs = case_inputs(case)
    input_ids = torch.tensor(rows)
    ones = torch.ones_like(input_ids)
    positions, _ = hf_thinker.model.get_rope_index(input_ids, attention_mask=ones, **rope_kwargs)
    with torch.no_grad():
        ref = hf_thinker(input_ids=input_ids, attention_mask=ones, position_ids=positions, **kwargs).logits
        got = ours(input_ids, positions, None, **kwargs)
    assert (got - ref).abs().max().item() <= MAX_ABS_DIFF


def test_deepstack_changes_the_logits(megatron_world1, hf_thinker, hf_on_disk_state):
    """Without the DeepStack additions the image logits differ: the hooks are doing real work."""
    ours = build_ours(hf_thinker, hf_on_disk_state)
    rows, kwargs, rope_kwargs = case_inputs("image")
    input_ids = torch.tensor(rows)
    ones = torch.ones_like(input_ids)
    positions, _ = hf_thinker.model.get_rope_index(input_ids, attention_mask=ones, **rope_kwargs)
    with torch.no_grad():
        full = ours(input_ids, positions, None, **kwargs)
        ours.visual.merger_list.apply(lambda m: [p.zero_() for p in m.parameters(recurse=False)])
        without = ours(input_ids, positions, None, **kwargs)
    assert (full - without).abs().max() > 1e-3


def test_text_only_gives_towers_zero_grads(megatron_world1, hf_thinker, hf_on_disk_state):
    """A text-only batch still reaches every tower parameter with an exact zero gradient (DDP needs it),
    and the loss is the one without towers."""
    ours = build_ours(hf_thinker, hf_on_disk_state).train()
    input_ids = torch.randint(0, 96, (2, 10))
    positions = torch.arange(10).expand(3, 2, 10)
    labels = torch.randint(0, 96, (2, 10))
    loss = ours(input_ids, positions, None, labels=labels)
    loss.sum().backward()
    with torch.no_grad():
        plain = ours.language_model(input_ids, positions, None, labels=labels)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    for tower in (ours.audio_tower, ours.visual):
        for name, p in tower.named_parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    assert ours.language_model.embedding.word_embeddings.weight.grad.abs().sum() > 0


def test_placeholder_count_mismatch_is_an_error(megatron_world1, hf_thinker, hf_on_disk_state):
    ours = build_ours(hf_thinker, hf_on_disk_state)
    rows, kwargs, rope_kwargs = case_inputs("image")
    input_ids = torch.tensor(rows)
    input_ids[0, input_ids[0].tolist().index(IMAGE)] = 5  # one image token too few
    with torch.no_grad(), pytest.raises(ValueError, match="image"):
        ours(input_ids, torch.arange(input_ids.shape[1]).expand(3, *input_ids.shape), None, **kwargs)
