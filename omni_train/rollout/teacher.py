"""The teacher of on-policy distillation: what a recipe must say about it, checked before anything is
built (ConfigError naming the key).

The teacher is the frozen model named ``teacher`` (``stage.frozen_models``). From a Hugging Face directory
(``hf:<dir>``) it may be a Qwen3-Omni model (its Thinker reads every modality) or a text LLM (Qwen3 dense
or MoE): a text teacher with multimodal prompts is refused unless the recipe distils text prompts only
(``stage.loss.text_prompts_only``, which makes the prompt stream skip and count prompts with media).
Teacher and student must share a tokenizer: where the directory holds one, it is compared with
``data.tokenizer`` id for id over the smaller vocabulary (vocabularies that share ids but differ in size
are compared over the shared ids at training time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omni_train.config import ConfigError
from omni_train.config.rollout import DIVERGENCES
from omni_train.models.thinker.hf_sources import SOURCES, TEXT_ONLY, detect_source

TEACHER = "teacher"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_mismatch(student_dir: str, teacher_dir: Path) -> Optional[str]:
    """None when the two tokenizers agree id for id over the smaller vocabulary, else where they differ."""
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(str(student_dir), local_files_only=True).get_vocab()
    teacher = AutoTokenizer.from_pretrained(str(teacher_dir), local_files_only=True).get_vocab()
    small, large = (student, teacher) if len(student) <= len(teacher) else (teacher, student)
    for token, index in sorted(small.items(), key=lambda kv: kv[1]):
        if large.get(token) != index:
            return (f"token {token!r} is id {student.get(token)} in the student's tokenizer and "
                    f"{teacher.get(token)} in the teacher's")
    return None


def check_teacher(cfg) -> None:
    stage, loss = cfg.stage, cfg.stage.loss
    specs = [spec for spec in stage.frozen_models if spec.name == TEACHER]
    if not specs:
        raise ConfigError("stage.frozen_models", f"{stage.name} needs a frozen model named {TEACHER!r} "
                                                 "(e.g. {name: teacher, source: 'hf:/path/to/Qwen3-32B'})")
    if loss.divergence not in DIVERGENCES:
        raise ConfigError("stage.loss.divergence", f"{loss.divergence!r}, expected one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= loss.beta <= 1.0:
        raise ConfigError("stage.loss.beta", f"{loss.beta}, must lie in [0, 1]")
    if loss.temperature <= 0:
        raise ConfigError("stage.loss.temperature", f"{loss.temperature}, must be > 0")
    if loss.chunk_tokens < 1:
        raise ConfigError("stage.loss.chunk_tokens", f"{loss.chunk_tokens}, must be >= 1")
    source = specs[0].source
    if not source.startswith("hf:"):
        return  # a checkpoint of ours: the student's tokenizer and a Thinker with towers
    index = stage.frozen_models.index(specs[0])
    key = f"stage.frozen_models[{index}].source"
    hf_dir = Path(source.removeprefix("hf:"))
    if not (hf_dir / "config.json").exists():
        if specs[0].model is None:
            raise ConfigError(key, f"{source!r}: no {hf_dir / 'config.json'} (a teacher not on this machine names "
                                   f"its sizes: stage.frozen_models[{index}].model=<flavor>)")
        from omni_train.planning.frozen_memory import flavor_thinker

        sizes = flavor_thinker(specs[0].model, f"stage.frozen_models[{index}].model")
        kind, arch = ("qwen3_omni_moe", "a Qwen3-Omni Thinker") if sizes.towers else ("qwen3", "a text LLM")
    else:
        try:
            kind = detect_source(hf_dir)
        except ValueError as e:
            raise ConfigError(key, f"{source!r}: {e}") from None
        arch = SOURCES[kind][0]
    if kind in TEXT_ONLY and not loss.text_prompts_only:
        raise ConfigError("stage.loss.text_prompts_only",
                          f"the teacher {source!r} is a text LLM ({arch}) and the prompts may hold audio, images or "
                          "video: set stage.loss.text_prompts_only=true to distil text prompts only")
    if cfg.data.tokenizer and any((hf_dir / name).exists() for name in _TOKENIZER_FILES):
        problem = tokenizer_mismatch(cfg.data.tokenizer, hf_dir)
        if problem:
            raise ConfigError(key, f"the teacher's tokenizer ({hf_dir}) is not the student's (data.tokenizer="
                                   f"{cfg.data.tokenizer}): {problem}")
