"""transformers' Qwen3-Omni towers as omni-train runs them: attention through compat/transformers_attention.py
(one varlen call per layer on CUDA; here SDPA per window), the sizes-derived inputs precomputed on the host
(models/thinker/tower_plan.py), and the thinker's sync-free scatter of tower outputs. Each against transformers'
own SDPA path or torch's masked_scatter."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoder,
    Qwen3OmniMoeVisionEncoder,
)

from omni_train.compat import transformers_attention as tower_attention
from omni_train.config.schema import ThinkerConfig
from omni_train.models.thinker import tower_plan
from omni_train.models.thinker.omni import _build_tower, _scatter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from test_thinker_vs_transformers import PATCH, tiny_hf_thinker_config  # noqa: E402

LM = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
    mrope_section=[4, 2, 2],
)
CONFIG = tiny_hf_thinker_config(LM)


@pytest.fixture(autouse=True)
def _tower_attention_registered(library_patches):
    """compat.apply_all registers tower_attention.NAME with transformers (init_parallel does in a run)."""


def _audio_inputs():
    g = torch.Generator().manual_seed(1)
    lengths = [250, 130, 401]  # several chunks and attention windows, a partial last one
    features = torch.zeros(len(lengths), CONFIG.audio_config.num_mel_bins, max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        features[i, :, :n] = torch.randn(CONFIG.audio_config.num_mel_bins, n, generator=g)
        mask[i, :n] = 1
    return features, mask


def _vision_inputs():
    g = torch.Generator().manual_seed(2)
    grid = torch.tensor([[1, 4, 6], [2, 2, 4], [1, 8, 8]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * PATCH * PATCH, generator=g)
    return pixels, grid


def _tower(kind: str, attn: str):
    torch.manual_seed(0)
    cls, config = ((Qwen3OmniMoeAudioEncoder, CONFIG.audio_config) if kind == "audio"
                   else (Qwen3OmniMoeVisionEncoder, CONFIG.vision_config))
    return _build_tower(cls, config, "cpu", torch.float32, attn)


def _run(kind: str, tower, plan: bool):
    """Output and every parameter's gradient (of a weighted sum of the output)."""
    if kind == "audio":
        features, mask = _audio_inputs()
        if plan:
            out = tower(None, feature_lens=None, **tower_plan.audio_plan(tower, features, mask)).last_hidden_state
        else:
            flat, lengths = tower_plan.flat_audio(features, mask)
            out = tower(flat, feature_lens=lengths).last_hidden_state
    else:
        pixels, grid = _vision_inputs()
        extra = tower_plan.vision_plan(tower, grid) if plan else {}
        out = tower(pixels, grid_thw=grid, **extra).pooler_output
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["audio", "vision"])
def test_tower_attention_equals_transformers_sdpa_path(kind):
    theirs = _run(kind, _tower(kind, "sdpa"), plan=False)
    tower = _tower(kind, tower_attention.NAME)
    assert tower.config._attn_implementation == tower_attention.NAME
    calls = []
    original = tower_attention.per_window_attention
    try:
        tower_attention.per_window_attention = lambda *a: calls.append(1) or original(*a)
        ours = _run(kind, tower, plan=False)
    finally:
        tower_attention.per_window_attention = original
    layers = CONFIG.audio_config.encoder_layers if kind == "audio" else CONFIG.vision_config.depth
    assert len(calls) == layers  # one call per layer, all windows at once
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) > 10
    for name in theirs[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["audio", "vision"])
def test_precomputed_plan_equals_the_towers_own_work(kind):
    planned = _run(kind, _tower(kind, tower_attention.NAME), plan=True)
    own = _run(kind, _tower(kind, tower_attention.NAME), plan=False)
    assert torch.equal(planned[0], own[0])
    for name in own[1]:
        assert torch.equal(planned[1][name], own[1][name]), name


def test_plans_hold_host_numbers_and_tensors():
    tower = _tower("audio", tower_attention.NAME)
    plan = tower_plan.audio_plan(tower, *_audio_inputs())
    assert isinstance(plan["max_seqlen"], int) and plan["max_seqlen"] > 0
    assert int(plan["cu_seqlens"][-1]) == plan["valid_indices"].numel()
    vision = tower_plan.vision_plan(_tower("vision", tower_attention.NAME), _vision_inputs()[1])
    assert int(vision["cu_seqlens"][-1]) == int(_vision_inputs()[1].prod(-1).sum())


def test_varlen_attention_refuses_what_it_does_not_compute():
    q = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(NotImplementedError, match="causal"):
        tower_attention.varlen_attention(None, q, q, q, is_causal=True, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(NotImplementedError, match="cu_seq_lens"):
        tower_attention.varlen_attention(None, q, q, q, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 3, 6]))
    assert not tower_attention.uses_flash_kernel(q)  # CPU: SDPA per window


def test_scatter_equals_masked_scatter_forward_and_backward():
    g = torch.Generator().manual_seed(5)
    embeds = torch.randn(2, 9, 4, generator=g, requires_grad=True)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:5] = mask[1, 0] = mask[1, 7:9] = True
    features = torch.randn(int(mask.sum()), 4, generator=g, requires_grad=True)
    weights = torch.randn(2, 9, 4, generator=g)
    results = []
    for fn in (_scatter, lambda e, m, f: e.masked_scatter(m[..., None], f)):
        out = fn(embeds, mask, features)
        results.append((out, *torch.autograd.grad((out * weights).sum(), (embeds, features))))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_compiled_tower_layers_equal_eager(inductor_cpu):
    """model.thinker.compile_towers as CUDA runs it (each layer through torch.compile; here inductor's CPU
    backend): the audio tower's output and gradients equal the eager tower's."""
    from omni_train.models.thinker.omni import compile_layers

    eager = _run("audio", _tower("audio", tower_attention.NAME), plan=True)
    tower = _tower("audio", tower_attention.NAME)
    compile_layers(tower)
    compiled = _run("audio", tower, plan=True)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], rtol=1e-4, atol=1e-6, msg=name)
