"""chat.py: token ids against transformers' apply_chat_template + Qwen3OmniMoeProcessor, and the loss mask."""

import types

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

from omni_train.data.chat import SPECIAL_TOKENS, TOKENIZER_MEDIA_ATTRS, ChatEncoder, build_test_tokenizer
from omni_train.data.decode import DecodedVideo
from omni_train.data.errors import SampleError
from omni_train.data.features import VisionFeatureConfig

# The Qwen3-Omni conventions for these messages, written as a chat template.
TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'audio' and message['role'] != 'assistant' -%}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TEXT_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, what is 12 + 34?"},
    {"role": "assistant", "content": "It is 46. Anything else?"},
    {"role": "user", "content": [{"type": "text", "text": "No. "}, {"type": "text", "text": "Thanks!"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "You're welcome."}]},
]
ASSISTANT_TEXTS = ["It is 46. Anything else?", "You're welcome."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_test_tokenizer(str(path), extra_texts=[m["content"] for m in TEXT_CHAT if isinstance(m["content"], str)])
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return ChatEncoder(tokenizer)


def mask_runs(ids, mask):
    """Contiguous runs of masked token ids."""
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_test_tokenizer_has_qwen_special_tokens(tokenizer):
    for token in SPECIAL_TOKENS.values():
        tid = tokenizer.convert_tokens_to_ids(token)
        assert 0 <= tid < len(tokenizer) and tokenizer.decode([tid]) == token
    assert tokenizer.image_token == "<|image_pad|>" and tokenizer.audio_token_id is not None


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_text_chat_matches_apply_chat_template(tokenizer, encoder, add_generation_prompt):
    messages = TEXT_CHAT[:3] if add_generation_prompt else TEXT_CHAT
    text = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    enc = encoder.encode_messages(messages, {}, add_generation_prompt=add_generation_prompt)
    assert tokenizer.decode(enc.input_ids) == text
    assert enc.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_loss_mask_covers_exactly_assistant_content_and_im_end(tokenizer, encoder):
    enc = encoder.encode_messages(TEXT_CHAT, {})
    runs = mask_runs(enc.input_ids, enc.loss_mask)
    assert [tokenizer.decode(r) for r in runs] == [t + "<|im_end|>" for t in ASSISTANT_TEXTS]
    # each run starts right after "<|im_start|>assistant\n" and is followed by the unmasked "\n"
    ids, mask = enc.input_ids.tolist(), enc.loss_mask.tolist()
    starts = [i for i in range(1, len(ids)) if mask[i] and not mask[i - 1]]
    assert [tokenizer.decode(ids[s - 3:s]) for s in starts] == ["<|im_start|>assistant\n"] * 2
    labels = enc.labels()
    assert (labels[~enc.loss_mask] == -100).all() and torch.equal(labels[enc.loss_mask], enc.input_ids[enc.loss_mask])


def reference_processor(tokenizer, monkeypatch):
    # Qwen3OmniMoeProcessor checks its video processor's class through a mapping that breaks without
    # torchvision; skip that check (the video processor is unused in these calls).
    monkeypatch.setattr(Qwen3OmniMoeProcessor, "check_argument_for_proper_class",
                        lambda self, name, arg: type(arg).__name__)
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=300, return_attention_mask=True)
    ip = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2)
    return Qwen3OmniMoeProcessor(image_processor=ip, video_processor=None, feature_extractor=fe, tokenizer=tokenizer)


