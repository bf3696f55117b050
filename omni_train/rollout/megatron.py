"""Rollout backend ``megatron``: the trained megatron LM itself decodes, through megatron-core's static
inference path (no weight copy, no second model).

What is megatron's and what is ours:
- megatron-core 0.16.1: ``StaticInferenceContext`` (the KV cache: each ``SelfAttention`` writes its new keys
  and values into the context's per-layer buffers and attends over ``[0, offset + new)``; after the prompt
  it switches the core attention to ``no_mask``) and ``GPTInferenceWrapper.run_one_forward_step`` (the
  forward with the context, the offset bookkeeping, only the last position's logits).
- ours: the decoding loop. megatron's own loops do not fit: ``DynamicInferenceEngine`` (and the non-legacy
  ``StaticInferenceEngine``, which wraps it) attends through flash-attn's paged kernels (it asserts flash-attn
  >= 2.7.3 or FA3: not in the device image, and PyPI ships it only as a source build); the legacy static
  controller (``TextGenerationController.generate_all_output_tokens_static_batch``) stops on one id, records
  ``log_softmax(logits)`` without the temperature, refuses top-k with top-p, and right-pads, feeding every
  prompt longer than the shortest one token at a time. Here prompts are left-padded (one prefill for the
  batch), an explicit mask keeps the padding out, and each step records the taken token's
  ``log_softmax(logits / T)`` before top-k / top-p (what the trainer recomputes; rollout/__init__.py).
- the KV buffers are allocated here, per batch and on the model's device (megatron's own allocation is
  CUDA-only), and dropped after it: the memory goes back to training between rollouts. So the backend also
  runs on CPU (how tests/posttrain/test_rollout_megatron.py checks it against the hf backend at fp32).

Positions: row b's tokens sit at ``pad_b + i``, rotary position ``i``; megatron's static path slices the
query's angles at ``[offset, offset + new)`` and the keys' at ``[0, offset + new)``, so every step hands it
the positions of the whole sequence so far (text positions: the three TM-RoPE rows equal).

Limits (checked): text prompts only (media would need the towers' features at the placeholders and
TM-RoPE positions; ``stage.loss.text_prompts_only``); one model-parallel rank (tp = pp = cp = ep = 1; data
parallel is fine: each rank decodes its own prompts). The compiled elementwise kernels of the training
path (norms, rotation, MoE combine) run eagerly while decoding (``torch.compiler.set_stance``): their
shapes change every step (the KV length) and would exceed torch.compile's recompile limit. The MoE load
metric counts nothing while decoding (moe_load.uncounted): it counts training tokens only.

Measured (benchmarks/RESULTS.md, 2026-12-03, H200, omni proxy, 512 rows x 256 tokens): 29.6k tokens/s once
warm against 5.0k for transformers' ``generate``; greedy rows equal to the hf backend's at fp32.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
from megatron.core.utils import unwrap_model

from omni_train.config.rollout import SamplingConfig
from omni_train.models.common.moe_load import uncounted
from omni_train.data.prompts import Prompt
from omni_train.rollout import Sample, check_sampling, stop_ids
from omni_train.rollout.sync import SyncReport

PAD_MULTIPLE = 16  # prompt batches are left-padded to a multiple of this (fewer distinct shapes to allocate)


def check_layout() -> None:
    """NotImplementedError unless this process holds the whole LM (tp = pp = cp = ep = 1)."""
    if not parallel_state.model_parallel_is_initialized():
        return
    sizes = {"tp": parallel_state.get_tensor_model_parallel_world_size(),
             "pp": parallel_state.get_pipeline_model_parallel_world_size(),
             "cp": parallel_state.get_context_parallel_world_size(),
             "ep": parallel_state.get_expert_model_parallel_world_size()}
    split = {k: v for k, v in sizes.items() if v > 1}
    if split:
        raise NotImplementedError(f"stage.rollout.backend=megatron decodes with the whole LM on each rank; this "
                                  f"layout splits it ({split}): use backend=hf")


def check_text_only(prompts: Sequence[Prompt]) -> None:
    with_media = [p.key for p in prompts if p.media]
    if with_media:
        raise ValueError(f"stage.rollout.backend=megatron takes text prompts only; {len(with_media)} hold media "
                         f"(e.g. {with_media[0]!r}): set stage.loss.text_prompts_only=true or use backend=hf")


def language_model(model: torch.nn.Module) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(the megatron GPTModel, the unwrapped model): a Thinker's LM (OmniThinker.language_model) or the LM."""
    inner = unwrap_model(model)
    return getattr(inner, "language_model", inner), inner


# ---------------------------------------------------------------------------------------------------
# Pure bookkeeping (device-agnostic; tested on CPU)


