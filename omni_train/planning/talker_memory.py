"""Per-rank GPU memory of a run that trains the Talker with the Thinker frozen beside it (``model.talker``
set), estimated from the configs as ``memory_estimate.py`` does for the Thinker (nothing is built).

Layout: tp = pp = cp = 1 (validate.py), ep splits the routed experts of both networks, the rest is data
parallel. One rank holds, at the peak of a step:

Model states
  * the Talker as the trained model (``memory_estimate.state_items``): its parameters (bf16), an fp32
    gradient buffer and sharded optimizer state for the parameters the phase trains (stage patterns over
    ``talker.<name>``, param_inventory.py; speaker_finetune's ``voice.row`` besides), dense ones sharded over
    all ranks, experts over world / ep;
  * the Thinker conditioning it: parameters only (frozen: no gradients, no optimizer state; its forward
    runs under no_grad and keeps nothing but the two signals below).

Activations, per micro-batch of micro_batch_size x seq_length Talker positions, worst case every position
a codec frame (each frame feeds the code predictor and has a codebook-0 and 15 residual targets):
  * each backbone layer: the Thinker LM layer's rule (attention, router, routed experts) plus the gated
    shared expert (5 Fs like a routed expert, its output h kept for the gate's product, the gate's logit
    and sigmoid); with trainer.recompute=full only each layer's input and one recomputed layer;
  * the sequence the Talker reads: codec embeddings, projection outputs and their sum (3h per position);
  * conditioning: the Thinker's captured input embeddings and accept-layer states ([tokens, Ht] each) and,
    per position, one projection's input, fc1 output and SiLU output (Ht + 2 Fp);
  * the code predictor on every frame (G positions, never recomputed): per layer and position the LM
    attention rule (2h + (5a + 3g) d) and a SwiGLU MLP (2h + 4F: norm input/output, gate and up outputs,
    SiLU, product), plus its inputs and final norm (2h);
  * logits: codebook 0 ([tokens, codec vocab]) and the residual codebooks ([frames, G - 1, codebook]), in
    the parameter dtype plus an fp32 softmax, live together at the end of the forward; with recompute the
    larger of them and one recomputed layer.
  * the frozen Thinker's forward (no_grad, before the Talker's; it stops after the accept layer: no later layer,
    no logits, models/talker/thinker_signals.py ``run_to_accept_layer``): one layer's activations; live before
    the Talker's activations exist, so it is one more candidate of the step's peak (with the logits and the
    recomputed layer), an upper bound when it is added to what the Talker keeps.

What the stage holds besides (``TalkerRun``, from the stage's code and model.code2wav):
  * talker_dpo: a micro-batch of micro_batch_size pairs runs 2 x micro_batch_size rows (the chosen, then the
    rejected) through the Thinker and the policy Talker; a frozen reference Talker of the trained one's sizes
    and layout (its parameters in the parameter dtype, no gradients or optimizer state) and its logits
    ([rows x seq_length, codec vocab] + residual, no_grad, in the parameter dtype), which stay live with the
    policy's until the DPO loss: counted as if live through the whole step (an upper bound, as
    frozen_memory.py counts a teacher's logits);
  * model.code2wav: a frozen Code2Wav (parameters only, replicated; the export takes an import's from its
    checkpoint, so a run from an import need not hold one).
Not counted, besides what memory_estimate.py leaves out: the frozen towers' forward transients and the
reference Talker's own forward transients (one layer at a time under no_grad).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from omni_train.config.schema import ParallelConfig, StageConfig, ThinkerConfig, TrainerConfig
from omni_train.config.talker import TalkerConfig
from omni_train.planning.memory_estimate import (
    FP32,
    Layout,
    MemoryEstimate,
    MemoryItem,
    lm_layer_activation_bytes,
    micro_batch_plan,
    param_bytes,
    stage_phases,
    state_items,
    trains_in_phase,
)
from omni_train.planning.param_inventory import RankParam, rank_parameters, talker_rank_parameters

TALKER_PREFIX = "talker."
VOICE_ROW = "voice.row"  # speaker_finetune's voice: its codec-embedding row, a parameter of its own
# stage code (stage.base or stage.name) that trains on preference pairs against a frozen reference Talker
PREFERENCE_STAGES = ("talker_dpo",)
VOICE_STAGES = ("speaker_finetune",)


@dataclass(frozen=True)
class TalkerRun:
    """What a Talker stage runs and holds besides the trained Talker and the frozen Thinker."""

    rows_per_sample: int = 1  # rows one sample of micro_batch_size runs: 2 for a preference pair
    reference: bool = False  # a frozen reference Talker of the trained one's sizes (its parameters and logits)
    code2wav_parameters: int = 0  # a frozen Code2Wav's parameters (model.code2wav), 0: none held
    voice: bool = False  # a voice's own codec-embedding row (``voice.row``, hidden_size), trained by the patterns


def talker_run(stage: StageConfig, code2wav_parameters: int = 0) -> TalkerRun:
    """The stage's ``TalkerRun`` (``code2wav_parameters``: model.code2wav's count, 0 without one)."""
    code = stage.base or stage.name
    preference = code in PREFERENCE_STAGES
    return TalkerRun(rows_per_sample=2 if preference else 1, reference=preference,
                     code2wav_parameters=code2wav_parameters, voice=code in VOICE_STAGES)


def talker_layer_activation_bytes(talker: TalkerConfig, tokens: int, act: int) -> int:
    """Bytes one backbone layer keeps for backward for ``tokens`` positions (tp = 1, no recomputation). The
    TalkerConfig has the LM layer's size fields (hidden, heads, groups, head_dim, experts, top-k, FFN)."""
    routed = lm_layer_activation_bytes(talker, ParallelConfig(), tokens, act)
    shared = act * tokens * (5 * talker.shared_expert_ffn_hidden_size + talker.hidden_size + 2)
    return routed + shared


