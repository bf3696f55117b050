"""DPO losses (omni_train/losses/dpo.py) against trl 1.16's DPOTrainer._compute_loss, float64, value and
gradient with respect to the codebook-0 logits: trl's trainer is built with ``__new__`` and a real DPOConfig and
Accelerator; only its model is a stub whose forward returns the per-token log-probabilities of the same logits
(reference log-probabilities precomputed, as trl's ``precompute_ref_log_probs``). Ours reads the logits one
sequence per row or packed several per row. Also: sequence_logprobs against log_softmax / gather / sum
written out, for codebook 0 and for all code groups; step 0 (policy == reference); rewards by hand."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch.testing import assert_close
from trl import DPOConfig, DPOTrainer

from omni_train.losses.dpo import IGNORE, dpo_loss, sequence_logprobs

P = 4  # pairs
CHOSEN_LENGTHS = [5, 3, 7, 2]  # codebook-0 targets per sequence (the last one is eos: frames = length - 1)
REJECTED_LENGTHS = [4, 6, 1, 5]
LENGTHS = CHOSEN_LENGTHS + REJECTED_LENGTHS  # trl's row order: chosen pairs, then rejected pairs
PROMPTS = [2, 1, 1, 3, 1, 2, 4, 1]  # context positions before each sequence's first target
T = max(p + n for p, n in zip(PROMPTS, LENGTHS))
V, G, VC = 13, 4, 7  # codec vocabulary, code groups, residual codebook size


def _case(seed=0):
    """One sequence per row: codebook-0 logits [2P, T, V] (a leaf), targets (IGNORE outside), the frames'
    residual logits [N, G-1, VC], codes [N, G] and state_index, and the reference's sums [2P]."""
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(2 * P, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.full((2 * P, T), IGNORE, dtype=torch.long)
    rows, positions = [], []
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
        targets[i, p:p + n] = torch.randint(0, V, (n,), generator=g)
        rows += [i] * (n - 1)
        positions += list(range(p, p + n - 1))
    state_index = (torch.tensor(rows), torch.tensor(positions))
    codes = torch.randint(0, VC, (len(rows), G), generator=g)
    codes[:, 0] = targets[state_index]
    residual_logits = (2 * torch.randn(len(rows), G - 1, VC, generator=g, dtype=torch.float64)).requires_grad_()
    ref_noise = 2 * torch.randn(2 * P, generator=g, dtype=torch.float64)
    return SimpleNamespace(logits=logits, targets=targets, state_index=state_index, codes=codes,
                           residual_logits=residual_logits, ref_noise=ref_noise)


def _packed(case, width=T + 6):
    """The same sequences (context and targets) packed first-fit into rows of ``width``, one free position
    between neighbours: logits gathered from the case's leaf (gradients reach it), sample_ids, state_index."""
    cursor, where = [], []
    for p, n in zip(PROMPTS, LENGTHS):
        r = next((k for k, used in enumerate(cursor) if used + p + n + 1 <= width), None)
        if r is None:
            r, _ = len(cursor), cursor.append(0)
        where.append((r, cursor[r]))
        cursor[r] += p + n + 1
    shape = (len(cursor), width)
    sample_ids = torch.full(shape, -1, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    src = torch.full(shape, 0, dtype=torch.long)  # flat index into the case's [2P * T] positions
    for i, ((r, start), p, n) in enumerate(zip(where, PROMPTS, LENGTHS)):
        sample_ids[r, start:start + p + n] = i
        targets[r, start:start + p + n] = case.targets[i, :p + n]
        src[r, start:start + p + n] = i * T + torch.arange(p + n)
    logits = case.logits.reshape(2 * P * T, V)[src.reshape(-1)].view(*shape, V)
    rows, positions = case.state_index
    starts = torch.tensor([where[i][1] for i in range(2 * P)])
    state_index = (torch.tensor([where[i][0] for i in rows.tolist()]), positions + starts[rows])
    return logits, targets, sample_ids, state_index


def _token_logprobs(case):
    """The per-token log-probabilities of the targets, 0 elsewhere: what trl's fused LM head returns."""
    picked = torch.log_softmax(case.logits, -1).gather(-1, case.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(case.targets != IGNORE, picked, torch.zeros_like(picked))


def _trl(case, ref, loss_types, loss_weights, beta, label_smoothing=0.0, pairs=None):
    """trl's DPOTrainer._compute_loss on the case's pairs (all, or the indices ``pairs``): (loss, metrics)."""
    pairs = list(range(P)) if pairs is None else pairs
    rows = pairs + [P + i for i in pairs]
    args = DPOConfig(output_dir="/tmp/unused_trl_out", use_cpu=True, bf16=False, report_to=[], beta=beta,
                     loss_type=loss_types, loss_weights=loss_weights, label_smoothing=label_smoothing,
                     precompute_ref_log_probs=True)
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.args = args
    trainer.accelerator = Accelerator(cpu=True)  # after the config: building one resets accelerate's state
    trainer.beta, trainer.label_smoothing, trainer.ld_alpha = args.beta, args.label_smoothing, args.ld_alpha
    trainer.loss_types, trainer.loss_weights = args.loss_type, args.loss_weights or [1.0] * len(args.loss_type)
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = args.f_divergence_type, args.f_alpha_divergence_coef
    trainer.precompute_ref_logps, trainer.use_weighting = args.precompute_ref_log_probs, args.use_weighting
    trainer.aux_loss_enabled, trainer._tp_size, trainer._total_train_tokens = False, 1, 0
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    log_probs = _token_logprobs(case)[rows]

    class Model(torch.nn.Module):  # the only stub: the forward that turns inputs into per-token log-probs
        def forward(self, **kwargs):
            zeros = torch.zeros_like(log_probs.detach())
            return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer.model = Model()
    completion = (case.targets[rows] != IGNORE).long()  # completion_mask[:, 1:] is trl's label mask
    completion = torch.cat([torch.zeros(len(rows), 1, dtype=torch.long), completion], dim=1)
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": ref[pairs],
              "ref_rejected_logps": ref[[P + i for i in pairs]]}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _ours(case, layout, codebooks="first"):
    if layout == "rows":
        return sequence_logprobs(case.logits, case.targets, codebooks=codebooks, residual_logits=case.residual_logits,
                                 codes=case.codes, state_index=case.state_index)
    logits, targets, sample_ids, state_index = _packed(case)
    return sequence_logprobs(logits, targets, sample_ids=sample_ids, codebooks=codebooks,
                             residual_logits=case.residual_logits, codes=case.codes, state_index=state_index)


def _reference_sums(case):
    return _token_logprobs(case).detach().sum(-1) + case.ref_noise


@pytest.mark.parametrize("layout", ["rows", "packed"])
@pytest.mark.parametrize("sft_weight", [0.0, 0.3])
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trl(loss_type, beta, sft_weight, layout):
    case = _case()
    ref = _reference_sums(case)
    loss_types, weights = ([loss_type, "sft"], [1.0, sft_weight]) if sft_weight else ([loss_type], None)
    expected, metrics = _trl(case, ref, loss_types, weights, beta)
    (expected_grad,) = torch.autograd.grad(expected, case.logits)
    sums, counts = _ours(case, layout)
    assert counts.tolist() == LENGTHS
    terms = dpo_loss(sums[:P], sums[P:], ref[:P], ref[P:], beta, loss_type=loss_type, chosen_lengths=counts[:P],
                     rejected_lengths=counts[P:], sft_weight=sft_weight)
    ours = terms.loss()
    (grad,) = torch.autograd.grad(ours, case.logits)
    assert_close(ours, expected, rtol=0, atol=1e-6)
    assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    assert expected_grad.abs().max() > 1e-3
    logged = dict(chosen_rewards="rewards/chosen", rejected_rewards="rewards/rejected",
                  reward_accuracy="rewards/accuracies", reward_margin="rewards/margins",
                  chosen_logps="logps/chosen", rejected_logps="logps/rejected")
    for ours_name, trl_name in logged.items():
        assert getattr(terms, ours_name).mean().item() == pytest.approx(metrics[trl_name][0], abs=1e-9), ours_name
    assert 0 < terms.reward_accuracy.mean() < 1  # both signs of the margin occur
    report = terms.report()
    assert report["rewards_margin"][0] / report["rewards_margin"][1] == pytest.approx(metrics["rewards/margins"][0])
    if sft_weight:
        nll = -(_token_logprobs(case)[:P].sum() / sum(CHOSEN_LENGTHS))
        assert report["loss_sft"][0] / report["loss_sft"][1] == pytest.approx(nll.item(), abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_robust_equals_trl(label_smoothing, beta):
    case = _case(seed=1)
    ref = _reference_sums(case)
    expected, _ = _trl(case, ref, ["robust"], None, beta, label_smoothing)
    (expected_grad,) = torch.autograd.grad(expected, case.logits)
    sums, _ = _ours(case, "packed")
    ours = dpo_loss(sums[:P], sums[P:], ref[:P], ref[P:], beta, "robust", label_smoothing).loss()
    assert_close(ours, expected, rtol=0, atol=1e-6)
    assert_close(torch.autograd.grad(ours, case.logits)[0], expected_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_sigmoid_label_smoothing_equals_trl_aot_per_pair(label_smoothing, beta):
    """trl 1.16's "sigmoid" has no label smoothing; its "aot" loss is the cDPO formula of the sorted log-ratio
    differences, which for one pair is the pair's own d: one trl call per pair."""
    case = _case(seed=2)
    ref = _reference_sums(case)
    sums, _ = _ours(case, "rows")
    terms = dpo_loss(sums[:P], sums[P:], ref[:P], ref[P:], beta, "sigmoid", label_smoothing)
    for i in range(P):
        expected, _ = _trl(case, ref, ["aot"], None, beta, label_smoothing, pairs=[i])
        (expected_grad,) = torch.autograd.grad(expected, case.logits)
        assert_close(terms.losses[i], expected, rtol=0, atol=1e-6)
        (grad,) = torch.autograd.grad(terms.losses[i], case.logits, retain_graph=True)
        assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    plain = dpo_loss(sums[:P], sums[P:], ref[:P], ref[P:], beta, "sigmoid").losses
    assert (terms.losses - plain).abs().min() > 1e-4  # the smoothing changes every pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_zero_policy_equals_reference(dtype):
    case = _case(seed=3)
    sums, _ = _ours(case, "rows", codebooks="all")
    sums = sums.to(dtype)
    terms = dpo_loss(sums[:P], sums[P:], sums[:P].detach(), sums[P:].detach(), 0.1)
    assert terms.losses.dtype == dtype
    assert torch.equal(terms.losses, torch.full((P,), math.log(2), dtype=dtype))
    for value in (terms.chosen_rewards, terms.rejected_rewards, terms.reward_margin, terms.reward_accuracy):
        assert torch.equal(value, torch.zeros_like(value))
    pi = torch.zeros(2, P, dtype=torch.float64, requires_grad=True)  # d loss / d pi_c = -beta sigmoid(0) = -beta/2
    grad = torch.autograd.grad(dpo_loss(pi[0], pi[1], pi[0].detach(), pi[1].detach(), 0.1).losses.sum(), pi)[0]
    assert torch.equal(grad, torch.tensor([[-0.05] * P, [0.05] * P], dtype=torch.float64))


def _direct(case, codebooks):
    """Per-sequence sums written out: log_softmax, gather, sum, one sequence and one frame at a time."""
    out = []
    rows, positions = case.state_index
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
        total = sum(torch.log_softmax(case.logits[i, t], -1)[case.targets[i, t]] for t in range(p, p + n))
        if codebooks == "all":
            for k in (rows == i).nonzero().flatten().tolist():
                total = total + sum(torch.log_softmax(case.residual_logits[k, j - 1], -1)[case.codes[k, j]]
                                    for j in range(1, G))
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("codebooks", ["first", "all"])
def test_sequence_logprobs_direct_and_packed(codebooks):
    case = _case(seed=4)
    expected = _direct(case, codebooks)
    rows_sums, rows_counts = _ours(case, "rows", codebooks)
    packed_sums, packed_counts = _ours(case, "packed", codebooks)
    assert _packed(case)[2].shape[0] < 2 * P  # several sequences share a row
    assert_close(rows_sums, expected, rtol=0, atol=1e-12)
    assert_close(packed_sums, rows_sums, rtol=0, atol=1e-12)
    frames = [n - 1 for n in LENGTHS]
    counts = [n + (G - 1) * f for n, f in zip(LENGTHS, frames)] if codebooks == "all" else LENGTHS
    assert rows_counts.tolist() == packed_counts.tolist() == counts
    # gradients through both layouts agree (the packed logits are gathered from the same leaf)
    leaves = [case.logits, case.residual_logits] if codebooks == "all" else [case.logits]
    g_rows = torch.autograd.grad(rows_sums.sum(), leaves)
    g_packed = torch.autograd.grad(packed_sums.sum(), leaves)
    for a, b in zip(g_rows, g_packed):
        assert_close(a, b, rtol=0, atol=1e-12)


def test_sequence_logprobs_mask_dtype_and_count():
    case = _case(seed=5)
    mask = case.targets != IGNORE
    mask[2] = False  # sequence 2 left out: its codebook-0 targets and its frames
    sums, counts = sequence_logprobs(case.logits, case.targets, mask, codebooks="all",
                                     residual_logits=case.residual_logits, codes=case.codes,
                                     state_index=case.state_index)
    full, _ = _ours(case, "rows", "all")
    assert sums[2] == 0 and counts[2] == 0
    keep = torch.arange(2 * P) != 2
    assert_close(sums[keep], full[keep].detach(), rtol=0, atol=1e-12)
    # bf16 logits are summed in fp32; fp64 stays fp64; packed ids with a gap give zero sequences at the end
    logits, targets, sample_ids, _ = _packed(case)
    assert sequence_logprobs(logits.detach().bfloat16(), targets, sample_ids=sample_ids)[0].dtype == torch.float32
    assert sequence_logprobs(logits, targets, sample_ids=sample_ids)[0].dtype == torch.float64
    wide, wide_counts = sequence_logprobs(logits, targets, sample_ids=sample_ids, num_sequences=2 * P + 2)
    assert wide.shape == (2 * P + 2,) and wide_counts[-2:].tolist() == [0, 0]


def test_rewards_by_hand():
    pi_c, pi_r = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -15.0, -5.0])
    ref_c, ref_r = torch.tensor([-11.0, -21.0, -6.0]), torch.tensor([-11.0, -17.0, -4.0])
    terms = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    assert terms.chosen_rewards.tolist() == [0.5, 0.5, 0.5]
    assert terms.rejected_rewards.tolist() == [-0.5, 1.0, -0.5]
    assert terms.reward_accuracy.tolist() == [1.0, 0.0, 1.0]
    assert terms.reward_margin.tolist() == [1.0, -0.5, 1.0]
    assert terms.losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5)),
                                                   math.log1p(math.exp(-1.0))], abs=1e-6)
    report = terms.report()
    assert report["rewards_accuracy"].tolist() == [2.0, 3.0]
    assert report["rewards_margin"].tolist() == [1.5, 3.0]
    assert terms.chosen_logps.tolist() == pi_c.tolist() and terms.rejected_logps.tolist() == pi_r.tolist()
    ipo = dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5, "ipo", chosen_lengths=torch.tensor([2, 4, 1]),
                   rejected_lengths=torch.tensor([1, 2, 1]))
    assert ipo.losses.tolist() == pytest.approx([(0.5 + 1 - 1) ** 2, (0.25 - 1 - 1) ** 2, (1 + 1 - 1) ** 2])


def test_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, 0.1, "hinge")
    with pytest.raises(ValueError, match="rejected_lengths"):
        dpo_loss(x, x, x, x, 0.1, "ipo", chosen_lengths=torch.ones(2))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, 0.1, sft_weight=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, "robust", label_smoothing=0.5)
    case = _case()
    with pytest.raises(ValueError, match="residual_logits"):
        sequence_logprobs(case.logits, case.targets, codebooks="all")
    with pytest.raises(ValueError, match="codebooks"):
        sequence_logprobs(case.logits, case.targets, codebooks="residual")
