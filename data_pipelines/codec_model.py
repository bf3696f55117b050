"""The codec that `omni-data codec` runs: a local transformers `MimiModel` directory, checked and batched.

The Talker predicts 16 codebooks of 2048 codes at 12.5 frames/s of 24 kHz audio
(../shared/notes/talker_facts.md, Codec), so a model is refused, naming the config key, unless it is a
`mimi` model with `num_quantizers` >= 16, `sampling_rate` 24000, `frame_rate` 12.5, `codebook_size`
<= 2048 and one audio channel. Only the encoder is loaded (the decoder is dropped from the config).

Batching: audios are sorted by length and right-padded with zeros into one [B, 1, T] call. Mimi's encoder
ignores `padding_mask`, and its strided convolutions pad a sequence whose end does not fill their last
stride, so a padded sample's last frame would be computed from the batch's padding instead of its own
(a random kyutai-sized Mimi, random codebooks: 50-88% of that frame's 16 codes change). A pre-hook on each
encoder convolution therefore sets every position past a sample's own length to what the convolution
pads with when the sample runs alone (zero, or the last value for the `replicate` downsampling); the
transformer is causal, so nothing else sees the padding. What is left is float rounding: a kernel may sum
in another order for another shape (1e-5 on a tiny Mimi), which changes a code only where two codebook
entries are that close to a tie. Measured with the random kyutai-sized Mimi: batched codes equal those of each
audio alone on CPU (6 audios of 1-4 s, 2832 of 2832) and on an H200 (48 audios of 1-12 s in batches of 8,
58,480 of 58,480), and the H200's equal the CPU's; so do the tests' (tests/data_pipelines/test_codec.py).
cuDNN runs deterministic and without TF32, torch's default for convolutions, which rounds them to 10-bit
mantissas (with it, 0.9% of that model's codes differed from fp32's on the H200).
"""

import contextlib
import hashlib
import json
import os
import sys

import numpy as np

from data_pipelines import shards

CODEC_SAMPLING_RATE = 24000
TALKER_CODEBOOKS = 16
TALKER_CODEBOOK_SIZE = 2048
TALKER_FRAME_RATE = 12.5
EXACT_PAD_MODES = ("constant", "replicate")


