"""rope_index.py: TM-RoPE ids of conversations encoded by ChatEncoder, against the get_rope_index of a tiny
random transformers Qwen3-Omni thinker (same token ids, grids, audio lengths, seconds per grid)."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

from omni_train.data.chat import ChatEncoder, build_test_tokenizer
from omni_train.data.decode import DecodedVideo
from omni_train.data.features import AudioFeatureConfig, VisionFeatureConfig
from omni_train.data.packing import Document, SequencePacker
from omni_train.models.thinker.rope_index import rope_deltas, tm_rope_position_ids

PPS = 13  # position_id_per_seconds of the released Qwen3-Omni
# small video pixel bounds keep the grids (and the test) small; the position rules do not depend on them
VISION = VisionFeatureConfig(video_min_pixels=32 * 32, video_max_pixels=64 * 1344)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_test_tokenizer(str(path))
    return ChatEncoder(AutoTokenizer.from_pretrained(str(path)), audio_cfg=AudioFeatureConfig(), vision_cfg=VISION,
                       position_id_per_seconds=PPS)


@pytest.fixture(scope="module")
def hf_thinker(encoder):
    ids = encoder.ids
    text = dict(vocab_size=len(encoder.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                     interleaved=True))
    config = Qwen3OmniMoeThinkerConfig(
        text_config=text,
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          output_dim=32, n_window=encoder.audio_cfg.n_window, downsample_hidden_size=8),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           spatial_merge_size=VISION.merge_size, deepstack_visual_indexes=[0]),
        audio_token_id=ids["audio_pad"], image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], audio_start_token_id=ids["audio_start"],
        position_id_per_seconds=PPS,
    )
    return Qwen3OmniMoeThinkerForConditionalGeneration(config).eval()


def reference(model, enc):
    """get_rope_index on one encoded conversation: ([3, n] float32 ids, delta)."""
    images = [m.features["grid_thw"] for m in enc.media if m.kind == "image"]
    videos = [m for m in enc.media if m.kind == "video"]
    audio_frames = [m.features["num_frames"] if m.kind == "audio" else m.features["audio"]["num_frames"]
                    for m in enc.media if m.kind == "audio" or "audio" in m.features]
    # the reference takes one use_audio_in_video per batch; with True it counts only videos that carry audio
    with_audio = bool(videos) and all("audio" in m.features for m in videos)
    pos, delta = model.get_rope_index(
        enc.input_ids[None], image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor([m.features["grid_thw"] for m in videos]) if videos else None,
        attention_mask=torch.ones(1, len(enc.input_ids), dtype=torch.long), use_audio_in_video=with_audio,
        audio_seqlens=torch.tensor(audio_frames) if audio_frames else None,
        second_per_grids=torch.tensor([m.features["second_per_grid"] for m in videos]) if videos else None)
    return pos[:, 0], delta.reshape(())


def rng_media(seed=0):
    rng = np.random.default_rng(seed)
    frames = lambda t, h, w: rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)  # noqa: E731
    audio = lambda seconds: (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)  # noqa: E731
    return {
        "a0.flac": audio(2.3), "a1.flac": audio(0.7),
        "i0.jpg": frames(1, 90, 140)[0], "i1.png": frames(1, 40, 200)[0],
        "v0.mp4": DecodedVideo(frames(6, 64, 96), np.arange(6) / 2.0, fps=2.0),
        "v1.mp4": DecodedVideo(frames(5, 48, 64), np.arange(5) / 2.0, fps=2.0),  # odd: last frame repeated
        "av0.mp4": DecodedVideo(frames(6, 64, 64), np.arange(6) / 2.0, fps=2.0, audio=audio(3.2)),
        # one wide grid and a short track: the audio tail is written last while the video's width ids are
        # larger, so the reference continues from the audio tail (ids overlap the video's)
        "av_wide.mp4": DecodedVideo(frames(2, 32, 1300), np.arange(2) / 2.0, fps=2.0, audio=audio(0.5)),
        # 3 fps: 2/3 s per grid, fractional temporal ids (float32 in the reference)
        "av_3fps.mp4": DecodedVideo(frames(6, 64, 64), np.arange(6) / 3.0, fps=3.0, audio=audio(2.1)),
        "v_3fps.mp4": DecodedVideo(frames(4, 64, 64), np.arange(4) / 3.0, fps=3.0),
        "v_7fps.mp4": DecodedVideo(frames(32, 32, 32), np.arange(32) / 7.0, fps=7.0),  # 16 grids of 2/7 s
    }


def chat(*parts, answer="A dog barking in a park."):
    content = []
    for p in parts:
        if p.endswith((".flac", ".jpg", ".png", ".mp4")):
            kind = {"f": "audio", "j": "image", "p": "image", "m": "video"}[p.split(".")[1][0]]
            part = {"type": kind, kind: p}
            if p.startswith("av"):
                part["use_audio_in_video"] = True
            content.append(part)
        else:
            content.append({"type": "text", "text": p})
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content}, {"role": "assistant", "content": answer}]


CASES = {
    "text_only": chat("Hello, world! 1234"),
    "audio": chat("a0.flac", "What do you hear?"),
    "image": chat("i0.jpg", "What do you see?"),
    "two_images": chat("i0.jpg", "and", "i1.png", "The quick brown fox."),
    "video": chat("v0.mp4", "What do you see?"),
    "two_videos": chat("v0.mp4", "v1.mp4"),
    "video_with_audio": chat("av0.mp4", "What do you hear and see?"),
    "video_with_short_audio_wide_grid": chat("av_wide.mp4", "What?"),
    "video_with_audio_3fps": chat("av_3fps.mp4", "What?"),
    "video_3fps": chat("v_3fps.mp4", "What?"),
    "video_7fps_16_grids": chat("v_7fps.mp4", "What?"),
    "mix_with_audio_in_video": chat("a0.flac", "i1.png", "Hello", "av0.mp4", "i0.jpg", "av_3fps.mp4", "a1.flac"),
    "mix_plain_videos": chat("i0.jpg", "a1.flac", "v1.mp4", "What do you hear and see?", "v0.mp4", "a0.flac"),
    # not compared: videos with and without their audio in one conversation (the reference takes one
    # use_audio_in_video per batch and miscounts such a mix either way; ours treats each video by its tokens)
}


@pytest.mark.parametrize("name", list(CASES))
def test_position_ids_equal_transformers_get_rope_index(encoder, hf_thinker, name):
    enc = encoder.encode({"__key__": name, "messages": CASES[name], "media": rng_media()})
    ours = enc.position_ids
    ref, ref_delta = reference(hf_thinker, enc)
    assert ours.shape == (3, len(enc.input_ids))
    assert torch.equal(ours.to(ref.dtype), ref)
    whole = torch.equal(ref, ref.round())
    assert ours.dtype == (torch.long if whole else torch.float32)
    assert torch.equal(rope_deltas(ours).to(ref_delta.dtype), ref_delta)


def test_cases_cover_what_they_claim(encoder):
    media = rng_media()
    enc = encoder.encode({"__key__": "k", "messages": CASES["video_with_short_audio_wide_grid"], "media": media})
    (item,) = enc.media
    s, e = item.span
    pos = enc.position_ids
    assert pos[:, s + 2:e - 2].max() > pos[:, e - 2].max()  # the end markers reuse ids below the video's largest
    enc = encoder.encode({"__key__": "k", "messages": CASES["video_with_audio_3fps"], "media": media})
    assert enc.position_ids.dtype == torch.float32 and not torch.equal(enc.position_ids, enc.position_ids.round())
    enc = encoder.encode({"__key__": "k", "messages": CASES["mix_with_audio_in_video"], "media": media})
    assert [m.kind for m in enc.media] == ["audio", "image", "video", "image", "video", "audio"]


@pytest.mark.parametrize("name", ["av0.mp4", "av_wide.mp4", "av_3fps.mp4"])
def test_audio_in_video_ids_follow_the_encoders_placeholder_order(encoder, name):
    """get_rope_index does not read the interleaved order; it must be the one the encoder wrote."""
    enc = encoder.encode({"__key__": "k", "messages": chat(name), "media": rng_media()})
    (item,) = enc.media
    s, e = item.span
    ids, pos = enc.input_ids[s + 2:e - 2], enc.position_ids[:, s + 2:e - 2]
    start = enc.position_ids[0, s + 1] + 1
    audio = pos[:, ids == encoder.ids["audio_pad"]]
    assert audio.shape[1] == item.features["audio"]["num_tokens"]
    assert torch.equal(audio, (torch.arange(audio.shape[1]) + start).expand(3, -1).to(audio.dtype))
    video_t = pos[0, ids == encoder.ids["video_pad"]]
    assert bool((video_t[1:] >= video_t[:-1]).all()) and video_t[0] == start


def test_bad_spans_raise(encoder):
    enc = encoder.encode({"__key__": "k", "messages": CASES["image"], "media": rng_media()})
    kw = dict(image_token_id=encoder.ids["image_pad"], video_token_id=encoder.ids["video_pad"],
              audio_token_id=encoder.ids["audio_pad"], vision_start_token_id=encoder.ids["vision_start"],
              audio_start_token_id=encoder.ids["audio_start"], spatial_merge_size=2, position_id_per_seconds=PPS)
    assert torch.equal(tm_rope_position_ids(enc.input_ids, enc.media, **kw), enc.position_ids)
    (item,) = enc.media
    wrong = type(item)(item.kind, item.name, (item.span[0] + 1, item.span[1]), item.num_tokens, item.features)
    with pytest.raises(ValueError):
        tm_rope_position_ids(enc.input_ids, [wrong], **kw)
    grid = dict(item.features, grid_thw=(1, 2, 2))
    with pytest.raises(ValueError):
        tm_rope_position_ids(enc.input_ids, [type(item)("image", "x", item.span, 1, grid)], **kw)


def test_packing_keeps_each_documents_ids(encoder):
    media = rng_media()
    docs = [encoder.encode({"__key__": n, "messages": CASES[n], "media": media}) for n in ("image", "video")]
    length = sum(len(d.input_ids) for d in docs) + 3
    (seq,) = list(SequencePacker(length, pad_id=0).pack(Document.from_encoded(d) for d in docs))
    bounds = seq.cu_seqlens.tolist()
    for d, s, e in zip(docs, bounds[:-2], bounds[1:-1]):
        assert torch.equal(seq.input_ids[s:e], d.input_ids)
        assert torch.equal(seq.position_ids[:, s:e], d.position_ids)
    assert seq.position_ids.dtype == torch.long
