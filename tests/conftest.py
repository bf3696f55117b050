"""Shared fixtures: a world-size-1 gloo process group with megatron's parallel_state on top."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from ci import skip_or_fail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def library_patches():
    """The run-time patches of megatron-core, torch and transformers (omni_train/compat/), as init_parallel
    applies them, for tests that build models without it."""
    from omni_train import compat

    compat.apply_all("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def megatron_world1(library_patches):
    """Initialize gloo (world size 1), megatron parallel_state and its RNG; tear down after the test."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from omni_train.parallel.process_state import reset_moe_aux_state

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    reset_moe_aux_state()
    model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


_INDUCTOR_CPU = {}


@pytest.fixture
def inductor_cpu():
    """Skip unless torch.compile's CPU backend (inductor, which builds C++ with the system compiler) works
    here: probed once on a trivial function, so that a missing toolchain skips with its reason (under CI:
    fails with it, tests/ci.py) while a failure of the code under test still fails."""
    if "reason" not in _INDUCTOR_CPU:
        try:
            torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(4))
            _INDUCTOR_CPU["reason"] = None
        except Exception as exc:  # toolchain missing or broken
            _INDUCTOR_CPU["reason"] = f"torch.compile on CPU unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    if _INDUCTOR_CPU["reason"]:
        skip_or_fail(_INDUCTOR_CPU["reason"])
