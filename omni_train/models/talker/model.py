"""The Talker: megatron MoE backbone + conditioning projections + code predictor, and its teacher-forced
training forward.

    Talker
      backbone           TalkerGPTModel (backbone.py): embedding = codec_embedding, output_layer = codec_head
      text_projection    ResizeMLP: Thinker input embedding -> Talker hidden
      hidden_projection  ResizeMLP: Thinker accept-layer hidden (media placeholders) -> Talker hidden
      code_predictor     CodePredictor (code_predictor.py), replicated on every rank

Forward (teacher forcing, one backbone pass for the batch): each conversation's sequence is built by
``conditioning.teacher_forced_sequence`` inside the forward (projections and codec embeddings get their
gradients), sequences are right-padded (causal attention: padding never reaches a real position), then
- codebook 0: cross-entropy of ``codec_head`` at the positions that have a target;
- residual codebooks: the code predictor on [h_k, emb(C[k,0]), C[k,1..G-2]] for every frame of the batch
  at once ([frames, G] positions), output j against C[k,j];
- loss = mean CE(codebook 0) + residual_loss_weight * mean CE(residual); megatron's MoE aux loss enters
  its gradient inside the routers (MoEAuxLossAutoScaler) and its value goes to megatron's tracker, as for
  the Thinker.

Layout: tp = pp = cp = 1, any expert / data parallel degree (``build_talker`` refuses the others): the
sequences are built on the full sequence and the code predictor gathers states at frame positions; the
backbone itself is built for any tp / pp / ep (backbone.py).
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch import nn

from omni_train.config.schema import ParallelConfig
from omni_train.models.common.cross_entropy import cross_entropy
from omni_train.models.talker.backbone import TalkerGPTModel, build_talker_backbone
from omni_train.models.talker.code_predictor import CodePredictor
from omni_train.models.talker.conditioning import (
    IGNORE,
    TalkerSample,
    append_frame_positions,
    teacher_forced_sequence,
    text_position_ids,
)
from omni_train.models.talker.config import TalkerConfig, check_talker_config


class ResizeMLP(nn.Module):
    """transformers' Qwen3OmniMoeTalkerResizeMLP: Linear(Ht -> F, bias), SiLU, Linear(F -> H, bias)."""

    def __init__(self, in_size: int, ffn_size: int, out_size: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(in_size, ffn_size, bias=True)
        self.linear_fc2 = nn.Linear(ffn_size, out_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig, backbone: TalkerGPTModel, code_predictor: CodePredictor,
                 text_projection: ResizeMLP, hidden_projection: ResizeMLP):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.text_projection = text_projection
        self.hidden_projection = hidden_projection
        self.code_predictor = code_predictor

    @property
    def config(self):
        """The backbone's TransformerConfig (what megatron's DDP and the loop read)."""
        return self.backbone.config

    @property
    def model_type(self):
        return self.backbone.model_type

    def set_input_tensor(self, input_tensor) -> None:
        self.backbone.set_input_tensor(input_tensor)

    REPLICATED = ("text_projection", "hidden_projection", "code_predictor")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron's sharded state of the backbone under ``backbone.``; the replicated parts (projections,
        code predictor) as replicated ShardedTensors under their module names (data-parallel rank 0 writes).
        Keys are this module's state-dict keys, so ``load_state_dict`` takes what dist_checkpointing loads."""
        state = dict(self.backbone.sharded_state_dict(prefix=f"{prefix}backbone.", sharded_offsets=sharded_offsets,
                                                      metadata=metadata))
        replica = _data_parallel_rank()
        for part in self.REPLICATED:
            for name, tensor in getattr(self, part).state_dict(keep_vars=True).items():
                key = f"{prefix}{part}.{name}"
                state[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=replica)
        return state

    def codec_embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.codec_embed(ids)

    def backbone_hidden(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """[B, S, H] inputs, [3, B, S] positions -> final normed hidden states [B, S, H]."""
        hidden = self.backbone.final_hidden(inputs_embeds.transpose(0, 1).contiguous(), position_ids)
        return hidden.transpose(0, 1)

    def codec_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """codec_head: [..., H] -> [..., codec vocab]."""
        flat = hidden.reshape(-1, 1, hidden.shape[-1])
        logits, _ = self.backbone.output_layer(flat)
        return logits.view(*hidden.shape[:-1], -1)

    def residual_logits(self, states: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """states [N, H] (the hidden state that predicted each frame's codebook 0), codes [N, G] ->
        teacher-forced logits of codebooks 1 .. G-1, [N, G-1, codebook size]."""
        return self.code_predictor.logits(states, self.codec_embed(codes[:, 0]).to(states.dtype), codes)

    # ----- teacher forcing --------------------------------------------------------------------------

    def teacher_forced_batch(self, samples: List[TalkerSample]) -> Dict[str, torch.Tensor]:
        """Right-padded batch: inputs_embeds [B, S, H], position_ids [3, B, S], codec0_targets [B, S],
        state_index ([N] rows, [N] positions) of every frame's codebook-0 prediction, codes [N, G]."""
        built = [teacher_forced_sequence(self, self.cfg, sample) for sample in samples]
        longest = max(embeds.shape[0] for embeds, *_ in built)
        embeds, targets, positions, rows, states = [], [], [], [], []
        for row, (sample, (seq, target, state, _)) in enumerate(zip(samples, built)):
            pad = longest - seq.shape[0]
            embeds.append(F.pad(seq, (0, 0, 0, pad)))
            targets.append(F.pad(target, (0, pad), value=IGNORE))
            pos = sample.position_ids
            if pos is None:
                pos = text_position_ids(seq.shape[0], device=seq.device)
            pos = append_frame_positions(pos, pad) if pad else pos  # padding: any positions (never attended)
            positions.append(pos)
            rows.append(torch.full_like(state, row))
            states.append(state)
        return dict(inputs_embeds=torch.stack(embeds), position_ids=torch.stack(positions, dim=1),
                    codec0_targets=torch.stack(targets), state_index=(torch.cat(rows), torch.cat(states)),
                    codes=torch.cat([s.codes for s in samples]))

    def forward(self, samples: List[TalkerSample], return_logits: bool = False) -> Dict[str, torch.Tensor]:
        """Losses of a batch of conversations: ``loss`` (to optimise), ``loss_codec0`` and ``loss_residual``
        (detached means), ``report`` ({name: [sum, count]}, the loop's loss report); with ``return_logits``
        also ``codec0_logits`` [B, S, V] (every position) and ``residual_logits`` [N, G-1, V_c]."""
        batch = self.teacher_forced_batch(samples)
        hidden = self.backbone_hidden(batch["inputs_embeds"], batch["position_ids"])
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
            out.update(codec0_logits=codec0_logits, residual_logits=residual_logits, hidden=hidden)
        return out


def _data_parallel_rank() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def _check_layout(parallel_cfg: ParallelConfig) -> None:
    if parallel_cfg.tp > 1 or parallel_cfg.pp > 1 or parallel_cfg.cp > 1 or parallel_cfg.sequence_parallel:
        raise NotImplementedError(
            "Talker builds its sequences and the code predictor's inputs on the full sequence: tp, pp, cp must "
            f"be 1 and sequence_parallel off (got tp={parallel_cfg.tp} pp={parallel_cfg.pp} cp={parallel_cfg.cp} "
            f"sp={parallel_cfg.sequence_parallel})")


def build_talker(cfg: TalkerConfig, parallel_cfg: ParallelConfig, *, device, params_dtype: torch.dtype,
                 recompute: str = "none") -> Talker:
    """The Talker on ``device`` (megatron's parallel_state initialised by the caller)."""
    check_talker_config(cfg)
    _check_layout(parallel_cfg)
    backbone = build_talker_backbone(cfg, parallel_cfg, device=device, params_dtype=params_dtype,
                                     recompute=recompute)
    with torch.device(device):
        code_predictor = CodePredictor(cfg.code_predictor, cfg.num_code_groups, init_std=cfg.init_std)
        projections = [ResizeMLP(cfg.thinker_hidden_size, cfg.projection_ffn_hidden_size, cfg.hidden_size)
                       for _ in range(2)]
    for projection in projections:
        _init_linear(projection, cfg.init_std)
    return Talker(cfg, backbone, code_predictor.to(params_dtype), *(p.to(params_dtype) for p in projections))


@torch.no_grad()
def _init_linear(module: nn.Module, std: float) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.weight.normal_(0.0, std)
            if sub.bias is not None:
                sub.bias.zero_()
