"""megatron-core's process-wide state, kept right when one process builds several models.

megatron keeps three things per process rather than per model:
- the MoE layer-wise aux-loss tracker (``moe_utils.get_moe_layer_wise_logging_tracker``), a dict of
  per-layer tensors sized by the first model that logs into it;
- ``MoEAuxLossAutoScaler.main_loss_backward_scale``, the aux loss's gradient scale, whose shape the first
  training step fixes (a later step copies a [1] scale into it; a [] one left by another path fails);
- the tensor-parallel CUDA RNG tracker (``tensor_parallel.get_cuda_rng_tracker``), plus torch's own RNGs,
  which building a model draws from.

Only the trainable model writes the first two (routers log aux losses only in training mode with grad
enabled; frozen models run in eval mode under no_grad), so they are reset when the trainable model is
(re)built and never when a frozen model is. Building any model beside it runs inside ``preserved_rng``, so
the trainable model's random stream is the same with or without a teacher or reference in the process.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker


def reset_moe_aux_state() -> None:
    """Forget the aux-loss tracker and gradient scale of a trainable model built before (a phase switch
    rebuilds it; a model with another depth would index past the old tracker's end)."""
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the body without leaving a trace in any RNG the trainable model or the data use: Python's,
    NumPy's, torch's CPU and CUDA generators and megatron's tensor-parallel RNG tracker."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = ({k: v.clone() for k, v in tracker.get_states().items()} if tracker.is_initialized() else None)
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)
            if states is not None:
                tracker.set_states(states)
