"""The networks omni-train builds, one folder each, sized by a flavor (conf/model/<flavor>.yaml, one
section per network: ``model.thinker``, and ``model.talker`` in the flavors that carry a Talker).

- ``models/thinker/``: the Thinker's MoE LM provider (megatron-core), its towers, its HF bridge table;
- ``models/talker/``: the Talker's MoE backbone provider, its code predictor, its conditioning on the
  Thinker, Code2Wav carried, its HF tables (its sizes: ``omni_train/config/talker.py``);
- ``models/common/``: the blocks every network shares (attention, rotary, grouped experts, dispatch,
  cross-entropy, MoE load tracking).

Model code never chooses parallel degrees or reads the environment: it receives sizes and a layout.
"""

from pathlib import Path
from typing import Dict

# model config section -> the package that builds it
NETWORKS: Dict[str, str] = {"thinker": "omni_train.models.thinker", "talker": "omni_train.models.talker"}

FLAVOR_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def flavors() -> Dict[str, Path]:
    """Every model flavor by name: the files of conf/model, each a ``model=<name>`` choice."""
    return {path.stem: path for path in sorted(FLAVOR_DIR.glob("*.yaml"))}