def code_predictor_bytes_per_frame(talker: TalkerConfig, act: int) -> int:
    """Bytes the code predictor keeps for backward per frame (its G positions), logits excluded."""
    cp = talker.code_predictor
    h, d = cp.hidden_size, cp.head_dim
    per_layer = 2 * h + (5 * cp.num_attention_heads + 3 * cp.num_query_groups) * d + 2 * h + 4 * cp.ffn_hidden_size
    return act * talker.num_code_groups * (cp.num_layers * per_layer + 2 * h)


def talker_logit_bytes(talker: TalkerConfig, tokens: int, act: int) -> int:
    """Codebook-0 logits at every position and residual logits of every frame (worst case: frames = tokens),
    in the parameter dtype plus the fp32 softmax of the cross-entropy."""
    per_logit = act + (FP32 if act != FP32 else 0)
    residual = (talker.num_code_groups - 1) * talker.code_predictor.codebook_size
    return tokens * (talker.codec_vocab_size + residual) * per_logit


def thinker_forward_bytes(thinker: ThinkerConfig, tokens: int, act: int) -> int:
    """The frozen Thinker's forward under no_grad, stopped after the accept layer: one layer's activations (an
    upper bound: a layer keeps nothing for backward, its transients are at most what it would keep)."""
    return lm_layer_activation_bytes(thinker, ParallelConfig(), tokens, act)


def _activation_items(talker: TalkerConfig, thinker: ThinkerConfig, trainer: TrainerConfig,
                      rows_per_sample: int) -> List[MemoryItem]:
    act = param_bytes(trainer)
    tokens = rows_per_sample * trainer.micro_batch_size * trainer.seq_length
    h, layers = talker.hidden_size, talker.num_layers
    layer = talker_layer_activation_bytes(talker, tokens, act)
    recompute = trainer.recompute == "full"
    if recompute:
        items = [MemoryItem("Talker layer inputs", layers * act * tokens * h, f"{layers} layers, full recompute")]
    else:
        items = [MemoryItem("Talker activations", layers * layer, f"{layers} layers x {layer / 1e9:.2f} GB")]
    ht, fp = talker.thinker_hidden_size, talker.projection_ffn_hidden_size
    items += [
        MemoryItem("Talker inputs", 3 * act * tokens * h, "codec embeddings, projection outputs, their sum"),
        MemoryItem("conditioning", act * tokens * (3 * ht + 2 * fp),
                   "Thinker embeddings + accept-layer states, one projection per position"),
        MemoryItem("code predictor", tokens * code_predictor_bytes_per_frame(talker, act),
                   f"worst case: all {tokens:,} positions frames of {talker.num_code_groups} positions"),
    ]
    logits = MemoryItem("logits and loss", talker_logit_bytes(talker, tokens, act),
                        f"codebook 0 [{tokens:,}, {talker.codec_vocab_size:,}] + residual [{tokens:,}, "
                        f"{talker.num_code_groups - 1}, {talker.code_predictor.codebook_size:,}], + fp32 softmax")
    thinker_forward = MemoryItem("Thinker forward", thinker_forward_bytes(thinker, tokens, act),
                                 "no_grad, before the Talker's: one layer (it stops after the accept layer)")
    peaks = [logits, thinker_forward] + ([MemoryItem("recomputed layer", layer, "one layer's activations in "
                                                     "backward")] if recompute else [])
    return items + [max(peaks, key=lambda item: item.bytes)]


