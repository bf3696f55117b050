"""The rollout engine's `megatron` backend (megatron-core's static inference path over the trained model, KV
cache in megatron's attention): on CPU in fp32 its greedy responses equal the `hf` backend's (transformers'
generate after a weight sync) on left-padded text batches, its log-probabilities equal those the trainer
recomputes from its own logits (1e-5), and the trained model comes back as it went in. Then the loop's
bookkeeping on scripted logits (stop ids, finish reasons, log-probs before top-k / top-p, seeding) and what
the backend refuses. The GPU figures: benchmarks/rollout_throughput.py (RESULTS.md)."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import TopKLogitsWarper, TopPLogitsWarper

from omni_train.checkpoint.manager import load_model_weights
from omni_train.config.rollout import SamplingConfig
from omni_train.config.schema import ParallelConfig, ThinkerConfig
from omni_train.data.prompts import Prompt, PromptSource
from omni_train.data.shards import chat_encoder
from omni_train.loops.rollout import recompute_logprobs, rollout_microbatches
from omni_train.models.thinker.hf_config import hf_thinker_config
from omni_train.models.thinker.omni import build_omni_thinker
from omni_train.rollout import build_engine
from omni_train.rollout import megatron as mr

GREEDY = SamplingConfig(n=1, temperature=0.0, max_new_tokens=8)


def _model_cfg(cfg):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ThinkerConfig), cfg.model.thinker))


def _text_prompts(cfg, encoder, count):
    """``count`` text prompts of different lengths (so that the batch is left-padded)."""
    source = PromptSource(cfg.data, encoder, max_prompt_tokens=10_000, dp_rank=0, dp_size=1, text_only=True)
    found = {}
    for prompt in source.next_prompts(4 * count):
        found.setdefault(prompt.num_tokens, prompt)
    assert len(found) >= count, f"{len(found)} distinct text prompt lengths in the synthetic data"
    return list(found.values())[:count]


@pytest.fixture
def sharp_omni(megatron_world1, sharp_thinker):
    """tests/posttrain/conftest.py's sharp Thinker (towers included), fp32 on CPU, in training mode."""
    cfg, step = sharp_thinker
    encoder = chat_encoder(cfg.data)
    model_cfg = _model_cfg(cfg)
    model = build_omni_thinker(hf_thinker_config(model_cfg, encoder.ids), model_cfg, ParallelConfig(), device="cpu",
                               params_dtype=torch.float32)
    load_model_weights(step, model)
    return cfg, encoder, model_cfg, model.train()


def test_megatron_backend_equals_hf_backend_and_trainer(sharp_omni):
    cfg, encoder, model_cfg, model = sharp_omni
    prompts = _text_prompts(cfg, encoder, 3)
    hf = build_engine("hf", model_cfg, encoder, "cpu", torch.float32)
    hf.sync(model)
    want = hf.generate(prompts, GREEDY, seed=0)

    engine = build_engine("megatron", model_cfg, encoder, "cpu", torch.float32)
    report = engine.sync(model)
    assert (report.tensors, report.bytes, report.ms) == (0, 0, 0.0) and engine.num_parameters() == 0
    rng = torch.get_rng_state()
    got = engine.generate(prompts, GREEDY, seed=0)
    assert torch.equal(rng, torch.get_rng_state())  # the engine draws from its own generator
    assert model.training and model.language_model.decoder.layers[0].training  # modes restored
    assert [(s.prompt.key, s.token_ids, s.finish_reason) for s in got] == \
        [(s.prompt.key, s.token_ids, s.finish_reason) for s in want]
    assert len({tuple(s.token_ids) for s in got}) == len(got)
    for ours, theirs in zip(got, want):
        assert max(abs(a - b) for a, b in zip(ours.logprobs, theirs.logprobs)) <= 1e-5

    # one row at a time (no padding, no mask) gives the same, and so do the trainer's recomputed log-probs
    alone = build_engine("megatron", model_cfg, encoder, "cpu", torch.float32, generation_batch=1)
    alone.sync(model)
    assert [s.token_ids for s in alone.generate(prompts, GREEDY, seed=0)] == [s.token_ids for s in got]
    micro, where = rollout_microbatches(got, encoder.tokenizer.pad_token_id, seq_length=256, micro_batch_size=2)
    with torch.no_grad():
        recomputed = [recompute_logprobs(model.eval(), batch) for batch in micro]
    for sample, (m, row, start, end) in zip(got, where):
        assert (recomputed[m][row, start:end] - torch.tensor(sample.logprobs)).abs().max() <= 1e-5

    # seeded sampling; the media placeholders are never drawn, however flat the distribution
    sampled = SamplingConfig(n=3, temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=6)
    first = [s.token_ids for s in engine.generate(prompts[:2], sampled, seed=7)]
    assert first == [s.token_ids for s in engine.generate(prompts[:2], sampled, seed=7)]
    assert first != [s.token_ids for s in engine.generate(prompts[:2], sampled, seed=8)]
    placeholders = {encoder.ids[k] for k in ("audio_pad", "image_pad", "video_pad")}
    wide = SamplingConfig(n=8, temperature=3.0, max_new_tokens=8)
    assert not placeholders & {t for s in engine.generate(prompts, wide, seed=1) for t in s.token_ids}


