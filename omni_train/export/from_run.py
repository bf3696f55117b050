"""The Hugging Face files of a run trained from scratch (no `omni-convert import` behind it).

Such a checkpoint has no HF config.json to copy, so export builds one from the run's own config, the
``config.yaml`` the loop writes into the run directory (``<run_dir>/checkpoints/step_N`` -> ``<run_dir>``):

- thinker text config: the LM sizes (``hf_text_config``, the inverse of ``model_config_from_hf``);
- audio / vision config and placeholder ids: ``hf_thinker_config`` with the ids of the data's tokenizer,
  exactly what the stage built the towers from;
- a run of a Talker stage (talker_pretrain / talker_cpt / talker_dpo / speaker_finetune: ``model.talker`` and
  ``model.code2wav`` in its config) exports the whole model, ``enable_audio_output=True``: ``talker_config``
  from ``model.talker`` (``hf_talker_config``) with the data tokenizer's ids (as the stage built it:
  ``talker_with_tokenizer_ids``) and every voice the checkpoint records (speaker_finetune's ``voice.<name>.id``:
  ``export/talker.py checkpoint_voices``) in ``speaker_id``, ``code2wav_config`` from ``model.code2wav``;
- any other run, ``enable_audio_output=False``: the Thinker's stages never touch a Talker or Code2Wav, so none is
  exported and transformers builds none (no untrained weights are invented);
- generation_config.json (greedy, stops at ``<|im_end|>``) and the tokenizer, with a ChatML chat
  template when it has none, so ``AutoTokenizer.from_pretrained(out).apply_chat_template`` gives the
  layout the model was trained on.

A text-only run (``model.thinker.towers=false``) is refused: the Qwen3-Omni layout needs both towers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig, Qwen3OmniMoeConfig

from omni_train.config.schema import ThinkerConfig
from omni_train.config.talker import Code2WavConfig, TalkerConfig, check_talker_config
from omni_train.data.chat import ChatEncoder
from omni_train.data.talker_batch import talker_with_tokenizer_ids
from omni_train.export.talker import checkpoint_voices
from omni_train.models.talker.hf_config import hf_talker_config, hf_top_level_ids
from omni_train.models.thinker.bridge import hf_text_config
from omni_train.models.thinker.hf_config import hf_thinker_config

RUN_CONFIG = "config.yaml"
ARCHITECTURE = "Qwen3OmniMoeForConditionalGeneration"
# The layout ChatEncoder writes (omni_train/data/chat.py), for string contents.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_TALKER_NOTE = ("no talker / code2wav exported (enable_audio_output=false): this run trained the Thinker "
                  "only; transformers loads it for text output")


@dataclass
class RunSource:
    """What export needs from a run directory: the LM sizes, the HF config, the tokenizer."""

    model: ThinkerConfig
    hf_config: Qwen3OmniMoeConfig
    encoder: ChatEncoder  # the data's tokenizer and its special token ids
    talker: Optional[TalkerConfig] = None  # set: a Talker stage's run, exported with its Talker and Code2Wav


def run_config_path(ckpt: Path) -> Path:
    """``<run_dir>/config.yaml`` for a checkpoint ``<run_dir>/checkpoints/step_N``."""
    return Path(ckpt).resolve().parent.parent / RUN_CONFIG


def read_run(ckpt: Path) -> RunSource:
    """The HF config and tokenizer of the run that wrote ``ckpt``; raises naming what is missing."""
    path = run_config_path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"{ckpt}: no HF provenance in its marker and no run config at {path} "
                                "(a run trained from scratch exports from <run_dir>/config.yaml)")
    loaded = OmegaConf.load(path)
    if "model" not in loaded:
        raise ValueError(f"{path}: no 'model' section")
    # runs written before the model config held sections keep the Thinker's sizes at its top level
    sizes = loaded.model.thinker if "thinker" in loaded.model else loaded.model
    sizes = {k: v for k, v in OmegaConf.to_container(sizes).items() if k != "flavor"}
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ThinkerConfig), sizes))
    if not model.towers:
        raise ValueError(f"{path}: model.thinker.towers=false: a text-only Thinker LM has no audio / vision towers, "
                         f"which {ARCHITECTURE} needs; export a run with towers (e.g. model=tiny_omni)")
    tokenizer_dir = OmegaConf.select(loaded, "data.tokenizer")
    if not tokenizer_dir:
        raise ValueError(f"{path}: data.tokenizer is not set (placeholder ids and the exported tokenizer "
                         "come from it)")
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"{path}: data.tokenizer={tokenizer_dir} is not a directory "
                                f"(relative paths are read from {Path.cwd()})")
    encoder = ChatEncoder.from_pretrained(tokenizer_dir)
    if len(encoder.tokenizer) > model.vocab_size:
        raise ValueError(f"{path}: the tokenizer at {tokenizer_dir} has {len(encoder.tokenizer)} tokens, more "
                         f"than model.thinker.vocab_size={model.vocab_size}")
    talker, code2wav = run_audio_output(loaded, encoder, ckpt, path)
    return RunSource(model, hf_omni_config(model, encoder, talker, code2wav), encoder, talker)


def run_audio_output(loaded, encoder: ChatEncoder, ckpt: Path, path: Path):
    """(TalkerConfig as the stage built it, with the checkpoint's voices; the code2wav_config dict) of a Talker
    stage's run, or (None, None) for a run without ``model.talker``."""
    sizes = OmegaConf.select(loaded, "model.talker")
    if sizes is None:
        return None, None
    if OmegaConf.select(loaded, "model.code2wav") is None:
        raise ValueError(f"{path}: model.talker is set but model.code2wav is not: a run trained from scratch exports "
                         "the Code2Wav its Talker stage built (model.code2wav), and this one has none")
    talker = talker_with_tokenizer_ids(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TalkerConfig), sizes)),
                                       encoder)
    speakers = dict(talker.codec.speakers)
    for name, voice_id in checkpoint_voices(ckpt).items():
        other = next((n for n, i in speakers.items() if i == voice_id and n != name), None)
        if other is not None:
            raise ValueError(f"{ckpt}: voice {name!r} has codec id {voice_id}, model.talker.codec.speakers' {other!r}")
        speakers[name] = voice_id
    talker = dataclasses.replace(talker, codec=dataclasses.replace(talker.codec, speakers=speakers))
    check_talker_config(talker)
    code2wav = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Code2WavConfig), loaded.model.code2wav))
    return talker, code2wav.hf_config()


