"""Greedy text generation from an exported model (`omni-convert export`) with transformers alone.

    omni-convert generate EXPORT_DIR --prompt "..." [--max-new-tokens N] [--image FILE] [--audio FILE]

The export loads as ``Qwen3OmniMoeForConditionalGeneration`` (its config says whether a talker is there;
a run trained from scratch has none). The prompt is one ChatML user turn followed by the assistant
header, encoded by the ChatEncoder the training data went through (text, then an optional image and
audio clip as the data pipeline decodes them), so the model sees the layout it was trained on.
Decoding is greedy and stops at ``<|im_end|>``; the result is the decoded new text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from transformers import Qwen3OmniMoeForConditionalGeneration

from omni_train.data.chat import ChatEncoder
from omni_train.data.decode import decode_audio, decode_image
from omni_train.data.media_batch import collate_media


def load_export(export_dir: Path) -> Tuple[Qwen3OmniMoeForConditionalGeneration, ChatEncoder]:
    """(model in eval mode, the encoder of the export's tokenizer)."""
    export_dir = Path(export_dir)
    for name in ("config.json", "tokenizer_config.json"):
        if not (export_dir / name).exists():
            raise FileNotFoundError(f"{export_dir}: no {name} (not an omni-convert export with its tokenizer)")
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(export_dir), local_files_only=True)
    return model.eval(), ChatEncoder.from_pretrained(str(export_dir))


def encode_prompt(encoder: ChatEncoder, prompt: str, image: Optional[Path] = None,
                  audio: Optional[Path] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """A user turn (media first, then the text) + the assistant header -> (input_ids [1, n], tower inputs)."""
    content, media = [], {}
    if image is not None:
        media["image"] = decode_image(Path(image).read_bytes())
        content.append({"type": "image", "image": "image"})
    if audio is not None:
        media["audio"] = decode_audio(Path(audio).read_bytes())
        content.append({"type": "audio", "audio": "audio"})
    content.append({"type": "text", "text": prompt})
    sample = encoder.encode_messages([{"role": "user", "content": content}], media, add_generation_prompt=True)
    towers = {k: v for k, v in collate_media(sample.media).items() if v is not None}
    return sample.input_ids[None], towers


@torch.no_grad()
def generate_ids(model, encoder: ChatEncoder, input_ids: torch.Tensor, max_new_tokens: int,
                 stop_at_eos: bool = True, **towers) -> torch.Tensor:
    """Greedy new token ids [m]: up to ``max_new_tokens``, ending before the first ``<|im_end|>``
    (``stop_at_eos=False``: exactly ``max_new_tokens``, whatever they are)."""
    eos = encoder.ids["im_end"]
    sequences = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), return_audio=False,
        thinker_max_new_tokens=max_new_tokens, thinker_eos_token_id=eos if stop_at_eos else None,
        thinker_pad_token_id=encoder.ids["pad"], thinker_do_sample=False, **towers)
    new = sequences[0, input_ids.shape[1]:]
    return new[:-1] if stop_at_eos and len(new) and int(new[-1]) == eos else new


def generate_text(export_dir: Path, prompt: str, max_new_tokens: int = 32, image: Optional[Path] = None,
                  audio: Optional[Path] = None, stop_at_eos: bool = True) -> str:
    """Load the export, answer ``prompt`` greedily, return the decoded new text. Special tokens are kept
    in the text: an undertrained model's placeholders and markers show up as what they are. The text is
    empty when the first token the model picks is ``<|im_end|>`` (``stop_at_eos=False`` shows what it
    would go on to say)."""
    model, encoder = load_export(export_dir)
    input_ids, towers = encode_prompt(encoder, prompt, image, audio)
    new = generate_ids(model, encoder, input_ids, max_new_tokens, stop_at_eos, **towers)
    return encoder.tokenizer.decode(new.tolist(), skip_special_tokens=False)


@torch.no_grad()
def generate_speech(export_dir: Path, prompt: str, out_wav: Path, speaker: Optional[str] = None,
                    max_new_tokens: int = 32, max_frames: int = 50, image: Optional[Path] = None,
                    audio: Optional[Path] = None) -> Tuple[str, float]:
    """The export's spoken answer to ``prompt``: transformers' ``generate(return_audio=True)``, the Thinker and
    the Talker both greedy (the Talker with generate's repetition penalty), the Talker's codes through the
    export's Code2Wav into a 24 kHz WAV at ``out_wav``. ``speaker``: a name of ``talker_config.speaker_id``
    (None: the first). Returns (the answer's text, seconds of speech)."""
    from omni_train.models.talker.code2wav import SAMPLE_RATE, write_wav

    model, encoder = load_export(export_dir)
    if not model.has_talker:
        raise ValueError(f"{export_dir}: no Talker in the export (enable_audio_output=false): it cannot speak")
    voices = model.config.talker_config.speaker_id
    voice = speaker or next(iter(voices))
    if voice.lower() not in voices:
        raise ValueError(f"{export_dir}: no voice {voice!r} in talker_config.speaker_id ({', '.join(voices)})")
    input_ids, towers = encode_prompt(encoder, prompt, image, audio)
    eos = encoder.ids["im_end"]
    sequences, waveform = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), return_audio=True, speaker=voice,
        thinker_max_new_tokens=max_new_tokens, thinker_eos_token_id=eos, thinker_pad_token_id=encoder.ids["pad"],
        thinker_do_sample=False, talker_do_sample=False, talker_max_new_tokens=max_frames, **towers)
    new = sequences[0, input_ids.shape[1]:]
    new = new[:-1] if len(new) and int(new[-1]) == eos else new
    waveform = waveform.flatten() if waveform is not None else torch.zeros(0)
    write_wav(out_wav, waveform, SAMPLE_RATE)
    return encoder.tokenizer.decode(new.tolist(), skip_special_tokens=False), waveform.numel() / SAMPLE_RATE