def test_megatron_backend_refuses_media_unsynced_and_split_layouts(sharp_omni, monkeypatch):
    cfg, encoder, model_cfg, model = sharp_omni
    engine = build_engine("megatron", model_cfg, encoder, "cpu", torch.float32)
    text = _text_prompts(cfg, encoder, 1)
    with pytest.raises(RuntimeError, match="before sync"):
        engine.generate(text, GREEDY, seed=0)
    engine.sync(model)
    source = PromptSource(cfg.data, encoder, max_prompt_tokens=10_000, dp_rank=0, dp_size=1)
    media = next(p for p in source.next_prompts(64) if p.media)
    with pytest.raises(ValueError, match="text prompts only"):
        engine.generate(text + [media], GREEDY, seed=0)
    monkeypatch.setattr(mr.parallel_state, "get_expert_model_parallel_world_size", lambda: 2)
    with pytest.raises(NotImplementedError, match="'ep': 2"):
        engine.sync(model)


# ---------------------------------------------------------------------------------------------------
# The loop's bookkeeping on scripted logits (no model)

V, STOP, EXTRA_STOP = 12, 10, 11


def _prompt(key, n):
    return Prompt(key, torch.arange(1, n + 1), torch.arange(n).expand(3, n), [])


def _scripted(script):
    """A step function whose row b emits ``script[b][t]`` (as a very peaked logit) at step t."""
    calls = []

    def step(tokens, positions, mask):
        t = len(calls)
        calls.append((tokens.shape, positions.shape, None if mask is None else mask.shape))
        logits = torch.zeros(len(script), V)
        for b, row in enumerate(script):
            logits[b, row[min(t, len(row) - 1)]] = 20.0
        return logits
    return step, calls


def test_decode_stops_keeps_the_stop_id_and_records_logprobs():
    ids, pads = mr.left_pad([_prompt("a", 3), _prompt("b", 5)], pad_id=0, multiple=4)
    assert ids.tolist() == [[0, 0, 0, 0, 0, 1, 2, 3], [0, 0, 0, 1, 2, 3, 4, 5]] and pads.tolist() == [5, 3]
    step, calls = _scripted([[4, STOP, 5], [EXTRA_STOP, 6]])
    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=6)
    responses = mr.decode(step, ids, pads, sampling, [STOP, EXTRA_STOP], torch.Generator(), check_every=1)
    samples = responses.samples([(_prompt("a", 3), 0), (_prompt("b", 5), 0)])
    assert [s.token_ids for s in samples] == [[4, STOP], [EXTRA_STOP]]
    assert [s.finish_reason for s in samples] == ["stop", "stop"]
    # the prompt at once with the padding masked, then one token per row and step; every step sees the
    # positions of the whole sequence so far
    assert calls == [((2, 8), (2, 8), (2, 1, 8, 8)), ((2, 1), (2, 9), (2, 1, 1, 9))]
    peaked = torch.log_softmax(torch.tensor([20.0] + [0.0] * (V - 1)), 0)[0].item()
    assert samples[0].logprobs == pytest.approx([peaked, peaked])

    step, _ = _scripted([[4, 5, 6]])
    out = mr.decode(step, ids[:1], pads[:1], sampling, [STOP], torch.Generator()).samples([(_prompt("a", 3), 0)])
    assert out[0].token_ids == [4, 5, 6, 6, 6, 6] and out[0].finish_reason == "length"


def test_blocked_mask_hides_padding_and_the_future():
    mask = mr.blocked(torch.tensor([2, 0]), 0, 4)[:, 0]
    allowed = ~mask
    assert allowed[0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert allowed[1].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    decode = ~mr.blocked(torch.tensor([2, 0]), 4, 5)[:, 0, 0]
    assert decode.int().tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_sample_step_logprobs_before_truncation_and_filters_match_transformers():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator) * 3
    sampling = SamplingConfig(temperature=0.7, top_k=5, top_p=0.8)
    never = torch.tensor([0, 1])
    tokens, logprobs = mr.sample_step(logits, sampling, torch.Generator().manual_seed(1), never)
    full = torch.log_softmax(logits / 0.7, dim=-1)
    assert torch.allclose(logprobs, full.gather(1, tokens[:, None]).squeeze(1), atol=1e-6)
    allowed = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(5)(None, logits / 0.7)) > float("-inf")
    assert allowed.gather(1, tokens[:, None]).all() and not torch.isin(tokens, never).any()
    for k, p in ((5, 1.0), (0, 0.8), (3, 0.5)):
        ours = mr.top_p_filter(mr.top_k_filter(logits.clone(), k), p)
        theirs = logits.clone()
        if k:
            theirs = TopKLogitsWarper(k)(None, theirs)
        if p < 1:
            theirs = TopPLogitsWarper(p)(None, theirs)
        assert torch.equal(ours, theirs)
    greedy, greedy_lp = mr.sample_step(logits, SamplingConfig(temperature=0.0), None)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(greedy_lp, torch.log_softmax(logits, -1).max(-1).values, atol=1e-6)
