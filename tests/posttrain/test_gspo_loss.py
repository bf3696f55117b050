"""GSPO's loss against trl's GRPOTrainer._compute_loss on the same per-token log-probabilities, masks and
advantages (trl's sequences padded one per row, ours packed several per row), value and gradient, float64;
GSPO-token against its formula and against GSPO; group advantages against trl's formula and nanstd."""

import math

import pytest
import torch
from accelerate import Accelerator
from torch.testing import assert_close
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd

from omni_train.losses.gspo import group_advantages, gspo_loss, sequence_index, token_entropy

LENGTHS = [5, 3, 7, 1, 4, 6]  # completion lengths of 6 responses (3 prompts x 2)
T = max(LENGTHS)


def _case(seed=0, spread=1e-3):
    g = torch.Generator().manual_seed(seed)
    n = len(LENGTHS)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        mask[i, :length] = 1
    theta = (-3 * torch.rand(n, T, generator=g, dtype=torch.float64)).requires_grad_()
    old = theta.detach() + spread * torch.randn(n, T, generator=g, dtype=torch.float64)
    ref = theta.detach() + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    return theta, old, ref, advantages, mask


def _trl_loss(theta, old, ref, advantages, mask, level, beta, eps_low, eps_high, bias_correction=True):
    args = GRPOConfig(output_dir="/tmp/unused_trl_out", importance_sampling_level=level, loss_type="grpo",
                      epsilon=eps_low, epsilon_high=eps_high, beta=beta, report_to=[], use_cpu=True, bf16=False,
                      use_bias_correction_kl=bias_correction)
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.args = args
    for name in ("importance_sampling_level", "loss_type", "epsilon_low", "epsilon_high", "beta",
                 "top_entropy_quantile", "off_policy_mask_threshold", "use_vllm",
                 "vllm_importance_sampling_correction"):
        setattr(trainer, name, getattr(args, name) if hasattr(args, name) else None)
    trainer.epsilon_low, trainer.epsilon_high = eps_low, eps_high
    trainer.model = torch.nn.Linear(1, 1)  # only .training is read
    trainer.accelerator = Accelerator(cpu=True)
    trainer.current_gradient_accumulation_steps = 1
    trainer._entropy_bonus_enabled = False
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": __import__("collections").defaultdict(list),
                        "eval": __import__("collections").defaultdict(list)}
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (theta, torch.zeros_like(theta), None)
    n = theta.shape[0]
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.zeros(n, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old}
    if beta:
        inputs["ref_per_token_logps"] = ref
    return trainer._compute_loss(trainer.model, inputs), trainer._metrics["train"]


def _packed(theta, old, ref, advantages, mask, width=9):
    """The same sequences packed first-fit into rows of ``width`` (with a 1-token gap before each, as a
    prompt would leave): ours' layout. Returns packed tensors and the SequenceIndex."""
    rows, cursor, where = [], [], []
    for i, length in enumerate(LENGTHS):
        need = length + 1
        r = next((k for k, used in enumerate(cursor) if used + need <= width), None)
        if r is None:
            r = len(cursor)
            cursor.append(0)
        where.append((r, cursor[r] + 1))
        cursor[r] += need
    shape = (len(cursor), width)
    sample_ids = torch.full(shape, -1, dtype=torch.long)
    pack_mask = torch.zeros(shape, dtype=torch.bool)
    rr, cc, src_r, src_c = [], [], [], []
    for i, (r, c) in enumerate(where):
        for t in range(LENGTHS[i]):
            rr.append(r), cc.append(c + t), src_r.append(i), src_c.append(t)
        sample_ids[r, c:c + LENGTHS[i]] = i
        pack_mask[r, c:c + LENGTHS[i]] = True
    rr, cc, src = torch.tensor(rr), torch.tensor(cc), (torch.tensor(src_r), torch.tensor(src_c))

    def put(x, fill=0.0):
        return torch.full(shape, fill, dtype=x.dtype).index_put((rr, cc), x[src])

    adv_tokens = put(advantages.unsqueeze(1).expand(-1, T).contiguous())
    return put(theta), put(old, fill=123.0), put(ref), adv_tokens, sequence_index(sample_ids, pack_mask)


