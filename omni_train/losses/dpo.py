"""DPO for the Talker: per-sequence log-probabilities of its codes, and the preference losses on them.

**Sequence log-probabilities** (``sequence_logprobs``) from the Talker's teacher-forced forward
(``Talker.forward(samples, return_logits=True)`` and ``teacher_forced_layout``):

- ``codec0_logits`` [B, L, V] with ``codec0_targets`` [B, L] (IGNORE = -100 where no target): codebook 0;
- ``residual_logits`` [N, G-1, V_c] with the frames' ``codes`` [N, G] and ``state_index`` (rows [N],
  positions [N]: where each frame's codebook 0 was predicted): codebooks 1 .. G-1 (the code predictor's heads).

``codebooks="first"`` sums codebook 0 over a sequence's positions (eos included); ``"all"`` adds every frame's
G-1 residual codes (the MagpieTTS choice; a Qwen3-TTS DPO port uses codebook 0 only: talker_facts.md). Rows
hold one sequence each, or several packed (``sample_ids`` [B, L]: the sequence's index, -1 elsewhere); a frame
belongs to the sequence, and the mask, of the position that predicted its codebook 0. Computed in fp32
(fp64 kept). ``codec_logits`` gathers the codec vocabulary over tensor-parallel ranks and the code predictor
is replicated, so the Talker's logits are whole on every rank: the default ``group=None`` is right for them
(``"auto"`` would read them as a shard); vocabulary-parallel logits take the tp group (onpolicy.token_logprobs).

**Losses** (``dpo_loss``), per pair, with the policy's and the frozen reference's summed log-probabilities
(pi_c, pi_r, ref_c, ref_r) and ``d = (pi_c - ref_c) - (pi_r - ref_r)``; trl 1.16's ``DPOTrainer._compute_loss``
line for line (tests/posttrain/test_dpo_loss.py compares value and gradient):

    sigmoid   -log sigmoid(beta d)
              label smoothing e (cDPO): -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)   [1]
    ipo       (d_c / n_c - d_r / n_r - 1 / (2 beta))^2, d_c = pi_c - ref_c, n = the sequence's summed targets
              (trl divides the summed log-ratios by each completion's token count, clamped >= 1)
    robust    (-(1 - e) log sigmoid(beta d) + e log sigmoid(-beta d)) / (1 - 2 e),  0 <= e < 0.5

[1] trl 1.16's "sigmoid" ignores ``label_smoothing`` (it means Robust DPO or EXO there); the cDPO form is
older trl's sigmoid and 1.16's "aot" formula, which at one pair is exactly it (the test uses that).

Rewards, as trl logs them (summed log-probabilities, also for ipo): beta (pi - ref), accuracy
[r_c > r_r], margin r_c - r_r. The optional SFT term is trl's ``loss_type=[<dpo>, "sft"]`` with
``loss_weights=[1, w]`` (older trl's ``rpo_alpha``, gone from 1.16, added the same term): w times the
chosen codes' NLL averaged over all the batch's chosen targets, ``w * sum(-pi_c) / sum(n_c)``; trl's batch
loss is mean(losses) + that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from omni_train.losses.onpolicy import token_logprobs

IGNORE = -100
CODEBOOKS = ("first", "all")
LOSS_TYPES = ("sigmoid", "ipo", "robust")


def _sequence_of_positions(targets: torch.Tensor, sample_ids: Optional[torch.Tensor]) -> torch.Tensor:
    if sample_ids is not None:
        return sample_ids.long()
    rows = torch.arange(targets.shape[0], device=targets.device)
    return rows.unsqueeze(1).expand_as(targets)


def sequence_logprobs(codec0_logits: torch.Tensor, codec0_targets: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, sample_ids: Optional[torch.Tensor] = None, *,
                      codebooks: str = "first", residual_logits: Optional[torch.Tensor] = None,
                      codes: Optional[torch.Tensor] = None,
                      state_index: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                      num_sequences: Optional[int] = None, group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log-probability sums [S], target counts [S]) per sequence (module docstring). Sequence s is row s
    (``sample_ids`` None; S = B) or the positions where ``sample_ids`` == s (S = ``num_sequences``, default
    max id + 1); a sequence without targets gets 0 and count 0. ``mask`` [B, L] (default: targets !=
    IGNORE) picks the codebook-0 positions, and with them the frames they predict. Counts are targets
    summed: codebook-0 positions, plus G-1 per frame for ``"all"``. Differentiable through the logits.
    ``group``: the tensor-parallel group when ``codec0_logits`` is this rank's vocabulary shard (None: whole)."""
    if codebooks not in CODEBOOKS:
        raise ValueError(f"codebooks must be one of {CODEBOOKS}, got {codebooks!r}")
    if codec0_logits.shape[:-1] != codec0_targets.shape:
        raise ValueError(f"codec0 logits {tuple(codec0_logits.shape)} do not fit targets {tuple(codec0_targets.shape)}")
    valid = (codec0_targets != IGNORE) if mask is None else mask.bool()
    if sample_ids is not None:
        valid = valid & (sample_ids >= 0)
    owner = _sequence_of_positions(codec0_targets, sample_ids)
    if num_sequences is None:
        num_sequences = int(sample_ids.max().clamp_min(-1)) + 1 if sample_ids is not None else codec0_targets.shape[0]
    picked = token_logprobs(codec0_logits[valid], codec0_targets[valid], group=group)  # [T]
    sums = picked.new_zeros(num_sequences).index_add(0, owner[valid], picked)
    counts = torch.zeros(num_sequences, dtype=torch.long, device=sums.device)
    counts = counts.index_add(0, owner[valid], torch.ones_like(owner[valid]))
    if codebooks == "first":
        return sums, counts
    if residual_logits is None or codes is None or state_index is None:
        raise ValueError('codebooks="all" needs residual_logits, codes and state_index')
    if residual_logits.shape[:2] != codes[:, 1:].shape:
        raise ValueError(f"residual logits {tuple(residual_logits.shape)} do not fit codes {tuple(codes.shape)}")
    rows, positions = state_index
    kept = valid[rows, positions]  # [N] frames whose codebook-0 position counts
    residual = token_logprobs(residual_logits[kept], codes[kept, 1:], group=None).sum(-1)  # replicated heads
    frame_owner = owner[rows, positions][kept]
    dtype = torch.promote_types(sums.dtype, residual.dtype)
    sums = sums.to(dtype).index_add(0, frame_owner, residual.to(dtype))
    counts = counts.index_add(0, frame_owner, torch.full_like(frame_owner, codes.shape[1] - 1))
    return sums, counts


