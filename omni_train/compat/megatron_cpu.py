"""Every accommodation that lets megatron-core 0.16.1 run on a CPU-only torch, in one place.

``compat.apply_all("cpu")`` applies them (parallel.setup.init_parallel calls it before megatron's RNG is
seeded or a model is built); GPU runs never execute anything here.

The patches are narrow: no torch function is changed globally. They are of two kinds:

1. A *CPU view of torch* is installed as the module-level ``torch`` name of the megatron modules listed
   in ``_MODULES_USING_CUDA`` (and nowhere else). Inside those modules only, ``torch.cuda.current_device()``
   names the CPU, CUDA streams/events are no-ops, the CUDA RNG is the CPU RNG, and tensor factories called
   with ``device='cuda'`` allocate on the CPU. Everything else is the real torch.
2. Small replacements of single megatron functions whose logic (not just their device) assumes CUDA,
   listed in ``PATCHES`` below.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

from omni_train.compat.registry import Patch

# megatron module -> the calls in it that the CPU view of torch covers, and why they fail as shipped.
_MODULES_USING_CUDA = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        "RotaryEmbedding.__init__/forward, MultimodalRotaryEmbedding.__init__: "
        "device=torch.cuda.current_device()"
    ),
    "megatron.core.models.gpt.gpt_model": "GPTModel._preprocess: device=torch.cuda.current_device()",
    "megatron.core.transformer.attention": "Attention._allocate_memory: device=current_device()",
    "megatron.core.transformer.dot_product_attention": (
        "DotProductAttention.__init__/forward: device=torch.cuda.current_device()"
    ),
    "megatron.core.transformer.transformer_layer": "TransformerLayer: .to(torch.cuda.current_device())",
    "megatron.core.transformer.utils": "get_default_causal_mask: ones(device='cuda')",
    "megatron.core.transformer.moe.router": (
        "TopKRouter.__init__/_maintain_float32_expert_bias, aux-loss buffers: current_device()"
    ),
    "megatron.core.transformer.moe.experts": "SequentialMLP/TEGroupedMLP buffers: current_device()",
    "megatron.core.transformer.moe.moe_utils": (
        "save_to_aux_losses_tracker: zeros(device='cuda'); maybe_move_tensor_to_cpu: record_stream"
    ),
    "megatron.core.transformer.moe.token_dispatcher": (
        "MoEAlltoAllTokenDispatcher.__init__: torch.cuda.Stream(); _maybe_dtoh_and_synchronize: "
        "torch.cuda.stream()/current_stream()/record_event()"
    ),
    "megatron.core.tensor_parallel.layers": (
        "ColumnParallelLinear/RowParallelLinear/VocabParallelEmbedding.__init__, "
        "LinearWithGradAccumulationAndAsyncCommunication: device=torch.cuda.current_device()"
    ),
    "megatron.core.tensor_parallel.mappings": (
        "_gather_along_first_dim/_reduce_scatter_along_first_dim/all_to_all: current_device()"
    ),
    "megatron.core.tensor_parallel.utils": "gather_split_1d_tensor etc.: current_device()",
    "megatron.core.tensor_parallel.random": (
        "CudaRNGStatesTracker.add, model_parallel_cuda_manual_seed, _get_all_rng_states: torch.cuda RNG"
    ),
    "megatron.core.distributed.distributed_data_parallel": (
        "DistributedDataParallel.__init__: torch.cuda.Stream(device=current_device())"
    ),
    "megatron.core.distributed.param_and_grad_buffer": (
        "_ParamAndGradBuffer.__init__: buffers on current_device(); bucket comm: torch.cuda.stream()"
    ),
    "megatron.core.optimizer.optimizer": (
        "FP32Optimizer.__init__, MixedPrecisionOptimizer.__init__, ChainedOptimizer.get_loss_scale: "
        "torch.tensor(device='cuda')"
    ),
    "megatron.core.optimizer.grad_scaler": "ConstantGradScaler/DynamicGradScaler: device='cuda'",
    "megatron.core.optimizer.clip_grads": (
        "get_grad_norm_fp32, clip_grad_by_total_norm_fp32, count_zeros_fp32: device='cuda'"
    ),
    "megatron.core.utils": "local_multi_tensor_l2_norm (apex fallback): device='cuda'",
    "megatron.core.pipeline_parallel.schedules": (
        "forward_backward_no_pipelining / _with_interleaving / _without_interleaving: "
        "total_num_tokens = torch.zeros(device='cuda')"
    ),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": (
        "FileSystemWriterAsync.preload_tensors: torch.cuda.synchronize()"
    ),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": (
        "save_state_dict_async_finalize / verify_global_md_reuse: tensor(device='cuda')"
    ),
    "megatron.core.pipeline_parallel.p2p_communication": (
        "P2PCommunicator._communicate: receive buffers on torch.cuda.current_device()"
    ),
}


class _NullEvent:
    """A CUDA event on the CPU: everything already happened."""

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def record(self, stream=None):
        return None

    def query(self):
        return True


class _NullStream:
    """A CUDA stream on the CPU: work runs in program order, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        return None


