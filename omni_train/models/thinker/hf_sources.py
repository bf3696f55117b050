"""The Hugging Face layouts a Thinker LM is read from: which architecture ``config.json`` names and where its
text config lives (import, export, verify and the dry run's frozen-model sizes read them here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

# Source layouts: the architecture string config.json must name, and where its text config is.
SOURCES = {
    "qwen3_omni_moe": ("Qwen3OmniMoeForConditionalGeneration", lambda c: c["thinker_config"]["text_config"]),
    "qwen3_moe": ("Qwen3MoeForCausalLM", lambda c: c),
    "qwen3": ("Qwen3ForCausalLM", lambda c: c),  # a dense Qwen3 LM (a teacher): model.thinker.num_experts=0
}
TEXT_ONLY = ("qwen3_moe", "qwen3")  # sources that hold an LM and nothing else


def read_hf_config(root: Path, source: str) -> Tuple[dict, dict]:
    """(config.json, its text config); raises if config.json names another architecture."""
    config = json.loads((Path(root) / "config.json").read_text())
    architecture, text_of = SOURCES[source]
    found = config.get("architectures") or []
    if found != [architecture]:
        raise ValueError(f"unsupported architecture: config.json field 'architectures' is {found}, "
                         f"expected [{architecture!r}]")
    try:
        return config, text_of(config)
    except KeyError as missing:
        raise ValueError(f"config.json has no {missing} (needed for the text config)") from None


def detect_source(hf_dir: Path) -> str:
    """The source layout (a key of SOURCES) that config.json's ``architectures`` names."""
    found = json.loads((Path(hf_dir) / "config.json").read_text()).get("architectures") or []
    for source, (architecture, _) in SOURCES.items():
        if found == [architecture]:
            return source
    expected = " or ".join(repr([architecture]) for architecture, _ in SOURCES.values())
    raise ValueError(f"unsupported architecture: config.json field 'architectures' is {found}, expected {expected}")
