"""Our Talker (megatron MoE backbone + code predictor + conditioning) vs transformers' Qwen3-Omni Talker.

Toy random models of sizes the project never used: a tiny full ``Qwen3OmniMoeForConditionalGeneration``
(thinker, talker, code2wav) per case, its weights through ``save_pretrained`` (the on-disk names our tables
read) into our Talker. Checked:
1. teacher forcing: our sequence inputs equal transformers' (its own ``_get_talker_user_parts`` /
   ``_get_talker_assistant_parts`` driven as ``generate`` drives them, frames summed as its
   ``prepare_inputs_for_generation``); our codebook-0 logits equal its Talker's forward on those
   inputs_embeds; our residual logits equal its code predictor run step by step with a KV cache exactly as
   ``generate`` runs it (prefill [h, emb(c0)], then one code per step through lm_head[step]);
2. the loss: its targets, its parts, gradients into every trained part, megatron's aux loss, padding;
3. ``generate(return_audio=True)`` with greedy settings: the Talker's first-step inputs_embeds and positions
   equal our context built from the same Thinker outputs (and from our own megatron Thinker's captured
   signals), every later step's input equals our frame input, our greedy frames equal its codes, and our
   Code2Wav wrapper gives its waveform;
4. context positions with an image equal the talker's get_rope_index; weight tables and config mappings
   round-trip; the release sizes give the released parameter counts.
fp32 throughout; logits within MAX_ABS_DIFF, inputs within CONTEXT_ATOL.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

from omni_train.config.schema import ParallelConfig, ThinkerConfig
from omni_train.models.talker import conditioning as cond
from omni_train.models.talker.code2wav import build_code2wav
from omni_train.models.talker.config import CodecIds, CodePredictorConfig, TalkerConfig, TextIds
from omni_train.models.talker.generate import greedy_codes
from omni_train.models.talker.hf_config import hf_talker_config, hf_top_level_ids, talker_config_from_hf
from omni_train.models.talker.model import build_talker
from omni_train.models.talker.thinker_signals import capture_thinker_signals, run_to_accept_layer
from omni_train.models.talker.weights import code2wav_to_hf, hf_to_code2wav, hf_to_talker, talker_to_hf
from omni_train.models.thinker.bridge import hf_to_megatron
from omni_train.models.thinker.omni import build_omni_thinker

MAX_ABS_DIFF = 1e-4
CONTEXT_ATOL = 1e-5
THINKER_HIDDEN, MEL = 24, 16
TEXT = TextIds(im_start=110, im_end=111, user=116, assistant=117, tts_pad=112, tts_bos=113, tts_eos=114,
               audio=100, image=101, video=102, vision_start=103, audio_start=104)
SYSTEM, AUDIO_END = 115, 105


def toy_config(case: str) -> TalkerConfig:
    """Two shapes: (a) 5 experts top-2 renormalised, shared expert 14, 5 code groups, accept layer 2;
    (b) 6 experts top-3 not renormalised, shared expert 8, 3 code groups, accept layer 1."""
    codec = CodecIds(pad=1027, bos=1028, eos=1029, nothink=1030, think_bos=1031, think_eos=1032,
                     speakers={"ethan": 1050, "chelsie": 1051})
    if case == "a":
        return TalkerConfig(
            hidden_size=20, num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=6, num_experts=5,
            router_topk=2, norm_topk_prob=True, moe_ffn_hidden_size=12, shared_expert_ffn_hidden_size=14,
            codec_vocab_size=1064, rope_theta=10000.0, mrope_section=[1, 1, 1], thinker_hidden_size=THINKER_HIDDEN,
            projection_ffn_hidden_size=28, accept_hidden_layer=2, num_code_groups=5, codec=codec, text=TEXT,
            code_predictor=CodePredictorConfig(hidden_size=20, num_layers=2, num_attention_heads=2,
                                               num_query_groups=1, head_dim=10, ffn_hidden_size=24,
                                               codebook_size=40, rope_theta=10000.0))
    return TalkerConfig(
        hidden_size=16, num_layers=3, num_attention_heads=2, num_query_groups=1, head_dim=8, num_experts=6,
        router_topk=3, norm_topk_prob=False, moe_ffn_hidden_size=8, shared_expert_ffn_hidden_size=8,
        codec_vocab_size=1060, rope_theta=1_000_000.0, mrope_section=[2, 1, 1],
        thinker_hidden_size=THINKER_HIDDEN, projection_ffn_hidden_size=12, accept_hidden_layer=1,
        num_code_groups=3, codec=codec, text=TEXT,
        code_predictor=CodePredictorConfig(hidden_size=16, num_layers=1, num_attention_heads=4, num_query_groups=2,
                                           head_dim=4, ffn_hidden_size=20, codebook_size=24))


def tiny_omni(cfg: TalkerConfig, seed: int = 0) -> Qwen3OmniMoeForConditionalGeneration:
    text = dict(vocab_size=160, hidden_size=THINKER_HIDDEN, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, moe_intermediate_size=12, num_experts=3, num_experts_per_tok=2,
                norm_topk_prob=True, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                     interleaved=True))
    thinker = dict(text_config=text, audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                                       encoder_ffn_dim=32, output_dim=THINKER_HIDDEN, n_window=50,
                                                       num_mel_bins=MEL, downsample_hidden_size=8),
                   vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                      out_hidden_size=THINKER_HIDDEN, deepstack_visual_indexes=[0]),
                   audio_token_id=TEXT.audio, image_token_id=TEXT.image, video_token_id=TEXT.video,
                   vision_start_token_id=TEXT.vision_start, audio_start_token_id=TEXT.audio_start)
    code2wav = dict(codebook_size=cfg.code_predictor.codebook_size, hidden_size=16, num_attention_heads=2,
                    num_key_value_heads=2, intermediate_size=32, num_hidden_layers=1,
                    num_quantizers=cfg.num_code_groups, upsample_rates=[3, 2], upsampling_ratios=[2],
                    decoder_dim=16, sliding_window=8)
    config = Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=hf_talker_config(cfg),
                                code2wav_config=code2wav, system_token_id=SYSTEM, **hf_top_level_ids(cfg))
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config)
    with torch.no_grad():  # non-trivial norms, router and gates, not the HF init
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model.eval()


def on_disk_state(model, path):
    model.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


def build_ours(cfg: TalkerConfig, hf_state):
    talker = build_talker(cfg, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    missing, unexpected = talker.load_state_dict(hf_to_talker(hf_state, cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return talker.eval()


# ----- transformers' side, driven as generate drives it ------------------------------------------------


def hf_context(hf, input_ids, thinker_embed, thinker_hidden, speaker_id):
    """generate's step 2 ("Prepare talker input") for one conversation: ``input_ids`` [1, S] is the prompt
    plus the generated reply whose last token is the Thinker's eos, which generate never embeds
    (``thinker_embed`` / ``thinker_hidden`` [1, S-1, Ht]). -> (inputs_embeds [1, L0, H], trailing, tts_pad)."""
    config, length = hf.config, input_ids.shape[1]
    start = int(((input_ids[0, :-1] == config.im_start_token_id)
                 & (input_ids[0, 1:] == config.assistant_token_id)).nonzero().flatten()[-1])
    prompt = input_ids[:, :start + 3]
    mm = ((input_ids == config.thinker_config.audio_token_id) | (input_ids == config.thinker_config.image_token_id)
          | (input_ids == config.thinker_config.video_token_id))
    positions = torch.arange(prompt.shape[1]).unsqueeze(0)
    im_start = torch.where(prompt == config.im_start_token_id, positions, torch.full_like(positions, -1))
    latest = torch.cummax(im_start, dim=-1).values.clamp_min(0)
    user = prompt.gather(1, (latest + 1).clamp_max(prompt.shape[1] - 1)) == config.user_token_id
    user_index = torch.where(user, prompt.shape[1] + positions, positions).argsort(dim=-1)[:, -int(user.sum()):]
    full_user = hf._get_talker_user_parts(0, prompt.shape[1], mm, thinker_hidden, thinker_embed)
    user_embeds = full_user.gather(1, user_index.unsqueeze(-1).expand(-1, -1, full_user.shape[-1]))
    special = torch.tensor([[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]])
    tts_bos, tts_eos, tts_pad = hf.talker.text_projection(hf.thinker.get_input_embeddings()(special)).chunk(3, 1)
    assistant, _, trailing = hf._get_talker_assistant_parts(start, length, speaker_id, thinker_embed, tts_pad,
                                                            tts_bos, tts_eos)
    return torch.cat([user_embeds, assistant], dim=1), trailing, tts_pad


def hf_frame_input(hf, frame, step, trailing, tts_pad):
    """prepare_inputs_for_generation: summed codec embeddings of one frame [G] + its text entry -> [H]."""
    embeds = [hf.talker.get_input_embeddings()(frame[:1])]
    embeds += [hf.talker.code_predictor.get_input_embeddings()[j - 1](frame[j:j + 1]) for j in range(1, len(frame))]
    text = trailing[0, step] if step < trailing.shape[1] else tts_pad[0, 0]
    return torch.cat(embeds).sum(0) + text


def hf_residual_logits(hf, states, codes):
    """The code predictor as generate runs it, for every frame at once: prefill [h, emb(c0)] (head 0), then
    codebook j fed through codec_embedding[j-1] with the KV cache (head j)."""
    predictor = hf.talker.code_predictor
    first = torch.stack([states, hf.talker.get_input_embeddings()(codes[:, 0])], dim=1)
    out = predictor(inputs_embeds=first, use_cache=True)
    logits = [out.logits[:, -1]]
    for j in range(1, codes.shape[1] - 1):
        out = predictor(input_ids=codes[:, j:j + 1], past_key_values=out.past_key_values, use_cache=True,
                        generation_steps=out.generation_steps)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


# ----- a conversation --------------------------------------------------------------------------------


def conversation(gen, reply=6):
    """system, user (text), assistant, user (audio placeholders and text), assistant reply + <|im_end|>\\n."""
    t = lambda n: torch.randint(0, 90, (n,), generator=gen).tolist()  # noqa: E731
    ids = [TEXT.im_start, SYSTEM, *t(3), TEXT.im_end, 10]
    ids += [TEXT.im_start, TEXT.user, *t(2), TEXT.im_end, 10, TEXT.im_start, TEXT.assistant, 10, *t(3), TEXT.im_end, 10]
    ids += [TEXT.im_start, TEXT.user, *t(1), TEXT.audio_start, *[TEXT.audio] * 4, AUDIO_END, *t(2), TEXT.im_end, 10]
    ids += [TEXT.im_start, TEXT.assistant, 10, *t(reply), TEXT.im_end, 10]
    return torch.tensor(ids)


@pytest.mark.parametrize("case", ["a", "b"])
def test_teacher_forced_logits_match_transformers(megatron_world1, tmp_path, case):
    cfg = toy_config(case)
    hf = tiny_omni(cfg)
    ours = build_ours(cfg, on_disk_state(hf, tmp_path))
    gen = torch.Generator().manual_seed(3)
    ids = conversation(gen)
    embeds = hf.thinker.get_input_embeddings()(ids).detach()
    hidden = torch.randn(ids.shape[0], THINKER_HIDDEN, generator=gen)
    frames = 7
    codes = torch.randint(0, cfg.code_predictor.codebook_size, (frames, cfg.num_code_groups), generator=gen)
    speaker = "ethan" if case == "a" else "chelsie"
    tts = hf.thinker.get_input_embeddings()(torch.tensor([TEXT.tts_bos, TEXT.tts_eos, TEXT.tts_pad])).detach()
    length = len(cond.context_index(cfg, ids)[0]) + cond.PREFIX_LENGTH + frames
    steps = torch.arange(length)
    positions = torch.stack([steps, steps // 2 + 1, steps % 5 * 2])  # distinct rows: the M-RoPE interleaving
    sample = cond.TalkerSample(ids, embeds, hidden, tts, codes, speaker, position_ids=positions)
    with torch.no_grad():
        got = ours([sample], return_logits=True)
        mine, targets, states, _ = cond.teacher_forced_sequence(ours, cfg, sample)
        # transformers: the sequence ends at <|im_end|> (generated, never embedded); "\n" after it is not there
        end = len(ids) - 1
        context, trailing, tts_pad = hf_context(hf, ids[None, :end], embeds[None, :end - 1], hidden[None, :end - 1],
                                                cfg.codec.speakers[speaker])
        ref_frames = torch.stack([hf_frame_input(hf, codes[k], k, trailing, tts_pad) for k in range(frames)])
        ref_inputs = torch.cat([context[0], ref_frames])
        assert ref_inputs.shape[0] == length
        out = hf.talker(inputs_embeds=ref_inputs[None], position_ids=positions[:, None], output_hidden_states=True)
        ref_states = out.hidden_states[0][-1][0, states]
        ref_residual = hf_residual_logits(hf, ref_states, codes)
    assert (mine - ref_inputs).abs().max() <= CONTEXT_ATOL
    codec0_diff = (got["codec0_logits"] - out.logits).abs().max().item()
    residual_diff = (got["residual_logits"] - ref_residual).abs().max().item()
    print(f"\n[talker parity {case}] inputs {(mine - ref_inputs).abs().max():.2e}, codec0 logits {codec0_diff:.2e} "
          f"{tuple(out.logits.shape)}, residual logits {residual_diff:.2e} {tuple(ref_residual.shape)}")
    assert got["codec0_logits"].shape == out.logits.shape and codec0_diff <= MAX_ABS_DIFF
    assert got["residual_logits"].shape == ref_residual.shape and residual_diff <= MAX_ABS_DIFF
    # targets: prefix position 8 -> C[0,0], frame k -> C[k+1,0], the last frame -> eos
    context_length = length - frames
    expected = torch.cat([codes[:, 0], torch.tensor([cfg.codec.eos])])
    assert torch.equal(targets[context_length - 1:], expected) and (targets[:context_length - 1] == -100).all()
    ref_loss = torch.nn.functional.cross_entropy(out.logits[0, context_length - 1:], expected)
    torch.testing.assert_close(got["loss_codec0"], ref_loss, rtol=1e-5, atol=1e-5)


def test_loss_backward_reaches_every_trainable_part(megatron_world1, tmp_path):
    cfg = toy_config("a")
    ours = build_ours(cfg, on_disk_state(tiny_omni(cfg), tmp_path)).train()
    gen = torch.Generator().manual_seed(5)
    samples = []
    for reply, frames in ((6, 5), (3, 9)):  # two lengths: right padding
        ids = conversation(gen, reply)
        embeds = torch.randn(len(ids), THINKER_HIDDEN, generator=gen)
        codes = torch.randint(0, 40, (frames, cfg.num_code_groups), generator=gen)
        samples.append(cond.TalkerSample(ids, embeds, torch.randn_like(embeds), torch.randn(3, THINKER_HIDDEN), codes,
                                         "ethan"))
    tracker = get_moe_layer_wise_logging_tracker()
    tracker.clear()
    out = ours(samples)
    out["loss"].backward()
    # megatron's load-balancing loss ran in every layer (its gradient enters through the routers)
    aux = tracker["load_balancing_loss"]["values"]
    assert aux.shape == (cfg.num_layers,) and (aux > 0).all()
    assert out["report"]["loss_codec0"][1] == 5 + 1 + 9 + 1
    assert out["report"]["loss_residual"][1] == (5 + 9) * (cfg.num_code_groups - 1)
    torch.testing.assert_close(out["loss"], out["loss_codec0"] + 0.3 * out["loss_residual"])
    for part in ("text_projection", "hidden_projection", "code_predictor", "backbone.embedding",
                 "backbone.output_layer", "shared_experts.gate_weight"):
        grads = [p.grad for n, p in ours.named_parameters() if part in n]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part
    # alone, each conversation gives the same per-part sums (padding reaches nothing)
    with torch.no_grad():
        alone = [ours([s])["report"] for s in samples]
        both = ours(samples)["report"]
    for name in both:
        torch.testing.assert_close(both[name], alone[0][name] + alone[1][name], rtol=1e-5, atol=1e-5)


# ----- generate ---------------------------------------------------------------------------------------


def _stash(obj, name, store):
    """Wrap obj.<name> (a method) to keep its result in store[name]."""
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        store[name] = original(*args, **kwargs)
        return store[name]

    setattr(obj, name, wrapped)


GENERATE_FRAMES = 12


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """transformers' generate(return_audio=True), greedy, on a prompt with an audio in the user turn: the model,
    its on-disk weights, the TalkerConfig (its end-of-turn id set to the Thinker's eos here), the sequences, the
    Thinker's generate result, the Talker's forward kwargs per step, the codes [K, G] and the waveform."""
    cfg = toy_config("a")
    hf = tiny_omni(cfg)
    hf_state = on_disk_state(hf, tmp_path_factory.mktemp("hf_talker"))
    num_audio = int(_get_feat_extract_output_lengths(torch.tensor(60)))
    prompt = torch.tensor([[TEXT.im_start, SYSTEM, 7, 8, TEXT.im_end, 10, TEXT.im_start, TEXT.user, 5, TEXT.audio_start,
                            *[TEXT.audio] * num_audio, AUDIO_END, 6, 7, TEXT.im_end, 10,
                            TEXT.im_start, TEXT.assistant, 10]])
    audio = dict(input_features=torch.randn(1, MEL, 60, generator=torch.Generator().manual_seed(2)),
                 feature_attention_mask=torch.ones(1, 60, dtype=torch.long))
    # the Thinker's greedy reply stops at a token it first emits at step >= 3: its end of turn for this test
    with torch.no_grad():
        reply = hf.thinker.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, **audio)[0, prompt.shape[1]:]
    eos = next(int(t) for i, t in enumerate(reply.tolist()) if i >= 3 and t not in reply[:i].tolist())
    store, calls = {}, []
    _stash(hf.thinker, "generate", store)
    hf.talker.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    hf.code2wav.register_forward_pre_hook(lambda m, a: None if "codes" in store else store.update(codes=a[0]))
    sequences, wav = hf.generate(input_ids=prompt, return_audio=True, speaker="ethan", thinker_max_new_tokens=8,
                                 thinker_do_sample=False, thinker_eos_token_id=eos,
                                 talker_max_new_tokens=GENERATE_FRAMES, talker_do_sample=False, **audio)
    assert int(sequences[0, -1]) == eos
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, im_end=eos))
    media = [SimpleNamespace(kind="audio", span=(9, 9 + num_audio + 2), features={"num_tokens": num_audio})]
    return SimpleNamespace(hf=hf, hf_state=hf_state, cfg=cfg, sequences=sequences, audio=audio, media=media,
                           thinker=store["generate"], calls=calls, codes=store["codes"][0].t(), wav=wav)


def thinker_table(hf, ids):
    return hf.thinker.get_input_embeddings()(ids).detach()


def generate_sample(g):
    """Our TalkerSample from generate's own Thinker outputs. They stop before the eos (never embedded); ours
    reads the whole conversation, so the eos row is appended (its value is not used)."""
    states = g.thinker.hidden_states
    embeds = torch.cat([s[0] for s in states], dim=1)[0]
    hidden = torch.cat([s[g.cfg.accept_hidden_layer] for s in states], dim=1)[0]
    assert embeds.shape[0] == g.sequences.shape[1] - 1
    embeds = torch.cat([embeds, thinker_table(g.hf, g.sequences[0, -1:])])
    hidden = torch.cat([hidden, torch.zeros(1, THINKER_HIDDEN)])
    tts = thinker_table(g.hf, torch.tensor([TEXT.tts_bos, TEXT.tts_eos, TEXT.tts_pad]))
    return cond.TalkerSample(g.sequences[0], embeds, hidden, tts, g.codes, "ethan")


def test_context_and_frame_inputs_match_generate(megatron_world1, generated):
    g = generated
    ours = build_ours(g.cfg, g.hf_state)
    sample = generate_sample(g)
    with torch.no_grad():
        context = cond.build_context(ours, g.cfg, sample)
        first = g.calls[0]["inputs_embeds"][0]
        diff = (context.inputs_embeds - first).abs().max().item()
        frames = cond.frame_embeddings(ours, g.codes) + cond.text_entries(context, g.codes.shape[0])
        steps = torch.cat([c["inputs_embeds"][0] for c in g.calls[1:]])[:g.codes.shape[0]]
        frame_diff = (frames - steps).abs().max().item()
    print(f"\n[talker generate] context {tuple(first.shape)} diff {diff:.2e}, frame inputs diff {frame_diff:.2e}")
    assert context.inputs_embeds.shape == first.shape and diff <= CONTEXT_ATOL
    assert frame_diff <= CONTEXT_ATOL
    # positions: TM-RoPE of the context (the audio moved to its context span) = transformers' rows 1..3
    positions = cond.talker_position_ids(g.cfg, g.sequences[0], g.media)
    assert torch.equal(positions, g.calls[0]["position_ids"][1:, 0].long())


def test_our_thinker_signals_give_generate_context(megatron_world1, generated):
    """The whole chain on our side: our Thinker (megatron LM + towers, weights of the same model) run once over
    the conversation, its signals captured, then our context: transformers' first Talker input."""
    g = generated
    lm = ThinkerConfig(vocab_size=160, hidden_size=THINKER_HIDDEN, num_layers=3, num_attention_heads=2,
                       num_query_groups=1, head_dim=8, num_experts=3, router_topk=2, moe_ffn_hidden_size=12,
                       mrope_section=[2, 1, 1], rope_theta=10000.0)
    thinker = build_omni_thinker(g.hf.thinker.config, lm, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    missing, _ = thinker.language_model.load_state_dict(hf_to_megatron(g.hf_state, lm), strict=False)
    assert all(k.endswith("_extra_state") for k in missing)
    for tower in ("audio_tower", "visual"):
        prefix = f"thinker.{tower}."
        getattr(thinker, tower).load_state_dict({k[len(prefix):]: v for k, v in g.hf_state.items()
                                                 if k.startswith(prefix)})
    ours = build_ours(g.cfg, g.hf_state)
    ids = g.sequences
    with torch.no_grad(), capture_thinker_signals(thinker.language_model, g.cfg.accept_hidden_layer) as signals:
        thinker.eval()(ids, torch.arange(ids.shape[1]).expand(3, 1, -1), None, **g.audio)
        table = thinker.language_model.embedding.word_embeddings.weight
        tts = table[torch.tensor([TEXT.tts_bos, TEXT.tts_eos, TEXT.tts_pad])]
        sample = cond.TalkerSample(ids[0], signals["embeds"][0], signals["hidden"][0], tts, g.codes, "ethan")
        context = cond.build_context(ours, g.cfg, sample)
    diff = (context.inputs_embeds - g.calls[0]["inputs_embeds"][0]).abs().max().item()
    print(f"\n[talker generate] context from our Thinker: diff {diff:.2e}")
    assert diff <= CONTEXT_ATOL
    # what the Talker stages run: the same forward stopped after the accept layer gives the same signals
    with torch.no_grad():
        stopped = run_to_accept_layer(
            lambda: thinker(ids, torch.arange(ids.shape[1]).expand(3, 1, -1), None, **g.audio),
            thinker.language_model, g.cfg.accept_hidden_layer)
    assert torch.equal(stopped["embeds"], signals["embeds"]) and torch.equal(stopped["hidden"], signals["hidden"])


def test_greedy_codes_and_waveform_match_generate(megatron_world1, generated):
    g = generated
    ours = build_ours(g.cfg, g.hf_state)
    with torch.no_grad():
        context = cond.build_context(ours, g.cfg, generate_sample(g))
        positions = cond.talker_position_ids(g.cfg, g.sequences[0], g.media)
        greedy = greedy_codes(ours, context, max_new_tokens=GENERATE_FRAMES, context_positions=positions)
    print(f"\n[talker generate] {g.codes.shape[0]} frames of {g.codes.shape[1]} codes, equal: "
          f"{torch.equal(greedy, g.codes)}")
    assert g.codes.shape[0] >= 3 and torch.equal(greedy, g.codes)

    code2wav = build_code2wav(g.hf.config.code2wav_config)
    code2wav.load_state_dict(hf_to_code2wav(g.hf_state), strict=True)
    assert torch.equal(code2wav.decode(g.codes.t()[None]), g.wav)
    batch = torch.stack([g.codes.t(), g.codes.t().flip(-1)])  # [2, G, T]
    out = code2wav(batch)
    assert out.shape == (2, 1, code2wav.num_samples(g.codes.shape[0]))
    assert code2wav.num_samples(g.codes.shape[0]) < g.codes.shape[0] * code2wav.samples_per_frame
    with torch.no_grad():
        torch.testing.assert_close(out, g.hf.code2wav(batch), rtol=0, atol=0)


def test_positions_match_talker_get_rope_index():
    """Context positions with an image in a user turn (a system turn and an earlier assistant turn dropped
    before it) equal the talker's own get_rope_index over generate's talker_input_ids. (With an audio beside
    the image, transformers 5.23's talker get_rope_index raises: it reads config.audio_config, which the talker
    config lacks; audio alone takes plain positions, checked in the generate test.)"""
    cfg = toy_config("a")
    hf = tiny_omni(cfg)
    grid = (1, 4, 6)  # 6 merged patches
    user = [TEXT.im_start, TEXT.user, 5, TEXT.vision_start, *[TEXT.image] * 6, 106, 7, 8, TEXT.im_end, 10]
    ids = torch.tensor([TEXT.im_start, SYSTEM, 4, TEXT.im_end, 10, TEXT.im_start, TEXT.user, 3, TEXT.im_end, 10,
                        TEXT.im_start, TEXT.assistant, 10, 9, TEXT.im_end, 10, *user,
                        TEXT.im_start, TEXT.assistant, 10, 11, 12, TEXT.im_end])
    at = ids.tolist().index(TEXT.vision_start)
    media = [SimpleNamespace(kind="image", span=(at, at + 8), features={"grid_thw": grid})]
    frames = 4
    got = cond.talker_position_ids(cfg, ids, media, num_frames=frames)
    index, _, _ = cond.context_index(cfg, ids)
    talker_ids = cond.talker_input_ids(cfg, ids, index)[None]
    ref, deltas = hf.talker.get_rope_index(talker_ids, image_grid_thw=torch.tensor([grid]),
                                           attention_mask=torch.ones_like(talker_ids))
    assert not torch.equal(ref[0], ref[1])  # the image's grid: distinct rows
    length = talker_ids.shape[1]
    decode = (torch.arange(length, length + frames) + deltas[0]).expand(3, -1)  # generate's later steps
    assert torch.equal(got, torch.cat([ref[:, 0], decode], dim=1).to(got.dtype))


# ----- tables and configs ----------------------------------------------------------------------------


def test_weight_tables_round_trip(tmp_path):
    cfg = toy_config("b")
    hf_state = on_disk_state(tiny_omni(cfg), tmp_path)
    talker = {k: v for k, v in hf_state.items() if k.startswith("talker.")}
    back = talker_to_hf(hf_to_talker(hf_state, cfg), cfg)
    assert back.keys() == talker.keys()
    assert all(torch.equal(back[k], v) for k, v in talker.items())
    code2wav = {k: v for k, v in hf_state.items() if k.startswith("code2wav.")}
    assert code2wav_to_hf(hf_to_code2wav(hf_state)) == code2wav


@pytest.mark.parametrize("cfg", [TalkerConfig(), toy_config("a"), toy_config("b")], ids=["release", "a", "b"])
def test_config_round_trip(cfg):
    talker = Qwen3OmniMoeConfig(talker_config=hf_talker_config(cfg), **hf_top_level_ids(cfg)).to_dict()
    assert talker_config_from_hf(talker["talker_config"], talker) == cfg


def test_release_parameter_counts():
    """The release sizes give the released Talker: 3.32B in all, of which 3.02B in routed experts and 142M in
    the code predictor (counted on the meta device, nothing allocated)."""
    from transformers import Qwen3OmniMoeTalkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeTalkerForConditionalGeneration

    with torch.device("meta"):
        config = Qwen3OmniMoeTalkerConfig(**hf_talker_config(TalkerConfig()))
        talker = Qwen3OmniMoeTalkerForConditionalGeneration(config)
    predictor = sum(p.numel() for p in talker.code_predictor.parameters())
    total = sum(p.numel() for p in talker.parameters())
    routed = sum(p.numel() for n, p in talker.named_parameters() if ".experts." in n)
    assert (round(total / 1e9, 2), round(routed / 1e9, 2), round(predictor / 1e6)) == (3.32, 3.02, 142)