_NULL_STREAM = _NullStream()


def _cpu_device_arg(device):
    """Map a CUDA device argument to the CPU; leave any other device alone."""
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as the listed megatron modules see it: the current device is the CPU."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.Stream = _NullStream
        self.Event = _NullEvent

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def current_stream(device=None):
        return _NULL_STREAM

    @staticmethod
    def default_stream(device=None):
        return _NULL_STREAM

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device=None):
        return None

    @staticmethod
    def empty_cache():
        return None

    # On the CPU, "the CUDA generator" is torch's default CPU generator.
    @staticmethod
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)


def _factory_on_cpu(factory):
    """Wrap a torch tensor factory so that device='cuda' allocates on the CPU."""

    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device_arg(kwargs["device"])
        return factory(*args, **kwargs)

    wrapped.__name__ = factory.__name__
    return wrapped


class _TorchOnCpu(types.ModuleType):
    """``torch`` as the listed megatron modules see it. Anything not defined here is the real torch."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in ("tensor", "zeros", "ones", "empty", "full", "arange"):
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def install_torch_view():
    view = _TorchOnCpu()
    for module_name in _MODULES_USING_CUDA:
        module = importlib.import_module(module_name)
        assert module.torch is torch or isinstance(module.torch, _TorchOnCpu), module_name
        module.torch = view


def _host_split_sizes(tensor, as_numpy=False, record_stream=False):
    """Replacement for moe_utils.maybe_move_tensor_to_cpu that also honours ``as_numpy`` for tensors
    already on the CPU, so the alltoall dispatcher hands host lists to ``all_to_all_single``."""
    if torch.is_tensor(tensor):
        tensor = tensor.detach().cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def use_host_split_sizes():
    """token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize converts split sizes to
    numpy only when they are CUDA tensors; gloo's all_to_all_single rejects CPU tensors as splits."""
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _host_split_sizes


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def use_cpu_rng_tracker():
    """tensor_parallel.random keeps named CUDA generator states (dropout in TP regions, expert init,
    activation recompute). On the CPU the states are CPU generator states: ``_get/_set_cuda_rng_state``
    read/write the CPU generator and ``CudaRNGStatesTracker`` becomes ``CpuRNGStatesTracker``, which
    ``initialize_rng_tracker`` (called by model_parallel_cuda_manual_seed) then instantiates."""
    from megatron.core.tensor_parallel import random

    class CpuRNGStatesTracker(random.CudaRNGStatesTracker):
        """Named CPU generator states; ``fork`` swaps one in and out (nesting works like a stack)."""

        def add(self, name, seed):
            if seed in self.seeds_ or name in self.states_:
                raise ValueError(f"rng state {name} / seed {seed} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise KeyError(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    random.CudaRNGStatesTracker = CpuRNGStatesTracker
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    tracker = random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, CpuRNGStatesTracker):
        random.initialize_rng_tracker(force_reset=True)


def use_eager_expert_bias():
    """router.TopKRouter._apply_expert_bias is wrapped in torch.compile at import (megatron.core.jit):
    on the CPU inductor needs a C++ toolchain and compiles for a long time for a two-line update.
    Restore the plain Python method."""
    from megatron.core.transformer.moe.router import TopKRouter

    original = getattr(TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable", None)
    if original is not None:
        TopKRouter._apply_expert_bias = original


_MEGATRON = dict(library="megatron-core", written_for=("0.16.1",), devices=("cpu",))

PATCHES = [
    Patch("cpu_torch_view", targets=tuple(f"{module}.torch" for module in _MODULES_USING_CUDA),
          why="these modules allocate on torch.cuda.current_device(), make CUDA streams/events and use the "
              "CUDA RNG (each listed in _MODULES_USING_CUDA); their module-level torch becomes a view of torch "
              "on which CUDA means the CPU",
          apply=install_torch_view, **_MEGATRON),
    Patch("cpu_alltoall_split_sizes",
          targets=("megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",),
          why="the alltoall dispatcher turns split sizes into host lists only for CUDA tensors; gloo's "
              "all_to_all_single rejects CPU tensors as splits",
          apply=use_host_split_sizes, **_MEGATRON),
    Patch("cpu_rng_tracker",
          targets=("megatron.core.tensor_parallel.random.CudaRNGStatesTracker",
                   "megatron.core.tensor_parallel.random._get_cuda_rng_state",
                   "megatron.core.tensor_parallel.random._set_cuda_rng_state"),
          why="the named RNG states (TP dropout, expert init, recompute) are CUDA generator states; on the "
              "CPU they are CPU generator states",
          apply=use_cpu_rng_tracker, **_MEGATRON),
    Patch("cpu_eager_expert_bias", targets=("megatron.core.transformer.moe.router.TopKRouter._apply_expert_bias",),
          why="torch.compile'd at import (megatron.core.jit): on the CPU inductor needs a C++ toolchain and "
              "compiles for a long time for a two-line update",
          apply=use_eager_expert_bias, **_MEGATRON),
]