def _side_items(run: TalkerRun, talker: TalkerConfig, reference_held: int, trainer: TrainerConfig
                ) -> List[MemoryItem]:
    """The reference Talker (parameters and logits) and the Code2Wav, when the stage holds them."""
    pbytes = param_bytes(trainer)
    items = []
    if run.reference:
        tokens = run.rows_per_sample * trainer.micro_batch_size * trainer.seq_length
        items += [
            MemoryItem("reference Talker", pbytes * reference_held,
                       f"frozen: {reference_held:,} parameters (the trained Talker's), no gradients or optimizer "
                       "state"),
            MemoryItem("reference logits", pbytes * tokens * (talker.codec_vocab_size + (talker.num_code_groups - 1)
                                                             * talker.code_predictor.codebook_size),
                       f"no_grad: codebook 0 [{tokens:,}, {talker.codec_vocab_size:,}] + residual, live until "
                       "the DPO loss"),
        ]
    if run.code2wav_parameters:
        items.append(MemoryItem("Code2Wav (frozen)", pbytes * run.code2wav_parameters,
                                f"{run.code2wav_parameters:,} parameters, replicated"))
    return items


def estimate_talker_memory(talker: TalkerConfig, thinker: ThinkerConfig, parallel: ParallelConfig,
                           trainer: TrainerConfig, stage: StageConfig, world_size: int,
                           master_weights: bool = True, run: TalkerRun = TalkerRun()) -> List[MemoryEstimate]:
    """One estimate per phase of the stage: the Talker trained (the phase's patterns over ``talker.*``
    names), the Thinker frozen; ``master_weights``: optim.master_weights; ``run``: what the stage holds
    besides (``talker_run``: a reference Talker, a Code2Wav, rows per sample)."""
    if (parallel.tp, parallel.pp, parallel.cp) != (1, 1, 1) or world_size < 1 or world_size % parallel.ep:
        raise ValueError(f"world size {world_size} and tp={parallel.tp} pp={parallel.pp} cp={parallel.cp} "
                         f"ep={parallel.ep} are not a Talker layout (tp = pp = cp = 1, ep dividing the world)")
    layout = Layout(world_size, 1, 1, parallel.ep, 1)
    micro_batches, notes = micro_batch_plan(trainer, layout)
    talker_params = talker_rank_parameters(talker, parallel.ep)
    talker_held = sum(p.numel for p in talker_params)
    params = talker_params + ([RankParam(VOICE_ROW, talker.hidden_size, expert=False)] if run.voice else [])
    thinker_held = sum(p.numel for p in rank_parameters(thinker, parallel, 0))
    side_held = (talker_held if run.reference else 0) + run.code2wav_parameters
    pbytes = param_bytes(trainer)
    estimates = []
    for phase, trainable, frozen in stage_phases(stage):
        def trains(name: str) -> bool:
            return name.startswith((TALKER_PREFIX, VOICE_ROW)) and trains_in_phase(name, trainable, frozen)

        trained = sum(p.numel for p in params if trains(p.name))
        estimate = MemoryEstimate(phase=phase, pipeline_stage=0, layout=layout, micro_batches=micro_batches,
                                  notes=notes, trainable=trained,
                                  frozen=sum(p.numel for p in params) - trained + thinker_held + side_held)
        estimate.items += state_items(params, trains, layout, trainer, parallel.distributed_optimizer,
                                      master_weights)
        estimate.items.append(MemoryItem("Thinker (frozen)", pbytes * thinker_held,
                                         f"{thinker_held:,} parameters, no gradients or optimizer state"))
        estimate.items += _side_items(run, talker, talker_held, trainer)
        estimate.items += _activation_items(talker, thinker, trainer, run.rows_per_sample)
        if run.rows_per_sample > 1:
            estimate.notes = notes + [f"each of the micro-batch's {trainer.micro_batch_size} preference pair(s) "
                                      f"runs {run.rows_per_sample} rows (chosen, rejected)"]
        estimates.append(estimate)
    return estimates