def _single_token(tokenizer, word: str):
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def hf_omni_config(model: ThinkerConfig, encoder: ChatEncoder, talker: Optional[TalkerConfig] = None,
                   code2wav: Optional[Dict[str, Any]] = None) -> Qwen3OmniMoeConfig:
    """Qwen3OmniMoeConfig of the Thinker (sizes from ``model``, token ids from the encoder's tokenizer) and, given
    ``talker`` and ``code2wav``, its audio output."""
    ids = encoder.ids
    pps = encoder.position_id_per_seconds
    thinker = dict(hf_thinker_config(model, ids), text_config=hf_text_config(model),
                   position_id_per_seconds=int(pps) if float(pps).is_integer() else pps)
    roles = {f"{role}_token_id": _single_token(encoder.tokenizer, role) for role in ("system", "user", "assistant")}
    roles = {k: v for k, v in roles.items() if v is not None}  # read by the talker only
    if "user_token_id" in roles:
        thinker["user_token_id"] = roles["user_token_id"]
    top = dict(im_start_token_id=ids["im_start"], im_end_token_id=ids["im_end"], **roles)
    audio = {"enable_audio_output": False}
    if talker is not None:
        top.update(hf_top_level_ids(talker))
        audio = dict(enable_audio_output=True, talker_config=hf_talker_config(talker), code2wav_config=code2wav)
    config = Qwen3OmniMoeConfig(thinker_config=thinker, **audio, **top)
    config.architectures = [ARCHITECTURE]
    return config


def write_hf_files(run: RunSource, out: Path, dtype: torch.dtype) -> None:
    """config.json, generation_config.json and the tokenizer (with a ChatML template if it has none)."""
    out = Path(out)
    run.hf_config.dtype = dtype
    run.hf_config.save_pretrained(out)
    ids, tokenizer = run.encoder.ids, run.encoder.tokenizer
    GenerationConfig(do_sample=False, eos_token_id=ids["im_end"], pad_token_id=ids["pad"]).save_pretrained(out)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)
