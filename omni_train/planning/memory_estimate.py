"""Per-rank GPU memory of a training run, estimated from its configs (nothing is built or allocated).

What one rank holds at the peak of a step, for the layout (tp, pp, ep, cp, world size):

Model states (megatron-core DDP + distributed optimizer, as ``omni_train/parallel/wrap.py`` builds them)
  * parameters: every parameter the rank holds, trainable or frozen, in the parameter dtype (bf16);
  * gradients: megatron's contiguous grad buffer, fp32 (``grad_reduce_in_fp32``), trainable only, not
    sharded (the distributed optimizer reduce-scatters into it);
  * optimizer: fp32 master weights + Adam's two moments = 12 bytes per trainable parameter (8 when the
    parameters are fp32 already; with optim.master_weights=false bf16 moments, 4 bytes, and bf16 grads), sharded by the distributed optimizer: dense parameters over the
    data-parallel x context-parallel group (world / (tp * pp)), expert parameters over the
    expert-data-parallel group (world / (expert tp * ep * pp), expert tp = tp). Frozen parameters have
    neither gradients nor optimizer state; with phases, each phase is estimated with its own trainable set
    (the optimizer is rebuilt per phase) and the largest is the estimate.

Activations (per micro-batch of micro_batch_size x seq_length tokens; 1F1B pipeline stage s keeps
min(pp - s, micro-batches per step) micro-batches in flight), what autograd keeps for the backward pass:
  * each LM decoder layer, per token (a, g heads / query groups of width d, hidden h, E experts, top-k,
    expert FFN F; s = tp with sequence parallelism, else 1):
      attention  2h/s (norm input, QKV input) + (a+2g)d (QKV output) + ad (q before its norm)
                 + (a+g)d (rotated q, k) + 2ad (attention output, projection input)  = 2h/s + (5a+3g)d/tp
      router     2h/s (norm input and output) + E in fp32 (softmax of the load-balancing loss)
      experts    k*h (dispatched tokens) + 5kF/tp (fc1 output 2kF, SiLU, gated product, fc2 input) + k fp32
      (a dense LM, num_experts = 0: 2h/s + 5F/tp for its norm and SwiGLU MLP of width F, no router)
    with trainer.recompute=full only the layer input (h/s) is kept and one layer at a time is recomputed;
  * with packed documents under context parallelism the [b, 1, S, S] document mask (bool) and, per layer,
    the additive mask SDPA converts it to (parameter dtype; kept for the backward); without context
    parallelism the GPU attends over the documents' boundaries (varlen flash attention) and keeps no mask;
  * logits: [tokens, V/tp] in the parameter dtype plus megatron's fp32 softmax in the cross entropy;
  * towers (when on and trainable in the phase): worst case, the whole micro-batch is placeholders of the
    tower with the larger activations (every token audio, or every token an image/video token); their
    gradient checkpointing follows trainer.recompute. Frozen towers keep nothing. DeepStack adds one
    [tokens, h] tensor per level.

Peak = model states + what is kept across the whole backward (layer inputs or all layer activations,
masks, towers, DeepStack, embeddings) + the larger of the logits and, with recompute, one recomputed
layer. Not counted: the CUDA context, NCCL buffers, allocator fragmentation, backward transients,
routing imbalance (the estimate assumes every expert receives its share of tokens): compare the total with
the GPU's memory minus a few GB.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from omni_train.config.schema import (
    AudioTowerConfig,
    ThinkerConfig,
    ParallelConfig,
    StageConfig,
    TrainerConfig,
    VisionTowerConfig,
)
from omni_train.planning.param_inventory import RankParam, audio_conv_out_bins, rank_parameters

GB = 1e9
FP32 = 4
MASK = 1  # bytes per element of a bool mask


@dataclass(frozen=True)
class Layout:
    """Group sizes of a layout on ``world_size`` ranks (megatron-core's rules)."""

    world_size: int
    tp: int
    pp: int
    ep: int
    cp: int

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def dense_shards(self) -> int:
        """The distributed optimizer shards dense parameters over data x context parallel ranks."""
        return self.world_size // (self.tp * self.pp)

    @property
    def expert_shards(self) -> int:
        """... and expert parameters over the expert-data-parallel group (expert tp = tp)."""
        return self.world_size // (self.tp * self.ep * self.pp)


@dataclass(frozen=True)
class MemoryItem:
    label: str
    bytes: int
    detail: str = ""


@dataclass
class MemoryEstimate:
    """One phase's estimate on its most loaded pipeline stage."""

    phase: str
    pipeline_stage: int
    layout: Layout
    micro_batches: int  # per optimizer step on each data-parallel rank
    trainable: int  # parameters on this rank
    frozen: int
    items: List[MemoryItem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)


def param_bytes(trainer: TrainerConfig) -> int:
    """bf16 unless the run is fp32 ("auto" is bf16 on the GPUs this estimate is for)."""
    return FP32 if trainer.precision == "fp32" else 2


def micro_batch_plan(trainer: TrainerConfig, layout: Layout) -> Tuple[int, List[str]]:
    """(micro-batches per optimizer step on a rank, notes): a global batch that does not divide over
    micro_batch_size x dp is noted (a run on that many GPUs refuses it)."""
    per_step = trainer.micro_batch_size * layout.dp
    notes = []
    if trainer.global_batch_size % per_step:
        notes.append(f"trainer.global_batch_size={trainer.global_batch_size} is not a multiple of "
                     f"micro_batch_size * dp = {trainer.micro_batch_size} * {layout.dp}: a run on "
                     f"{layout.world_size} GPUs refuses it")
    return max(1, trainer.global_batch_size // per_step), notes


def trains_in_phase(name: str, trainable: Sequence[str], frozen: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in trainable) and not any(re.search(p, name) for p in frozen)


def stage_phases(stage: StageConfig):
    """(name, trainable patterns, frozen patterns) of each phase; one phase when the stage has none."""
    if not stage.phases:
        return [(stage.name, list(stage.trainable), list(stage.frozen))]
    return [(p.name, list(p.trainable), list(p.frozen)) for p in stage.phases]


# ----- activations -----------------------------------------------------------------------------------


def lm_layer_activation_bytes(model: ThinkerConfig, parallel: ParallelConfig, tokens: int, act: int) -> int:
    """Bytes one LM decoder layer keeps for backward for ``tokens`` tokens (this rank's sequence share,
    micro_batch_size * seq_length / cp), without recomputation. See the module docstring."""
    h, a, g, d = model.hidden_size, model.num_attention_heads, model.num_query_groups, model.head_dim
    e, k, f = model.num_experts, model.router_topk, model.moe_ffn_hidden_size
    tp = parallel.tp
    s = tp if parallel.sequence_parallel else 1
    attention = act * tokens * (2 * h // s + (5 * a + 3 * g) * d // tp)
    if parallel.cp > 1:  # K and V gathered over the whole sequence, kept by SDPA
        attention += act * tokens * parallel.cp * 2 * g * d // tp
    if e == 0:  # dense: norm input and output, then the SwiGLU MLP's 5F as one expert's
        return attention + act * tokens * (2 * h // s + 5 * model.ffn_hidden_size // tp)
    router = act * tokens * 2 * h // s + FP32 * tokens * e // s
    experts = act * tokens * (k * h + 5 * k * f // tp) + FP32 * tokens * k
    return attention + router + experts


def lm_layer_input_bytes(model: ThinkerConfig, parallel: ParallelConfig, tokens: int, act: int) -> int:
    """What full recomputation keeps per layer: the layer's input (sequence-parallel sharded)."""
    s = parallel.tp if parallel.sequence_parallel else 1
    return act * tokens * model.hidden_size // s


def audio_tower_bytes_per_chunk(audio: AudioTowerConfig, act: int, checkpointed: bool) -> int:
    """Bytes the audio tower keeps per 2 * n_window mel frames (one convolution chunk, which becomes
    ceil(ceil(ceil(2 n_window / 2) / 2) / 2) tokens): the convolution stack (input, each convolution's
    output and its GELU, never checkpointed), then per encoder layer 9d + 2*ffn per token (norm
    inputs/outputs, q, k, v, attention output and projection input, fc1 output and GELU) or d when
    checkpointed, then ln_post / proj1 / GELU / proj2 inputs (4d)."""
    frames, c = 2 * audio.n_window, audio.downsample_hidden_size
    conv = audio.num_mel_bins * frames
    bins, length = audio.num_mel_bins, frames
    for _ in range(3):  # stride-2 convolutions: output kept by GELU, GELU output kept by the next layer
        bins, length = (bins + 1) // 2, (length + 1) // 2
        conv += 2 * c * bins * length
    assert bins == audio_conv_out_bins(audio.num_mel_bins)
    d = audio.d_model
    per_layer = d if checkpointed else 9 * d + 2 * audio.ffn_dim
    return act * (conv + length * (audio.num_layers * per_layer + 4 * d))


def audio_tokens_per_chunk(audio: AudioTowerConfig) -> int:
    length = 2 * audio.n_window
    for _ in range(3):
        length = (length + 1) // 2
    return length


def vision_tower_bytes_per_token(vision: VisionTowerConfig, act: int, checkpointed: bool) -> int:
    """Bytes the vision tower keeps per LM token (spatial_merge_size^2 patches): the patch embedding's
    input (3 * temporal_patch * patch^2 per patch), per block 11 hv + 2 * intermediate per patch (norm
    inputs/outputs, q/k/v, rotated q and k, attention output, projection input, fc1 output and GELU) or hv
    when checkpointed, the merger (16 hv per token) and each DeepStack merger (12 hv per token)."""
    patches = vision.spatial_merge_size**2
    hv = vision.hidden_size
    embed = 3 * vision.temporal_patch_size * vision.patch_size**2
    per_block = hv if checkpointed else 11 * hv + 2 * vision.intermediate_size
    mergers = 16 * hv + 12 * hv * len(vision.deepstack_visual_indexes)
    return act * (patches * (embed + vision.depth * per_block) + mergers)


def _tower_items(model: ThinkerConfig, tokens: int, act: int, checkpointed: bool,
                 trains_audio: bool, trains_vision: bool) -> List[MemoryItem]:
    """Worst case: every token of the micro-batch belongs to the costlier trainable tower."""
    candidates = []
    if trains_audio:
        chunks = math.ceil(tokens / audio_tokens_per_chunk(model.audio_tower))
        candidates.append(("audio", chunks * audio_tower_bytes_per_chunk(model.audio_tower, act, checkpointed)))
    if trains_vision:
        candidates.append(("vision", tokens * vision_tower_bytes_per_token(model.vision_tower, act,
                                                                           checkpointed)))
    if not candidates:
        return []
    name, size = max(candidates, key=lambda c: c[1])
    how = "checkpointed per layer" if checkpointed else "no checkpointing"
    return [MemoryItem("tower activations", size,
                       f"worst case: all {tokens:,} tokens {name} placeholders, {how}")]


# ----- the estimate ----------------------------------------------------------------------------------


def state_items(params: List[RankParam], trains, layout: Layout, trainer: TrainerConfig,
                distributed_optimizer: bool, master_weights: bool = True) -> List[MemoryItem]:
    pbytes = param_bytes(trainer)
    held = sum(p.numel for p in params)
    dense = sum(p.numel for p in params if trains(p.name) and not p.expert)
    expert = sum(p.numel for p in params if trains(p.name) and p.expert)
    if pbytes == FP32 or master_weights:
        per_param = FP32 * (2 if pbytes == FP32 else 3)  # (master weights +) Adam m and v
        gbytes = FP32
    else:  # optim.master_weights=false: bf16 grads and bf16 moments
        per_param, gbytes = 2 * pbytes, pbytes
    dense_shards = layout.dense_shards if distributed_optimizer else 1
    expert_shards = layout.expert_shards if distributed_optimizer else 1
    optimizer = per_param * (math.ceil(dense / dense_shards) + math.ceil(expert / expert_shards))
    return [
        MemoryItem("parameters", pbytes * held,
                   f"{held:,} held, {held - dense - expert:,} of them frozen, {pbytes} bytes each"),
        MemoryItem("gradients", gbytes * (dense + expert),
                   f"{'fp32' if gbytes == FP32 else 'bf16'} grad buffer of {dense + expert:,} trainable"),
        MemoryItem("optimizer", optimizer,
                   f"{per_param} bytes x ({dense:,} dense / {dense_shards} + {expert:,} expert / "
                   f"{expert_shards})"),
    ]


def _activation_items(model: ThinkerConfig, parallel: ParallelConfig, trainer: TrainerConfig,
                      layers: int, in_flight: int, first: bool, last: bool, document_mask: bool,
                      trains_audio: bool, trains_vision: bool, loss_from_logits: bool = False) -> List[MemoryItem]:
    act = param_bytes(trainer)
    b, seq = trainer.micro_batch_size, trainer.seq_length
    tokens = b * seq // parallel.cp
    recompute = trainer.recompute == "full"
    layer = lm_layer_activation_bytes(model, parallel, tokens, act)
    sdpa_mask = act * b * (seq // parallel.cp) * seq if document_mask else 0
    items = []
    if recompute:
        kept = lm_layer_input_bytes(model, parallel, tokens, act)
        items.append(MemoryItem("LM layer inputs", in_flight * layers * kept,
                                f"{layers} layers x {in_flight} micro-batch(es), full recompute"))
    else:
        items.append(MemoryItem("LM activations", in_flight * layers * (layer + sdpa_mask),
                                f"{layers} layers x {in_flight} micro-batch(es) x {layer / GB:.2f} GB"
                                + (f" + {sdpa_mask / GB:.2f} GB SDPA mask" if sdpa_mask else "")))
    if document_mask:
        items.append(MemoryItem("document mask", in_flight * b * seq * seq * MASK, "[b, 1, S, S] bool"))
    if model.towers and first:
        items += _tower_items(model, b * seq, act, recompute, trains_audio, trains_vision)
        levels = len(model.vision_tower.deepstack_visual_indexes)
        items.append(MemoryItem("DeepStack features", act * levels * b * seq * model.hidden_size,
                                f"{levels} levels of [tokens, hidden]"))
    if first:
        items.append(MemoryItem("embeddings", in_flight * 3 * act * tokens * model.hidden_size,
                                "embedding output, merged and decoder inputs"))
    # Only one of these is live at a time: the loss's logits (end of forward, start of backward) or,
    # with recompute, one layer's recomputed activations (later in the backward).
    peaks = []
    if last:
        logit_bytes = act + (FP32 if act != FP32 else 0)
        extra = ""
        if loss_from_logits:  # distill_offpolicy's top-k term: an fp32 copy and its exponent, kept for backward
            logit_bytes += 2 * FP32
            extra = " + fp32 copy and exp (top-k distillation)"
        peaks.append(MemoryItem("logits and loss", tokens * model.vocab_size // parallel.tp * logit_bytes,
                                f"[{tokens:,}, {model.vocab_size // parallel.tp:,}] in {act} bytes "
                                "+ fp32 softmax" + extra))
    if recompute:
        peaks.append(MemoryItem("recomputed layer", layer + sdpa_mask, "one layer's activations in backward"))
    if peaks:
        items.append(max(peaks, key=lambda item: item.bytes))
    return items


def estimate_memory(model: ThinkerConfig, parallel: ParallelConfig, trainer: TrainerConfig,
                    stage: StageConfig, world_size: int, document_mask: bool,
                    master_weights: bool = True,
                    extra_items: Optional[Callable[[int], List[MemoryItem]]] = None) -> List[MemoryEstimate]:
    """One estimate per phase of the stage (one if it has none), each on its most loaded pipeline stage.
    ``document_mask``: the batches carry packed-document masks (data=shards). ``master_weights``:
    optim.master_weights (false: bf16 grads and Adam moments, no fp32 main params). ``extra_items(pp
    stage)``: what else that stage's ranks hold (frozen models, a rollout engine: frozen_memory.py)."""
    layout = Layout(world_size, parallel.tp, parallel.pp, parallel.ep, parallel.cp)
    if world_size < 1 or world_size % (parallel.tp * parallel.pp * parallel.cp) or world_size % (
            parallel.tp * parallel.pp * parallel.ep):
        raise ValueError(f"world size {world_size} does not fit tp={parallel.tp} pp={parallel.pp} "
                         f"cp={parallel.cp} ep={parallel.ep}")
    micro_batches, notes = micro_batch_plan(trainer, layout)
    estimates = []
    for phase, trainable, frozen in stage_phases(stage):
        def trains(name: str) -> bool:
            return trains_in_phase(name, trainable, frozen)

        worst: Optional[MemoryEstimate] = None
        for pp_stage in range(parallel.pp):
            params = rank_parameters(model, parallel, pp_stage)
            estimate = MemoryEstimate(
                phase=phase, pipeline_stage=pp_stage, layout=layout, micro_batches=micro_batches, notes=notes,
                trainable=sum(p.numel for p in params if trains(p.name)),
                frozen=sum(p.numel for p in params if not trains(p.name)),
            )
            estimate.items += state_items(params, trains, layout, trainer, parallel.distributed_optimizer,
                                           master_weights)
            estimate.items += _activation_items(
                model, parallel, trainer, layers=model.num_layers // parallel.pp,
                in_flight=min(parallel.pp - pp_stage, micro_batches), first=pp_stage == 0,
                last=pp_stage == parallel.pp - 1, document_mask=document_mask,
                trains_audio=any(trains(p.name) for p in params if p.name.startswith("audio_tower.")),
                trains_vision=any(trains(p.name) for p in params if p.name.startswith("visual.")),
                loss_from_logits=(stage.base or stage.name) == "distill_offpolicy",
            )
            if extra_items is not None:
                estimate.items += extra_items(pp_stage)
            if worst is None or estimate.total > worst.total:
                worst = estimate
        estimates.append(worst)
    return estimates


def format_estimate(estimates: List[MemoryEstimate], gpu_memory_gb: float) -> str:
    """The peak phase's breakdown, each phase's total, and whether it fits ``gpu_memory_gb``."""
    peak = max(estimates, key=lambda e: e.total)
    lay = peak.layout
    lines = [f"memory per rank (estimate) on {lay.world_size} GPUs: dp={lay.dp}, optimizer state sharded "
             f"over {lay.dense_shards} (dense) / {lay.expert_shards} (experts) ranks, "
             f"{peak.micro_batches} micro-batch(es) per step"]
    where = f"phase {peak.phase}" + (f" on pp stage {peak.pipeline_stage}" if lay.pp > 1 else "")
    lines.append(f"  peak in {where}: {peak.trainable:,} trainable + {peak.frozen:,} frozen parameters")
    for item in peak.items:
        lines.append(f"    {item.label:<20} {item.bytes / GB:8.2f} GB  {item.detail}")
    lines.append(f"    {'total':<20} {peak.total / GB:8.2f} GB")
    if len(estimates) > 1:
        lines.append("  per phase: " + ", ".join(f"{e.phase} {e.total / GB:.2f} GB" for e in estimates))
    lines += [f"  note: {note}" for note in peak.notes]
    if peak.total <= gpu_memory_gb * GB:
        lines.append(f"  fits: {peak.total / GB:.2f} GB of {gpu_memory_gb:g} GB per GPU")
    else:
        largest = sorted(peak.items, key=lambda item: -item.bytes)[:3]
        lines.append(f"  DOES NOT FIT: {peak.total / GB:.2f} GB of {gpu_memory_gb:g} GB per GPU; largest terms: "
                     + ", ".join(f"{item.label} {item.bytes / GB:.2f} GB" for item in largest))
    return "\n".join(lines)
