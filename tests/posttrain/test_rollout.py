"""The rollout engine's `hf` backend against transformers: after a weight sync from our model, its greedy
responses equal transformers' own `generate` on the exported checkpoint (text, audio and image prompts),
and the log-probabilities it records equal those our trainer recomputes from its own logits (1e-5, fp32).
Sampling is seeded; bad prompts are skipped and counted; the sync covers every parameter."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from omni_train.checkpoint.manager import load_model_weights
from omni_train.config.rollout import SamplingConfig
from omni_train.config.schema import ParallelConfig, ThinkerConfig
from omni_train.data.errors import SampleError
from omni_train.data.prompts import PromptSource, encode_prompt
from omni_train.data.shards import chat_encoder
from omni_train.export.convert import export_hf
from omni_train.export.generate import load_export
from omni_train.data.media_batch import collate_media
from omni_train.loops.rollout import recompute_logprobs, rollout_microbatches
from omni_train.models.thinker.hf_config import hf_thinker_config
from omni_train.models.thinker.omni import build_omni_thinker
from omni_train.rollout import build_engine
from omni_train.parallel.setup import init_parallel, shutdown_parallel
from tests.conftest import free_port

GREEDY = SamplingConfig(n=1, temperature=0.0, max_new_tokens=6)


def _model_cfg(cfg):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ThinkerConfig), cfg.model.thinker))


def _prompts(cfg, encoder, kinds, count_per_kind=1):
    source = PromptSource(cfg.data, encoder, max_prompt_tokens=10_000, dp_rank=0, dp_size=1)
    found = {}
    for _ in range(64):
        prompt = source.next_prompts(1)[0]
        kind = "+".join(sorted({m.kind for m in prompt.media})) or "text"
        if kind in kinds and len(found.get(kind, [])) < count_per_kind:
            found.setdefault(kind, []).append(prompt)
        if all(len(found.get(k, [])) == count_per_kind for k in kinds):
            break
    assert set(found) == set(kinds), f"the synthetic SFT data has no {set(kinds) - set(found)} prompt"
    return [p for k in kinds for p in found[k]]


@pytest.fixture(scope="module")
def exported(sharp_thinker, tmp_path_factory):
    """tests/posttrain/conftest.py's sharp Thinker exported, and transformers' greedy responses of the
    export to a text, an audio and an image prompt (its own `generate`)."""
    cfg, step = sharp_thinker
    encoder = chat_encoder(cfg.data)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_parallel(ParallelConfig(), torch.device("cpu"), seed=0)
    try:
        reference, _ = load_export(export_hf(step, tmp_path_factory.mktemp("export") / "hf"))
    finally:
        shutdown_parallel()
    prompts = _prompts(cfg, encoder, ["text", "audio", "image"])
    expected = []
    for prompt in prompts:
        towers = {k: v for k, v in collate_media(prompt.media).items() if v is not None}
        new = reference.thinker.generate(
            input_ids=prompt.input_ids[None], attention_mask=torch.ones_like(prompt.input_ids)[None], **towers,
            max_new_tokens=GREEDY.max_new_tokens, do_sample=False, eos_token_id=[encoder.ids["im_end"]],
            pad_token_id=encoder.ids["pad"])[0, prompt.num_tokens:].tolist()
        expected.append(new[: new.index(encoder.ids["im_end"]) + 1] if encoder.ids["im_end"] in new else new)
    return cfg, step, prompts, expected


def check_rollout(model, cfg, prompts, expected):
    """The hf backend synced from `model` answers `prompts` greedily with `expected` (transformers' answers),
    with the finish reasons those imply, and its log-probabilities equal the ones `model` recomputes."""
    encoder = chat_encoder(cfg.data)
    engine = build_engine("hf", _model_cfg(cfg), encoder, "cpu", torch.float32)
    report = engine.sync(model)
    assert report.tensors == len(list(engine.model.parameters())) and report.ms > 0
    samples = engine.generate(prompts, GREEDY, seed=0)
    assert [s.prompt.key for s in samples] == [p.key for p in prompts]
    for sample, want in zip(samples, expected):
        assert sample.token_ids == want, (sample.prompt.key, sample.token_ids, want)
        assert sample.finish_reason == ("stop" if want[-1] == encoder.ids["im_end"] else "length")
    # the trainer's log-probabilities of the sampled tokens, from our model's logits on the packed samples
    micro, where = rollout_microbatches(samples, encoder.tokenizer.pad_token_id, seq_length=256, micro_batch_size=2)
    with torch.no_grad():
        recomputed = [recompute_logprobs(model, batch) for batch in micro]
    for i, (sample, (m, row, start, end)) in enumerate(zip(samples, where)):
        assert (micro[m]["sample_ids"][row, start:end] == i).all()
        got, want = recomputed[m][row, start:end], torch.tensor(sample.logprobs)
        assert (got - want).abs().max() <= 1e-5, (sample.prompt.key, got, want)
    return engine


def test_hf_backend_greedy_equals_transformers_and_the_trainer(megatron_world1, exported):
    cfg, step, prompts, expected = exported
    encoder = chat_encoder(cfg.data)
    model_cfg = _model_cfg(cfg)
    ours = build_omni_thinker(hf_thinker_config(model_cfg, encoder.ids), model_cfg, ParallelConfig(), device="cpu",
                              params_dtype=torch.float32).eval()
    load_model_weights(step, ours)
    engine = check_rollout(ours, cfg, prompts, expected)
    assert any(len(e) > 2 for e in expected) and len({tuple(e) for e in expected}) == len(expected)

    # seeded sampling: the same seed draws the same responses, another seed other ones
    sampled = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6)
    first = [s.token_ids for s in engine.generate(prompts[:1], sampled, seed=7)]
    assert first == [s.token_ids for s in engine.generate(prompts[:1], sampled, seed=7)]
    assert first != [s.token_ids for s in engine.generate(prompts[:1], sampled, seed=8)]
    # the media placeholders are never sampled (a random model would pick them now and then)
    placeholders = {encoder.ids[k] for k in ("audio_pad", "image_pad", "video_pad")}
    wide = SamplingConfig(n=8, temperature=3.0, max_new_tokens=8)
    assert not placeholders & {t for s in engine.generate(prompts, wide, seed=1) for t in s.token_ids}


def _ep2_worker(rank, port, cfg, step, prompts, expected):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    init_parallel(ParallelConfig(ep=2), torch.device("cpu"), seed=0)
    try:
        encoder = chat_encoder(cfg.data)
        model_cfg = _model_cfg(cfg)
        ours = build_omni_thinker(hf_thinker_config(model_cfg, encoder.ids), model_cfg, ParallelConfig(ep=2),
                                  device="cpu", params_dtype=torch.float32).eval()
        assert ours.language_model.decoder.layers[0].mlp.experts.num_local_experts == model_cfg.num_experts // 2
        load_model_weights(step, ours)
        check_rollout(ours, cfg, prompts, expected)
    finally:
        shutdown_parallel()


def test_hf_backend_at_expert_parallel_2(exported):
    """Two processes, half of the experts each: the sync gathers them, and the answers and log-probabilities
    are transformers' as at ep=1."""
    cfg, step, prompts, expected = exported
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_ep2_worker, args=(free_port(), cfg, step, prompts, expected), nprocs=2, join=True)


def test_prompts_drop_the_final_answer_and_skip_long_ones(sharp_thinker):
    cfg, _ = sharp_thinker
    encoder = chat_encoder(cfg.data)
    messages = [{"role": "user", "content": "what is two plus two?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nfour"}]
    prompt = encode_prompt({"__key__": "k", "messages": messages, "answer": "4"}, encoder, 1000)
    text = encoder.tokenizer.decode(prompt.input_ids.tolist())
    assert text.endswith("<|im_start|>assistant\n") and "four" not in text
    assert prompt.reference == "four" and prompt.meta == {"answer": "4"}
    with pytest.raises(SampleError, match="max_prompt_tokens=5"):
        encode_prompt({"__key__": "k", "messages": messages}, encoder, 5)
    source = PromptSource(cfg.data, encoder, max_prompt_tokens=40, dp_rank=0, dp_size=1)
    source.next_prompts(3)
    assert source.stats()["prompts_skipped"] > 0  # the long conversations were skipped and counted
