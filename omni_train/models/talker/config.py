"""The Talker's sizes and ids (``TalkerConfig`` with ``CodePredictorConfig``, ``CodecIds``, ``TextIds``) and
their consistency check.

They are defined once, in ``omni_train/config/talker.py``: the schema of ``model.talker`` (Hydra's
structured config) is the dataclass the Talker is built from, and ``config/validate.py`` checks it before
anything is built; the config layer cannot import from models/, so the definition lives there and this
module names it for the Talker's code.
"""

from omni_train.config.talker import (
    CodecIds,
    CodePredictorConfig,
    TalkerConfig,
    TextIds,
    check_talker_config,
    talker_config_problems,
    talker_layout_problems,
)

__all__ = ["CodecIds", "CodePredictorConfig", "TalkerConfig", "TextIds", "check_talker_config",
           "talker_config_problems", "talker_layout_problems"]