@dataclass
class DPOTerms:
    """One batch of pairs: the differentiable losses and what trl logs (all per pair, [P])."""

    losses: torch.Tensor  # preference loss per pair (differentiable)
    chosen_rewards: torch.Tensor  # beta (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor  # beta (pi_r - ref_r), detached
    reward_accuracy: torch.Tensor  # 1.0 where chosen reward > rejected reward
    reward_margin: torch.Tensor  # chosen reward - rejected reward
    chosen_logps: torch.Tensor  # the policy's summed log-probabilities, detached
    rejected_logps: torch.Tensor
    sft_nll: Optional[torch.Tensor] = None  # -pi_c, the chosen codes' summed NLL (differentiable); None without SFT
    chosen_tokens: Optional[torch.Tensor] = None  # n_c (float), with the SFT term
    sft_weight: float = 0.0

    def loss(self) -> torch.Tensor:
        """trl's batch loss: mean over pairs + sft_weight * NLL per chosen target over the batch."""
        total = self.losses.mean()
        if self.sft_nll is not None:
            total = total + self.sft_weight * self.sft_nll.sum() / self.chosen_tokens.sum()
        return total

    def report(self) -> Dict[str, torch.Tensor]:
        """The loop's {name: [sum, count]} (loops/report.py), detached: reduced over the global batch, each
        is trl's batch mean. ``loss_sft`` is the NLL per chosen target (without its weight)."""
        pairs = self.losses.new_tensor(float(self.losses.numel()))
        named = dict(loss_dpo=self.losses.detach(), rewards_chosen=self.chosen_rewards,
                     rewards_rejected=self.rejected_rewards, rewards_accuracy=self.reward_accuracy,
                     rewards_margin=self.reward_margin, logps_chosen=self.chosen_logps,
                     logps_rejected=self.rejected_logps)
        out = {name: torch.stack([value.sum().to(pairs.dtype), pairs]) for name, value in named.items()}
        if self.sft_nll is not None:
            out["loss_sft"] = torch.stack([self.sft_nll.detach().sum(), self.chosen_tokens.sum()]).to(pairs.dtype)
        return out


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _lengths(lengths: Optional[torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    if lengths is None:
        raise ValueError(f"this DPO loss needs {name} (the summed targets per sequence, from sequence_logprobs)")
    return lengths.to(like.dtype).clamp(min=1.0)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Optional[torch.Tensor] = None, rejected_lengths: Optional[torch.Tensor] = None,
             sft_weight: float = 0.0) -> DPOTerms:
    """Per-pair DPO losses of summed log-probabilities [P] (module docstring); the reference's are detached.
    ``ipo`` needs both lengths, the SFT term (``sft_weight`` > 0) ``chosen_lengths``. fp32 (fp64 kept)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("ipo takes no label_smoothing")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO wants 0 <= label_smoothing < 0.5, got {label_smoothing}")
    pi_c, pi_r = _at_least_fp32(policy_chosen), _at_least_fp32(policy_rejected)
    chosen_logratios = pi_c - _at_least_fp32(ref_chosen.detach()).to(pi_c.dtype)
    rejected_logratios = pi_r - _at_least_fp32(ref_rejected.detach()).to(pi_r.dtype)
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if label_smoothing:
            losses = losses * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:
        ipo_delta = chosen_logratios / _lengths(chosen_lengths, "chosen_lengths", pi_c) \
            - rejected_logratios / _lengths(rejected_lengths, "rejected_lengths", pi_r)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    terms = DPOTerms(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                     reward_accuracy=(chosen_rewards > rejected_rewards).to(losses.dtype),
                     reward_margin=chosen_rewards - rejected_rewards, chosen_logps=pi_c.detach(),
                     rejected_logps=pi_r.detach())
    if sft_weight:
        terms.sft_nll = -pi_c
        if chosen_lengths is None:
            raise ValueError("the SFT term needs chosen_lengths (the summed targets per sequence)")
        terms.chosen_tokens = chosen_lengths.to(pi_c.dtype)  # trl: a mean over the chosen tokens, unclamped
        terms.sft_weight = float(sft_weight)
    return terms