def multimodal_chat():
    rng = np.random.default_rng(0)
    media = {"audio0.flac": (rng.standard_normal(16000 * 2 + 300) * 0.1).astype(np.float32),
             "image0.jpg": rng.integers(0, 256, (90, 140, 3), dtype=np.uint8),
             "image1.png": rng.integers(0, 256, (40, 40, 3), dtype=np.uint8),
             "audio1.wav": np.zeros(8000, np.float32), "codec0.npy": np.zeros((5, 16), np.int32)}
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "audio", "audio": "audio0.flac"},
                                     {"type": "image", "image": "image0.jpg"},
                                     {"type": "text", "text": "What do you hear and see?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog barking in a park."},
                                          {"type": "audio", "audio": "audio1.wav", "codec": "codec0.npy"}]},
        {"role": "user", "content": [{"type": "image", "image": "image1.png"}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": "The quick brown fox."},
    ]
    return messages, media


def test_multimodal_chat_matches_qwen3_omni_processor(tokenizer, encoder, monkeypatch):
    messages, media = multimodal_chat()
    enc = encoder.encode({"messages": messages, "media": media, "__key__": "k"})
    text = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False)
    ref = reference_processor(tokenizer, monkeypatch)(
        text=[text], images=[media["image0.jpg"], media["image1.png"]], audio=[media["audio0.flac"]],
        return_tensors="pt")
    assert enc.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert [m.kind for m in enc.media] == ["audio", "image", "image"]
    assert torch.equal(enc.media[0].features["input_features"], ref["input_features"][0])
    pixels = torch.cat([m.features["pixel_values"] for m in enc.media[1:]])
    assert torch.equal(pixels, ref["pixel_values"])
    for item in enc.media:  # spans: start token, placeholders, end token
        s, e = item.span
        assert e - s == item.num_tokens + 2 and not enc.loss_mask[s:e].any()
    assert [t["name"] for t in enc.speech_targets] == ["audio1.wav"]
    assert enc.speech_targets[0]["codec"].shape == (5, 16)
    runs = mask_runs(enc.input_ids, enc.loss_mask)
    assert [tokenizer.decode(r) for r in runs] == ["A dog barking in a park.<|im_end|>",
                                                   "The quick brown fox.<|im_end|>"]


def test_video_with_its_audio_interleaves_like_the_processor(tokenizer):
    cfg = VisionFeatureConfig(video_min_pixels=64 * 64, video_max_pixels=128 * 128)
    encoder = ChatEncoder(tokenizer, vision_cfg=cfg)
    rng = np.random.default_rng(1)
    video = DecodedVideo(frames=rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8),
                         timestamps=np.arange(6) / 2.0, fps=2.0,
                         audio=(rng.standard_normal(16000 * 3) * 0.1).astype(np.float32))
    messages = [{"role": "user", "content": [{"type": "video", "video": "video0.mp4", "use_audio_in_video": True},
                                             {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "A dog."}]
    enc = encoder.encode_messages(messages, {"video0.mp4": video})
    (item,) = enc.media
    feats = item.features
    assert feats["grid_thw"] == (3, 4, 4) and feats["audio"]["num_tokens"] == 39  # 300 frames: 3 x 13
    fake_processor = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2),
                                           **{k: getattr(tokenizer, k) for k in TOKENIZER_MEDIA_ATTRS})
    placeholder = Qwen3OmniMoeProcessor.replace_video_with_audio_token(
        fake_processor, {"video_grid_thw": [np.array(feats["grid_thw"])], "video_second_per_grid": [1.0]}, 0,
        {"num_audio_tokens": [feats["audio"]["num_tokens"]]}, 0, position_id_per_seconds=13.0)
    text = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False)
    text = text.replace("<|video_pad|>", placeholder)
    assert enc.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    s, e = item.span
    assert e - s == item.num_tokens + 4 == 3 * 4 + 39 + 4  # vision_start, audio_start ... audio_end, vision_end
    # without the flag (or a silent video) the video is plain video placeholders
    messages[0]["content"][0]["use_audio_in_video"] = False
    plain = encoder.encode_messages(messages, {"video0.mp4": video})
    assert plain.media[0].num_tokens == 12 and "audio" not in plain.media[0].features


def test_bad_conversations_raise_sample_error(encoder):
    with pytest.raises(SampleError, match="unknown content part"):
        encoder.encode({"__key__": "k", "messages": [{"role": "user", "content": [{"type": "smell"}]}]})
    with pytest.raises(SampleError, match="not decoded"):
        encoder.encode({"__key__": "k", "messages": [{"role": "user", "content": [
            {"type": "image", "image": "image9.jpg"}]}], "media": {}})
    with pytest.raises(SampleError, match="unknown role"):
        encoder.encode({"__key__": "k", "messages": [{"role": "tool", "content": "x"}]})


def test_from_pretrained_local_dir(tmp_path):
    build_test_tokenizer(str(tmp_path))
    encoder = ChatEncoder.from_pretrained(str(tmp_path))
    enc = encoder.encode_messages([{"role": "user", "content": "Hi"}], {})
    assert enc.input_ids[0].item() == encoder.ids["im_start"] and not enc.loss_mask.any()
