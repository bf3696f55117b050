"""features.py against transformers' own classes on the same media.

Audio: WhisperFeatureExtractor as Qwen3-Omni configures it, called as Qwen3OmniMoeProcessor calls it.
Image: Qwen2VLImageProcessorPil (the backend transformers uses without torchvision).
Video: Qwen2VLVideoProcessor needs torchvision, which is not installed; its normalisation and patch
order are compared against the image processor frame by frame on frames already at the target size,
and its bicubic antialiased uint8 resize against Pillow's.
"""

import io
import types

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

from omni_train.data.decode import decode_audio, decode_image
from omni_train.data.features import (AudioFeatureConfig, VisionFeatureConfig, audio_features,
                                      audio_in_video_layout, image_patches, num_audio_tokens, resize_frames,
                                      video_patches)

RNG = np.random.default_rng(1234)


def reference_audio(waveform):
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300,
                                 n_fft=400, return_attention_mask=True)
    # Qwen3OmniMoeProcessor.audio_kwargs
    return fe([waveform], sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
              return_tensors="pt")


@pytest.mark.parametrize("num_samples", [401, 12345, 16000, 16000 * 3 + 77, 16000 * 11 + 5])
def test_audio_log_mel_matches_whisper_extractor_exactly(num_samples):
    wav = (RNG.standard_normal(num_samples) * 0.1).astype(np.float32)
    ref = reference_audio(wav)
    ours = audio_features(wav)
    assert ours["input_features"].shape == ref["input_features"].shape[1:]
    assert torch.equal(ours["input_features"], ref["input_features"][0])  # bit-exact
    assert ours["num_frames"] == int(ref["attention_mask"].sum())
    assert ours["num_tokens"] == int(_get_feat_extract_output_lengths(ref["attention_mask"].sum(-1))[0])


def test_audio_features_of_a_decoded_file():
    tone = 0.3 * np.sin(2 * np.pi * 523.25 * np.arange(44100 * 2) / 44100)
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone, 0.5 * tone], axis=1), 44100, format="FLAC")
    wav = decode_audio(buf.getvalue())
    assert torch.equal(audio_features(wav)["input_features"], reference_audio(wav)["input_features"][0])


def test_audio_token_count_formula():
    frames = torch.arange(1, 3001)
    ref = _get_feat_extract_output_lengths(frames, 50)
    assert [num_audio_tokens(int(n)) for n in frames] == ref.tolist()
    assert num_audio_tokens(100) == 13 and num_audio_tokens(1000) == 130  # 12.5 tokens per second


def image_processor(cfg: VisionFeatureConfig):
    return Qwen2VLImageProcessorPil(patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
                                    merge_size=cfg.merge_size, min_pixels=cfg.min_pixels,
                                    max_pixels=cfg.max_pixels, image_mean=list(cfg.image_mean),
                                    image_std=list(cfg.image_std))


CONFIGS = [VisionFeatureConfig(),
           VisionFeatureConfig(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), min_pixels=64 * 64,
                               max_pixels=256 * 256)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("size", [(64, 64), (100, 150), (37, 300), (30, 20), (480, 640), (1100, 900)])
def test_image_patches_match_qwen2vl_image_processor_exactly(cfg, size):
    image = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
    ref = image_processor(cfg)(images=[image], return_tensors="pt")
    ours = image_patches(image, cfg)
    assert list(ours["grid_thw"]) == ref["image_grid_thw"][0].tolist()
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])  # bit-exact
    assert ours["num_tokens"] == int(ref["image_grid_thw"][0].prod()) // cfg.merge_size ** 2


def test_image_patches_of_a_decoded_jpeg():
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(buf, format="JPEG")
    image = decode_image(buf.getvalue())
    ref = image_processor(VisionFeatureConfig())(images=[image], return_tensors="pt")
    assert torch.equal(image_patches(image)["pixel_values"], ref["pixel_values"])


@pytest.mark.parametrize("num_frames", [4, 5])
def test_video_patches_match_image_processor_frame_by_frame(num_frames):
    cfg = VisionFeatureConfig(video_min_pixels=64 * 64, video_max_pixels=128 * 128)
    frames = RNG.integers(0, 256, (num_frames, 64, 96, 3), dtype=np.uint8)  # already a multiple of 32: no resize
    ours = video_patches(frames, cfg, fps=2.0)
    gt = -(-num_frames // 2)
    assert ours["grid_thw"] == (gt, 4, 6) and ours["num_tokens"] == gt * 6
    assert ours["second_per_grid"] == 1.0
    ip = image_processor(VisionFeatureConfig(min_pixels=64 * 64, max_pixels=128 * 128))
    p, tp = cfg.patch_size, cfg.temporal_patch_size
    vid = ours["pixel_values_videos"].reshape(gt, 24, 3, tp, p, p)
    for t in range(gt * tp):
        frame = frames[min(t, num_frames - 1)]  # an odd count repeats the last frame
        ref = ip(images=[frame], return_tensors="pt")["pixel_values"].reshape(24, 3, tp, p, p)[:, :, 0]
        # the video path fuses rescale and normalise in float32: (x - 255*mean) / (255*std)
        torch.testing.assert_close(vid[t // tp, :, :, t % tp], ref, rtol=0, atol=2e-6)


def test_video_resize_is_pillow_bicubic_to_one_level():
    frames = RNG.integers(0, 256, (2, 100, 150, 3), dtype=np.uint8)
    resized = resize_frames(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), 64, 96)
    for t in range(2):
        pil = np.asarray(Image.fromarray(frames[t]).resize((96, 64), Image.BICUBIC)).astype(int)
        diff = np.abs(resized[t].permute(1, 2, 0).numpy().astype(int) - pil)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.02


@pytest.mark.parametrize("grid,spg,num_audio", [((4, 4, 6), 1.0, 50), ((3, 2, 2), 1.015, 7), ((2, 4, 4), 2.0, 0),
                                                ((5, 2, 4), 0.5, 33)])
def test_audio_in_video_interleaving_matches_processor(grid, spg, num_audio):
    fake = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2), audio_bos_token="<",
                                 audio_eos_token=">", video_token="V", audio_token="A")
    ref = Qwen3OmniMoeProcessor.replace_video_with_audio_token(
        fake, {"video_grid_thw": [np.array(grid)], "video_second_per_grid": [spg]}, 0,
        {"num_audio_tokens": [num_audio]}, 0, position_id_per_seconds=13.0)
    layout = audio_in_video_layout(grid, spg, num_audio, 2, 13.0)
    assert "<" + "".join("V" if v else "A" for v in layout) + ">" == ref


def test_configs_from_preprocessor_dict():
    cfg = VisionFeatureConfig.from_dict({"patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "min_pixels": 3136,
                                         "max_pixels": 12845056, "processor_class": "Qwen3OmniMoeProcessor"})
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.max_pixels == 12845056
    cfg = VisionFeatureConfig.from_dict({"size": {"shortest_edge": 1024, "longest_edge": 4096}})
    assert (cfg.min_pixels, cfg.max_pixels) == (1024, 4096)
    assert AudioFeatureConfig.from_dict({"feature_size": 128, "chunk_length": 300}).feature_size == 128
