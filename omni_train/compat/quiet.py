"""Library warnings a user can do nothing about, quieted once per process.

Called first thing by every entry point (``omni-train`` and its torchrun workers, ``omni-convert``,
``omni-data``), before megatron-core is imported: megatron warns at import that Transformer Engine and Apex
are absent (six lines, twice each with the source line), at every model build that our MoE layer spec is
an "Unknown MLP type", and logs every parameter name at INFO. Standard library only: importing this module
must not import torch.
"""

from __future__ import annotations

import logging
import warnings

# (logger, start of the message) for megatron log records that describe a deliberate choice of ours.
_EXPECTED_RECORDS = (
    # transformer_layer.py: our MoE layer is a ModuleSpec (models/common/local_dispatch.py), which megatron
    # builds with default kwargs, exactly as intended; logged once per layer per model build.
    ("megatron.core.transformer.transformer_layer", "Unknown MLP type"),
)

_QUIETED = False


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_library_warnings() -> None:
    """Hide Transformer Engine / Apex absence notices, megatron's deprecation notices and expected log
    records, torch's note on single-process checkpoint reads, libraries' DeprecationWarning and
    FutureWarning, and megatron's INFO logging. Idempotent."""
    global _QUIETED
    if _QUIETED:
        return
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for logger, prefix in _EXPECTED_RECORDS:
        logging.getLogger(logger).addFilter(_DropMessages(prefix))
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|scope is deprecated).*")
    # torch.distributed.checkpoint on export's deliberate single-process read (dcp.load(no_dist=True))
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    _QUIETED = True