def check_codec_model(model_dir):
    """The MimiConfig of model_dir, or ValueError naming the config key that does not fit the Talker."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--codec-model {model_dir}: no readable config.json, not a MimiModel directory "
                         f"({type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "mimi":
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise ValueError(f"--codec-model {model_dir}: config `model_type` is {kind!r}, not 'mimi' (a MimiModel "
                         f"directory such as kyutai/mimi)")
    from transformers import MimiConfig

    try:
        config = MimiConfig.from_pretrained(model_dir)
    except Exception as exc:  # the strict config class raises several types for a bad field
        raise ValueError(f"--codec-model {model_dir}: config.json is not a valid MimiConfig: {exc}") from None
    problems = [
        (config.num_quantizers < TALKER_CODEBOOKS, "num_quantizers", config.num_quantizers,
         f"the Talker needs {TALKER_CODEBOOKS} codebooks"),
        (config.sampling_rate != CODEC_SAMPLING_RATE, "sampling_rate", config.sampling_rate,
         f"the Talker's codec runs at {CODEC_SAMPLING_RATE} Hz"),
        (config.frame_rate != TALKER_FRAME_RATE, "frame_rate", config.frame_rate,
         f"the Talker's codec makes {TALKER_FRAME_RATE} frames/s"),
        (config.codebook_size > TALKER_CODEBOOK_SIZE, "codebook_size", config.codebook_size,
         f"the Talker's codec vocabulary has {TALKER_CODEBOOK_SIZE} codes per codebook"),
        (config.audio_channels != 1, "audio_channels", config.audio_channels, "speech is encoded as mono"),
    ]
    for bad, key, value, why in problems:
        if bad:
            raise ValueError(f"--codec-model {model_dir}: config `{key}` is {value}; {why}")
    return config


class MimiCodec:
    """encode([float32 [n] at 24 kHz]) -> [int32 [frames, 16]], in batches of batch_size on device."""

    def __init__(self, model_dir, device="cpu", batch_size=8):
        import torch
        from transformers import MimiModel

        config = check_codec_model(model_dir)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here")
        config.decoder_config = None  # encoding only
        self.config, self.device = config, torch.device(device)
        self.model = MimiModel.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                               local_files_only=True).to(self.device).eval()
        self.identity = model_identity(model_dir)  # what the resume fingerprint knows it by
        self.batch_size, self.calls, self._lengths = max(1, batch_size), 0, None
        self._convs = _encoder_convs(self.model)
        if self.batch_size > 1 and any(c.pad_mode not in EXACT_PAD_MODES for c in self._convs):
            print(f"codec: the encoder pads with {sorted({c.pad_mode for c in self._convs})}: batching could change "
                  f"the codes, encoding one audio at a time", file=sys.stderr)
            self.batch_size = 1
        for i, conv in enumerate(self._convs):
            conv.register_forward_pre_hook(self._pad_like_alone(i))

    def encode(self, waves):
        """Codes of each wave (mono float32 at 24 kHz), ceil(seconds * 12.5) frames each."""
        import torch

        order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
        codes = [None] * len(waves)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            lengths = torch.tensor([len(waves[i]) for i in batch])
            inputs = torch.zeros(len(batch), 1, int(lengths.max()))
            for row, i in enumerate(batch):
                inputs[row, 0, :len(waves[i])] = torch.from_numpy(waves[i])
            out, frames = self._encode(inputs.to(self.device), lengths)
            for row, i in enumerate(batch):
                codes[i] = np.ascontiguousarray(out[row, :, :frames[row]].T.numpy().astype(np.int32))
        return codes

    def _encode(self, inputs, lengths):
        """(codes [B, 16, frames of the longest], frames of each) of one padded batch."""
        import torch

        self.calls += 1
        self._lengths = [lengths.to(self.device)]  # per conv: each sample's input length
        for conv in self._convs[:-1]:
            self._lengths.append(conv._get_output_length(self._lengths[-1]))
        frames = self._convs[-1]._get_output_length(self._lengths[-1]).tolist()
        try:
            with torch.inference_mode(), _exact_kernels():
                return self.model.encode(inputs, num_quantizers=TALKER_CODEBOOKS).audio_codes.cpu(), frames
        finally:
            self._lengths = None

    def _pad_like_alone(self, i):
        """Pre-hook of conv i: past each sample's length, what the conv pads with when it runs alone."""
        import torch

        def hook(conv, args):
            if self._lengths is None:
                return None
            x, valid = args[0], self._lengths[i]
            if bool((valid == x.shape[-1]).all()):
                return None
            beyond = torch.arange(x.shape[-1], device=x.device)[None, None, :] >= valid[:, None, None]
            if conv.pad_mode == "replicate":
                fill = x.gather(-1, (valid - 1).view(-1, 1, 1).expand(-1, x.shape[1], 1))
            else:
                fill = torch.zeros((), dtype=x.dtype, device=x.device)
            return (torch.where(beyond, fill, x),) + tuple(args[1:])

        return hook


def _encoder_convs(model):
    """The encoder's MimiConv1d layers in the order they run (a residual block's shortcut, of stride 1, beside
    its block), the downsampling last."""
    seanet = getattr(model.encoder, "encoder_seanet", None)
    if seanet is None:  # transformers before the encoder/decoder split (5.17): model.encoder is the SEANet
        seanet, downsample = model.encoder, model.downsample
    else:
        downsample = model.encoder.downsample
    from transformers.models.mimi.modeling_mimi import MimiConv1d

    convs = [m for m in seanet.modules() if isinstance(m, MimiConv1d)]  # registered in the order they run
    return convs + ([downsample] if downsample is not None else [])


@contextlib.contextmanager
def _exact_kernels():
    """cuDNN deterministic and without TF32 (its default would round fp32 convolutions to 10-bit mantissas)."""
    import torch

    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        yield


def model_identity(model_dir):
    """sha256 of the codec directory's config and weight files (their names and bytes)."""
    files = {name: shards.file_sha256(os.path.join(model_dir, name)) for name in sorted(os.listdir(model_dir))
             if name == "config.json" or name.endswith((".safetensors", ".bin"))}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8")).hexdigest()
