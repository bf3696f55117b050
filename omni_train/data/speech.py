"""The Talker's targets of a conversation: the codec frames of its assistant speech, checked.

An assistant ``audio`` part is speech output; its ``codec`` member holds the Talker's targets, int
``[frames, codebooks]`` (docs/data_format.md; ``omni-data codec`` computes them). A sample whose targets
cannot be trained on raises ``SampleError`` naming the sample and the member: no assistant speech, speech
without codec targets, another number of codebooks than the Talker's code groups, codes outside the
codec vocabulary, no frames. The loader skips such a sample and counts it; it is never trained on.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch

from omni_train.data.chat import EncodedSample
from omni_train.data.errors import SampleError


def speech_codes(sample: EncodedSample, code_groups: int, codebook_size: int) -> List[torch.Tensor]:
    """Every assistant speech part's codes, int64 [frames, code_groups], in order of appearance."""
    key = sample.key or "?"
    if not sample.speech_targets:
        raise SampleError(key, "json", "no assistant speech (an assistant audio part) to train the Talker on")
    out = []
    for target in sample.speech_targets:
        codes, member = target.get("codec"), target.get("codec_name") or target["name"]
        if codes is None:
            raise SampleError(key, target["name"], "assistant speech without codec targets (`codec`: run "
                                                   "`omni-data codec` on the dataset)")
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != code_groups:
            raise SampleError(key, member, f"codec targets of shape {list(codes.shape)}: the Talker takes "
                                           f"[frames, {code_groups}] ({code_groups} codebooks)")
        if codes.shape[0] == 0:
            raise SampleError(key, member, "codec targets with no frames")
        if not np.issubdtype(codes.dtype, np.integer):
            raise SampleError(key, member, f"codec targets must be integers, got {codes.dtype}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= codebook_size:
            raise SampleError(key, member, f"codes outside 0..{codebook_size - 1} (min {low}, max {high})")
        out.append(torch.from_numpy(codes.astype(np.int64)))
    return out