def left_pad(prompts: Sequence[Prompt], pad_id: int, multiple: int = PAD_MULTIPLE) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L] with each prompt at the right end, pads [B]); L the longest prompt rounded up to ``multiple``."""
    longest = max(p.num_tokens for p in prompts)
    length = -(-longest // multiple) * multiple
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    pads = torch.empty(len(prompts), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        pads[b] = length - prompt.num_tokens
        ids[b, pads[b]:] = prompt.input_ids
    return ids, pads


def blocked(pads: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[B, 1, end - start, end] bool, True where query ``start + i`` may NOT attend key ``j`` (megatron's
    convention): causal, and no key in a row's left padding. A padding query sees itself only (a row of all
    True would make SDPA's output NaN, and 0 x NaN leaks through the masked keys)."""
    device = pads.device
    query = torch.arange(start, end, device=device)[:, None]
    key = torch.arange(end, device=device)[None, :]
    real_key = key[None] >= pads[:, None, None]  # [B, 1, end]
    allowed = (key <= query)[None] & (real_key | (key == query)[None])
    return ~allowed[:, None]


def sample_step(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator,
                never: torch.Tensor = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step's tokens [B] and their log-probabilities [B] (fp32) under ``log_softmax(logits / T)`` (T = 1
    when greedy), read before top-k / top-p and before the ``never`` ids are taken out of the choice."""
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    scaled = logits.float() / temperature  # a new tensor: the filters below write into it
    lse = torch.logsumexp(scaled, dim=-1)
    taken_from = scaled.clone() if never is not None or sampling.temperature > 0 else scaled
    if never is not None:
        taken_from.index_fill_(1, never, float("-inf"))
    if sampling.temperature == 0:
        tokens = taken_from.argmax(dim=-1)
    else:
        taken_from = top_p_filter(top_k_filter(taken_from, sampling.top_k), sampling.top_p)
        tokens = torch.multinomial(taken_from.softmax(dim=-1), 1, generator=generator).squeeze(1)
    return tokens, scaled.gather(1, tokens[:, None]).squeeze(1) - lse


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """transformers' TopKLogitsWarper: all but the ``k`` largest to -inf (0: off)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill_(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper: keep the smallest set of largest-probability ids whose mass reaches
    ``p`` (at least one; 1: off)."""
    if p >= 1.0:
        return scores
    ordered, index = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - p
    remove[..., -1:] = False
    return scores.masked_fill_(remove.scatter(1, index, remove), float("-inf"))


class Responses:
    """Per-row token ids and log-probabilities as steps come, and where each row stops: at its first stop id
    (kept, finish "stop") or after ``max_new_tokens`` (finish "length"). Tensors stay on the device until
    ``samples``: no host synchronisation per step."""

    def __init__(self, rows: int, stops: Sequence[int], device):
        self.stops = torch.tensor(list(stops), dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.length = torch.zeros(rows, dtype=torch.long, device=device)
        self.tokens: List[torch.Tensor] = []
        self.logprobs: List[torch.Tensor] = []

    def add(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        self.tokens.append(tokens)
        self.logprobs.append(logprobs)
        self.length += ~self.done  # this token belongs to every row not already stopped
        self.done |= torch.isin(tokens, self.stops)

    def all_done(self) -> bool:
        return bool(self.done.all())

    def samples(self, rows: Sequence[Tuple[Prompt, int]]) -> List[Sample]:
        tokens = torch.stack(self.tokens, dim=1).cpu()
        logprobs = torch.stack(self.logprobs, dim=1).float().cpu()
        length, done = self.length.cpu().tolist(), self.done.cpu().tolist()
        return [Sample(prompt, index, tokens[b, :length[b]].tolist(), logprobs[b, :length[b]].tolist(),
                       "stop" if done[b] else "length")
                for b, (prompt, index) in enumerate(rows)]


def decode(step: Callable, ids: torch.Tensor, pads: torch.Tensor, sampling: SamplingConfig, stops: Sequence[int],
           generator: torch.Generator, never: torch.Tensor = None, check_every: int = 8) -> Responses:
    """The decoding loop over ``step(tokens [B, n], positions [B, end], blocked-or-None) -> logits [B, V]`` of
    the last position (``end``: the sequence so far, the n new tokens included): the left-padded prompts
    ``ids`` [B, L] at once, then one token per step until every row stopped or ``max_new_tokens``."""
    rows, length = ids.shape
    total = length + sampling.max_new_tokens
    positions = (torch.arange(total, device=ids.device)[None] - pads[:, None]).clamp_min(0)
    padded = bool((pads > 0).any())
    responses = Responses(rows, stops, ids.device)
    tokens, start = ids, 0
    for t in range(sampling.max_new_tokens):
        end = length + t
        logits = step(tokens, positions[:, :end], blocked(pads, start, end) if padded else None)
        new, logprobs = sample_step(logits, sampling, generator, never)
        responses.add(new, logprobs)
        if (t + 1) % check_every == 0 and responses.all_done():
            break
        tokens, start = new[:, None], end
    return responses


# ---------------------------------------------------------------------------------------------------
# The engine


def kv_context(lm: torch.nn.Module, rows: int, total: int) -> StaticInferenceContext:
    """A static context whose per-layer key/value buffers [total, rows, groups, head dim] already exist on
    the LM's device (megatron allocates them on first use, on CUDA only)."""
    context = StaticInferenceContext(rows, total)
    param = next(lm.parameters())
    for layer in lm.decoder.layers:
        attention = layer.self_attention
        shape = (total, rows, attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head)
        context.key_value_memory_dict[attention.layer_number] = (
            torch.empty(shape, dtype=param.dtype, device=param.device),
            torch.empty(shape, dtype=param.dtype, device=param.device))
    return context