@pytest.mark.parametrize("beta,bias_correction", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("level,eps_low,eps_high,spread", [
    ("sequence", 3e-4, 4e-4, 3e-3),  # the paper's clip range: some sequences clipped, some not
    ("sequence", 0.2, 0.28, 0.3),
    ("token", 0.2, 0.28, 0.3),
])
def test_gspo_equals_trl(level, eps_low, eps_high, spread, beta, bias_correction):
    theta, old, ref, advantages, mask = _case(spread=spread)
    expected, metrics = _trl_loss(theta, old, ref, advantages, mask, level, beta, eps_low, eps_high, bias_correction)
    (expected_grad,) = torch.autograd.grad(expected, theta)
    logp, old_p, ref_p, adv, seq = _packed(theta, old, ref, advantages, mask)
    terms = gspo_loss(logp, old_p, adv, seq, eps_low, eps_high, level=level,
                      ref_logprobs=ref_p if beta else None, beta=beta, kl_bias_correction=bias_correction)
    ours = terms.loss_sum / seq.count
    (grad,) = torch.autograd.grad(ours, theta)
    assert_close(ours, expected, rtol=0, atol=1e-6)
    assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    assert expected_grad.abs().max() > 1e-3  # a gradient that could be wrong
    # the share of clipped sequences, as trl logs it (its region mean over sequences at the sequence level)
    if level == "sequence":
        assert terms.clipped.mean().item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-12)
        if eps_low < 1e-3:
            assert 0 < terms.clipped.mean().item() < 1
    if beta:
        assert terms.kl.mean().item() == pytest.approx(
            ((((ref - theta).exp() - (ref - theta) - 1) * mask).sum(-1) / mask.sum(-1)).mean().item(), rel=1e-9)


def test_first_minibatch_ratio_is_exactly_one():
    theta, _, _, advantages, mask = _case()
    logp, _, _, adv, seq = _packed(theta, theta.detach(), theta.detach(), advantages, mask)
    for level in ("sequence", "sequence_token", "token"):
        terms = gspo_loss(logp, logp.detach(), adv, seq, 3e-4, 4e-4, level=level)
        assert torch.equal(terms.ratio, torch.ones_like(terms.ratio))
        assert terms.clipped.sum() == 0


def test_gspo_token_formula_and_equivalence():
    theta, old, _, advantages, mask = _case(spread=0.01)
    logp, old_p, _, adv, seq = _packed(theta, old, old, advantages, mask)
    # one advantage per sequence: GSPO-token's value and gradient are GSPO's
    seq_terms = gspo_loss(logp, old_p, adv, seq, 0.2, 0.28, level="sequence")
    tok_terms = gspo_loss(logp, old_p, adv, seq, 0.2, 0.28, level="sequence_token")
    g_seq = torch.autograd.grad(seq_terms.loss_sum, theta, retain_graph=True)[0]
    g_tok = torch.autograd.grad(tok_terms.loss_sum, theta, retain_graph=True)[0]
    assert_close(tok_terms.loss_sum, seq_terms.loss_sum, rtol=0, atol=1e-12)
    assert_close(g_tok, g_seq, rtol=0, atol=1e-12)
    # per-token advantages: the formula written per sequence on the unpacked tensors
    g = torch.Generator().manual_seed(3)
    token_adv = torch.randn(theta.shape, generator=g, dtype=torch.float64)
    adv_tok, *_ = _packed(token_adv, old, old, advantages, mask)  # per-token values in the packed layout
    terms = gspo_loss(logp, old_p, adv_tok, seq, 0.2, 0.28, level="sequence_token")
    expected = 0.0
    for i, length in enumerate(LENGTHS):
        lp, op, a = theta[i, :length], old[i, :length], token_adv[i, :length]
        s_i = torch.exp((lp - op).mean()).detach()
        s_it = s_i * torch.exp(lp - lp.detach())
        expected = expected - torch.minimum(s_it * a, s_it.clamp(0.8, 1.28) * a).mean()
    assert_close(terms.loss_sum, expected, rtol=0, atol=1e-12)
    assert_close(torch.autograd.grad(terms.loss_sum, theta)[0], torch.autograd.grad(expected, theta)[0],
                 rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trls_formula(scale):
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(12, generator=g, dtype=torch.float64)
    rewards[4:8] = 0.5  # a group with no signal: advantage 0
    rewards[9] = float("nan")  # a failed sample: left out of its group's statistics
    adv, std = group_advantages(rewards, 4, scale=scale)
    grouped = rewards.view(-1, 4)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(4)
    ref_std = (nanstd(grouped, dim=1).repeat_interleave(4) if scale != "batch"
               else nanstd(rewards).expand_as(rewards))
    expected = rewards - mean
    if scale != "none":
        expected = expected / (ref_std + 1e-4)
    # trl's nanstd divides two integer counts (float32): 1e-8 apart from the float64 correction
    assert_close(adv, expected, rtol=0, atol=1e-7, equal_nan=True)
    assert math.isnan(adv[9]) and torch.all(adv[4:8] == 0)


def test_token_entropy():
    g = torch.Generator().manual_seed(2)
    logits = 4 * torch.randn(2, 5, 11, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    for temperature in (1.0, 2.0):
        p = torch.log_softmax(logits.double() / temperature, -1)
        expected = -(p.exp() * p).sum(-1) * mask
        got = token_entropy(logits, mask, temperature=temperature, chunk_tokens=3, group=None)
        assert_close(got.double(), expected, rtol=0, atol=1e-5)
