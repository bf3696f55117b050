"""The Hugging Face files of a run trained from scratch (no `omni-convert import` behind it).

Such a checkpoint has no HF config.json to copy, so export builds one from the run's own config, the
``config.yaml`` the loop writes into the run directory (``<run_dir>/checkpoints/step_N`` -> ``<run_dir>``):

- thinker text config: the LM sizes (``hf_text_config``, the inverse of ``model_config_from_hf``);
- audio / vision config and placeholder ids: ``hf_thinker_config`` with the ids of the data's tokenizer,
  exactly what the stage built the towers from;
- ``enable_audio_output=False``: the stages that train from scratch never touch a Talker or Code2Wav, so
  none is exported and transformers builds none (no untrained weights are invented);
- generation_config.json (greedy, stops at ``<|im_end|>``) and the tokenizer, with a ChatML chat
  template when it has none, so ``AutoTokenizer.from_pretrained(out).apply_chat_template`` gives the
  layout the model was trained on.

A text-only run (``model.thinker.towers=false``) is refused: the Qwen3-Omni layout needs both towers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig, Qwen3OmniMoeConfig

from omni_train.config.schema import ThinkerConfig
from omni_train.data.chat import ChatEncoder
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
    return RunSource(model, hf_omni_config(model, encoder), encoder)


def _single_token(tokenizer, word: str):
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def hf_omni_config(model: ThinkerConfig, encoder: ChatEncoder) -> Qwen3OmniMoeConfig:
    """Qwen3OmniMoeConfig of the Thinker alone: sizes from ``model``, token ids from the encoder's tokenizer."""
    ids = encoder.ids
    pps = encoder.position_id_per_seconds
    thinker = dict(hf_thinker_config(model, ids), text_config=hf_text_config(model),
                   position_id_per_seconds=int(pps) if float(pps).is_integer() else pps)
    roles = {f"{role}_token_id": _single_token(encoder.tokenizer, role) for role in ("system", "user", "assistant")}
    roles = {k: v for k, v in roles.items() if v is not None}  # read by the talker only
    if "user_token_id" in roles:
        thinker["user_token_id"] = roles["user_token_id"]
    config = Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False,
                                im_start_token_id=ids["im_start"], im_end_token_id=ids["im_end"], **roles)
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