@contextlib.contextmanager
def decoding_mode(model: torch.nn.Module):
    """Eval mode (megatron's inference path keys on it), no autograd, compiled kernels run eagerly, the MoE
    load metric not counting (moe_load.uncounted) and a Thinker's DeepStack features cleared; all
    restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if hasattr(model, "_deepstack"):
            model._deepstack = None  # text prompts: nothing to add; never the last training batch's
        with torch.inference_mode(), torch.compiler.set_stance("force_eager"), uncounted():
            yield
    finally:
        for module, training in modes:
            module.training = training


class MegatronRolloutEngine:
    def __init__(self, model_cfg, encoder, device, dtype, generation_batch: int = 0):
        check_layout()
        self.encoder, self.device, self.dtype = encoder, torch.device(device), dtype
        self.generation_batch = generation_batch
        self.vocab_size = model_cfg.vocab_size
        self.pad_id = encoder.ids["pad"]
        # media placeholders are never sampled (rollout/hf.py _Suppress says why)
        never = sorted({encoder.ids[k] for k in ("audio_pad", "image_pad", "video_pad")} & set(range(self.vocab_size)))
        self.never = torch.tensor(never, dtype=torch.long, device=self.device)
        self.model = self.lm = None

    def sync(self, model: torch.nn.Module) -> SyncReport:
        """Nothing to copy: the engine decodes with ``model`` itself (its weights as they are at generate)."""
        check_layout()
        self.lm, self.model = language_model(model)
        return SyncReport(tensors=0, bytes=0, ms=0.0)

    def num_parameters(self) -> int:
        """Parameters the engine holds besides the trained model's: none."""
        return 0

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig, seed: int) -> List[Sample]:
        """``sampling.n`` samples of each prompt (prompt-major), in batches of ``generation_batch`` rows, seeded
        by ``seed`` alone (a generator of the engine's own: the process's random state is untouched)."""
        check_sampling(sampling)
        check_text_only(prompts)
        if self.lm is None:
            raise RuntimeError("MegatronRolloutEngine.generate before sync(model): the engine has no model")
        rows = [(prompt, i) for prompt in prompts for i in range(sampling.n)]
        size = self.generation_batch or len(rows) or 1
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stops = stop_ids(self.encoder, sampling)
        out: List[Sample] = []
        with decoding_mode(self.model):
            for start in range(0, len(rows), size):
                batch = rows[start:start + size]
                out.extend(self._generate_batch(batch, sampling, stops, generator))
        return out

    def _generate_batch(self, rows, sampling: SamplingConfig, stops, generator) -> List[Sample]:
        ids, pads = left_pad([prompt for prompt, _ in rows], self.pad_id)
        ids, pads = ids.to(self.device), pads.to(self.device)
        total = ids.shape[1] + sampling.max_new_tokens
        context = kv_context(self.lm, len(rows), total)
        config = InferenceWrapperConfig(hidden_size=self.lm.config.hidden_size, params_dtype=self.dtype,
                                        inference_batch_times_seqlen_threshold=-1,
                                        padded_vocab_size=self.vocab_size, inference_max_requests=len(rows),
                                        inference_max_seq_length=total)
        wrapper = GPTInferenceWrapper(self.lm, config, context)

        def step(tokens, positions, mask):
            logits = wrapper.run_one_forward_step({"tokens": tokens, "position_ids": positions,
                                                   "attention_mask": mask})
            context.enable_decode_mode()  # after the prompt's forward, every step is one token per row
            return logits[:, -1, :self.vocab_size]

        responses = decode(step, ids, pads, sampling, stops, generator, self.never)
        return responses.samples(rows)
