"""The Talker: megatron MoE backbone + conditioning projections + code predictor, and its teacher-forced
training forward.

    Talker
      backbone           TalkerGPTModel (backbone.py): embedding = codec_embedding, output_layer = codec_head
      text_projection    ResizeMLP: Thinker input embedding -> Talker hidden
      hidden_projection  ResizeMLP: Thinker accept-layer hidden (media placeholders) -> Talker hidden
      code_predictor     CodePredictor (code_predictor.py), replicated on every rank (of the last stage)

Forward (teacher forcing, one backbone pass for the batch): each conversation's sequence is built by
``conditioning.teacher_forced_sequence`` inside the forward (projections and codec embeddings get their
gradients), sequences are right-padded (causal attention: padding never reaches a real position), then
- codebook 0: cross-entropy of ``codec_head`` at the positions that have a target;
- residual codebooks: the code predictor on [h_k, emb(C[k,0]), C[k,1..G-2]] for every frame of the batch
  at once ([frames, G] positions), output j against C[k,j];
- loss = mean CE(codebook 0) + residual_loss_weight * mean CE(residual); megatron's MoE aux loss enters
  its gradient inside the routers (MoEAuxLossAutoScaler) and its value goes to megatron's tracker, as for
  the Thinker.

Layout: tensor parallel (with sequence parallelism, which megatron requires for MoE under tp), pipeline,
expert and data parallel, as the Thinker LM; cp = 1 (``config/talker.py``'s ``talker_layout_problems``
says why; ``build_talker`` refuses it). Under tp every rank of a tensor-parallel group gets the same
conversations and runs everything outside the backbone on the whole sequence, replicated:
- the sequence (projections, codec and residual embeddings) is built on every rank, then cut into the
  backbone's sequence-parallel chunks (``scatter_to_sequence_parallel_region``: its backward gathers the
  chunks' gradients, so every rank gets the whole input gradient); the sequence is right-padded to a
  multiple of tp inside ``backbone_hidden`` (causal: the padding reaches no real position, but its positions
  are routed and count in megatron's aux loss as the batch's own right padding does);
- the final hidden states are gathered back to the whole sequence (``gather_from_sequence_parallel_region``
  with a split backward: what follows computes the full gradient on every rank);
- ``codec_embedding`` and ``codec_head`` stay megatron's vocabulary-parallel tables (the checkpoint layout
  of the Thinker's): a lookup sums the rank's rows over the group (backbone.py); the head's input gradient
  is summed over the group (``copy_to_tensor_model_parallel_region``) and its logits gathered over the
  vocabulary (3072 wide: small next to the backbone), so the loss is the plain cross-entropy on every rank;
- the projections and the code predictor are plain replicated modules: their gradients come out complete
  and equal on every rank, and megatron's finalize_model_grads leaves them alone (it sums over tp only the
  parameters marked ``sequence_parallel`` and megatron's q/k layernorms).
Under pp every stage gets the same conversations (positions and targets come from the ids alone,
``teacher_forced_layout``); the first stage builds the sequence (projections, embeddings), every stage runs
its layers, the last runs ``codec_head``, the code predictor and the loss; ``forward`` returns the decoder
output on the other stages, for megatron's schedule (``get_forward_backward_func``; the backbone's config
has ``variable_seq_lengths``, each batch's longest conversation sets the shape sent). The tables both ends
read are copied and kept in step (pipeline.py).
Conditioning: the multimodal ``OmniThinker`` runs at tp = pp = cp = 1 only, so a Talker at tp > 1 or
pp > 1 conditions on a text-only Thinker LM at the same layout (no media placeholders in its context:
``hidden_projection`` gets no gradient). ``thinker_signals`` captures it at tp > 1 (sequence-parallel states
gathered) but not at pp > 1; there the first stage can read the text rows of the Thinker's embedding table,
which lives on the same first stage.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from torch import nn

from omni_train.config.schema import ParallelConfig
from omni_train.models.common.cross_entropy import cross_entropy
from omni_train.models.talker.backbone import TalkerGPTModel, build_talker_backbone, codec_rows
from omni_train.models.talker.code_predictor import CodePredictor
from omni_train.models.talker.conditioning import (
    IGNORE,
    TalkerSample,
    append_frame_positions,
    teacher_forced_sequence,
    teacher_forced_targets,
    text_position_ids,
)
from omni_train.models.talker.config import TalkerConfig, check_talker_config, talker_layout_problems
from omni_train.models.talker.pipeline import (
    codec_table_copy,
    copy_sharded_state,
    mark_shared_tables,
    residual_tables_copy,
    sync_copies,
)


class ResizeMLP(nn.Module):
    """transformers' Qwen3OmniMoeTalkerResizeMLP: Linear(Ht -> F, bias), SiLU, Linear(F -> H, bias)."""

    def __init__(self, in_size: int, ffn_size: int, out_size: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(in_size, ffn_size, bias=True)
        self.linear_fc2 = nn.Linear(ffn_size, out_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class Talker(nn.Module):
    """One pipeline stage of the Talker (all of it at pp = 1): the backbone's layers of this stage; on the
    first stage the projections, on the last the code predictor; under pp > 1 copies of the tables both
    ends read (pipeline.py). Parts a stage lacks are None. Registration order matters there: the codec
    table (copy) before the residual tables (copy or the code predictor's)."""

    def __init__(self, cfg: TalkerConfig, backbone: TalkerGPTModel, code_predictor: Optional[CodePredictor],
                 text_projection: Optional[ResizeMLP], hidden_projection: Optional[ResizeMLP],
                 codec_table: Optional[nn.Module] = None, residual_tables: Optional[nn.ModuleList] = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.codec_table = codec_table
        self.text_projection = text_projection
        self.hidden_projection = hidden_projection
        self.residual_tables = residual_tables
        self.code_predictor = code_predictor

    @property
    def config(self):
        """The backbone's TransformerConfig (what megatron's DDP and the loop read)."""
        return self.backbone.config

    @property
    def model_type(self):
        return self.backbone.model_type

    # what megatron's finalize_model_grads reads off a pipeline stage (the backbone's; no tied codec head)
    share_embeddings_and_output_weights = False

    @property
    def pre_process(self) -> bool:
        return self.backbone.pre_process

    @property
    def post_process(self) -> bool:
        return self.backbone.post_process

    def set_input_tensor(self, input_tensor) -> None:
        self.backbone.set_input_tensor(input_tensor)

    REPLICATED = ("text_projection", "hidden_projection", "code_predictor")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron's sharded state of the backbone under ``backbone.``; the replicated parts (projections,
        code predictor) as replicated ShardedTensors under their module names (written by tensor-parallel
        rank 0 of data-parallel rank 0), this stage's table copies as replicas of their owners' keys.
        Keys are this module's state-dict keys, so ``load_state_dict`` takes what dist_checkpointing loads."""
        state = dict(self.backbone.sharded_state_dict(prefix=f"{prefix}backbone.", sharded_offsets=sharded_offsets,
                                                      metadata=metadata))
        replica = _replica_id()
        for part in self.REPLICATED:
            if getattr(self, part) is None:
                continue
            for name, tensor in getattr(self, part).state_dict(keep_vars=True).items():
                key = f"{prefix}{part}.{name}"
                state[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=replica)
        state.update(copy_sharded_state(self, prefix))
        return state

    def codec_embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of codec_embedding (the backbone's on the first stage, the copy elsewhere)."""
        return self.backbone.codec_embed(ids) if self.backbone.pre_process else codec_rows(self.codec_table, ids)

    def residual_embed(self, residual_codes: torch.Tensor) -> torch.Tensor:
        """Codes of codebooks 1 .. k ([N, k]) -> [N, k, H] through the code predictor's codec_embedding (or,
        on a stage without it, the copy)."""
        tables = self.code_predictor.codec_embedding if self.code_predictor is not None else self.residual_tables
        return torch.stack([tables[j](residual_codes[:, j]) for j in range(residual_codes.shape[1])], dim=1)

    def backbone_hidden(self, inputs_embeds: Optional[torch.Tensor], position_ids: torch.Tensor) -> torch.Tensor:
        """[B, S, H] inputs on the first pipeline stage (None on the others: the previous stage's output
        arrives through ``set_input_tensor``), [3, B, S] positions -> on the last stage the final normed
        hidden states [B, S, H], the whole sequence on every tensor-parallel rank; on the others the
        decoder's output [S (/ tp), B, H] for the next stage (see the module docstring)."""
        length = position_ids.shape[-1]
        config = self.backbone.config
        split = config.sequence_parallel
        pad = -length % config.tensor_model_parallel_size if split else 0
        if pad:  # right padding to whole sequence-parallel chunks; positions continue past the last
            steps = torch.arange(1, pad + 1, device=position_ids.device, dtype=position_ids.dtype)
            position_ids = torch.cat([position_ids, position_ids[..., -1:] + steps], dim=-1)
        x = None
        if inputs_embeds is not None:
            x = F.pad(inputs_embeds, (0, 0, 0, pad)).transpose(0, 1).contiguous()
            if split:
                x = scatter_to_sequence_parallel_region(x)
        hidden = self.backbone.final_hidden(x, position_ids)
        if not self.backbone.post_process:
            return hidden
        if split:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden[:length].transpose(0, 1)

    def codec_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """codec_head: [..., H] (the same on every tensor-parallel rank) -> [..., codec vocab], the whole
        vocabulary on every rank (identities at tp = 1)."""
        rows = copy_to_tensor_model_parallel_region(hidden)
        return gather_from_tensor_model_parallel_region(F.linear(rows, self.backbone.output_layer.weight))

    def residual_logits(self, states: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """states [N, H] (the hidden state that predicted each frame's codebook 0), codes [N, G] ->
        teacher-forced logits of codebooks 1 .. G-1, [N, G-1, codebook size]."""
        return self.code_predictor.logits(states, self.codec_embed(codes[:, 0]).to(states.dtype), codes)

    # ----- teacher forcing --------------------------------------------------------------------------

    def teacher_forced_layout(self, samples: List[TalkerSample]) -> Dict[str, torch.Tensor]:
        """What every pipeline stage knows from the ids alone, right-padded: position_ids [3, B, S],
        codec0_targets [B, S], state_index ([N] rows, [N] positions) of every frame's codebook-0
        prediction, codes [N, G]."""
        built = [teacher_forced_targets(self.cfg, sample) for sample in samples]
        longest = max(target.shape[0] for target, _ in built)
        targets, positions, rows, states = [], [], [], []
        for row, (sample, (target, state)) in enumerate(zip(samples, built)):
            pad = longest - target.shape[0]
            targets.append(F.pad(target, (0, pad), value=IGNORE))
            pos = sample.position_ids
            if pos is None:
                pos = text_position_ids(target.shape[0], device=target.device)
            pos = append_frame_positions(pos, pad) if pad else pos  # padding: any positions (never attended)
            positions.append(pos)
            rows.append(torch.full_like(state, row))
            states.append(state)
        return dict(position_ids=torch.stack(positions, dim=1), codec0_targets=torch.stack(targets),
                    state_index=(torch.cat(rows), torch.cat(states)), codes=torch.cat([s.codes for s in samples]))

    def teacher_forced_inputs(self, samples: List[TalkerSample], length: int) -> torch.Tensor:
        """inputs_embeds [B, length, H] (first pipeline stage), right-padded."""
        embeds = [teacher_forced_sequence(self, self.cfg, sample)[0] for sample in samples]
        return torch.stack([F.pad(seq, (0, 0, 0, length - seq.shape[0])) for seq in embeds])

    def teacher_forced_batch(self, samples: List[TalkerSample]) -> Dict[str, torch.Tensor]:
        """``teacher_forced_layout`` with ``inputs_embeds`` [B, S, H] (a whole Talker: pp = 1)."""
        batch = self.teacher_forced_layout(samples)
        batch["inputs_embeds"] = self.teacher_forced_inputs(samples, batch["codec0_targets"].shape[1])
        return batch

    def forward(self, samples: List[TalkerSample], return_logits: bool = False):
        """Losses of a batch of conversations: ``loss`` (to optimise), ``loss_codec0`` and ``loss_residual``
        (detached means), ``report`` ({name: [sum, count]}, the loop's loss report); with ``return_logits``
        also ``codec0_logits`` [B, S, V] (every position), ``residual_logits`` [N, G-1, V_c] and ``layout``
        (``teacher_forced_layout``: the targets, frames and state index they go with). Under
        pipeline parallelism every stage gets the same ``samples``; stages before the last return their
        decoder output (the tensor megatron's schedule sends on), the last stage the losses."""
        batch = self.teacher_forced_layout(samples)
        inputs = None
        if self.backbone.pre_process:
            inputs = self.teacher_forced_inputs(samples, batch["codec0_targets"].shape[1])
        hidden = self.backbone_hidden(inputs, batch["position_ids"])
        if not self.backbone.post_process:
            return hidden
        targets = batch["codec0_targets"]
        if return_logits:
            codec0_logits = self.codec_logits(hidden)
            picked = codec0_logits[targets != IGNORE]
        else:
            picked = self.codec_logits(hidden[targets != IGNORE])
        codec0 = cross_entropy(picked, targets[targets != IGNORE])
        states = hidden[batch["state_index"]]
        residual_logits = self.residual_logits(states, batch["codes"])
        residual = cross_entropy(residual_logits.flatten(0, 1), batch["codes"][:, 1:].reshape(-1))
        loss = codec0.mean() + self.cfg.residual_loss_weight * residual.mean()
        report = {"loss_codec0": torch.stack([codec0.detach().sum(), codec0.new_tensor(codec0.numel())]),
                  "loss_residual": torch.stack([residual.detach().sum(), residual.new_tensor(residual.numel())])}
        out = dict(loss=loss, loss_codec0=codec0.detach().mean(), loss_residual=residual.detach().mean(),
                   report=report)
        if return_logits:
            out.update(codec0_logits=codec0_logits, residual_logits=residual_logits, hidden=hidden, layout=batch)
        return out


def _replica_id():
    """A replicated tensor's replica id: (0, tp rank, data-parallel rank); only (0, 0, 0) writes."""
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return (0, parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _check_layout(cfg: TalkerConfig, parallel_cfg: ParallelConfig) -> None:
    """NotImplementedError for cp > 1, ValueError for a layout that does not fit the sizes; both name
    the key (config/talker.py: talker_layout_problems)."""
    problems = talker_layout_problems(cfg, parallel_cfg)
    if problems:
        key, problem = problems[0]
        error = NotImplementedError if key == "parallel.cp" else ValueError
        raise error(f"talker layout: {key}: {problem}")


@torch.no_grad()
def _sync_replicated(talker: "Talker") -> None:
    """Every tensor-parallel rank starts from tp rank 0's projections and code predictor (their random
    init draws need not agree across ranks); nothing to do at tp = 1."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    source = parallel_state.get_tensor_model_parallel_src_rank()
    for part in Talker.REPLICATED + ("residual_tables",):
        if getattr(talker, part) is not None:
            for tensor in getattr(talker, part).state_dict().values():
                torch.distributed.broadcast(tensor, source, group=group)


def build_talker(cfg: TalkerConfig, parallel_cfg: ParallelConfig, *, device, params_dtype: torch.dtype,
                 recompute: str = "none", pre_process: Optional[bool] = None,
                 post_process: Optional[bool] = None) -> Talker:
    """This rank's Talker on ``device`` (megatron's parallel_state initialised by the caller; at pp = 1 a
    meta build needs none): the pipeline stage that ``pre_process`` / ``post_process`` name (first / last
    stage; None: this rank's, from megatron's parallel_state; always both at pp = 1)."""
    check_talker_config(cfg)
    _check_layout(cfg, parallel_cfg)
    staged = parallel_cfg.pp > 1
    first = not staged or (parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process)
    last = not staged or (parallel_state.is_pipeline_last_stage() if post_process is None else post_process)
    backbone = build_talker_backbone(cfg, parallel_cfg, device=device, params_dtype=params_dtype,
                                     pre_process=first, post_process=last, recompute=recompute)
    parts = dict(code_predictor=None, text_projection=None, hidden_projection=None)
    with torch.device(device):
        if last:
            parts["code_predictor"] = CodePredictor(cfg.code_predictor, cfg.num_code_groups, init_std=cfg.init_std)
        if first:
            for name in ("text_projection", "hidden_projection"):
                parts[name] = ResizeMLP(cfg.thinker_hidden_size, cfg.projection_ffn_hidden_size, cfg.hidden_size)
            for name in ("text_projection", "hidden_projection"):
                _init_linear(parts[name], cfg.init_std)
        if not first:
            parts["codec_table"] = codec_table_copy(backbone.config, cfg.codec_vocab_size, cfg.hidden_size)
        if not last:
            parts["residual_tables"] = residual_tables_copy(cfg.num_code_groups - 1, cfg.code_predictor.codebook_size,
                                                            cfg.hidden_size)
    parts = {name: part.to(device=device, dtype=params_dtype) if part is not None else None
             for name, part in parts.items()}
    talker = Talker(cfg, backbone, **parts)
    if staged:
        mark_shared_tables(talker)
    if torch.device(device).type != "meta":
        _sync_replicated(talker)
        if staged:
            sync_copies(talker)
    return talker


@torch.no_grad()
def _init_linear(module: nn.Module, std: float) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.weight.normal_(0.0, std)
            if sub.bias is not None:
                sub.bias.zero_()
