"""On-policy distillation's losses: the full-vocabulary divergences against trl's generalized_jsd_loss and
against the same formulas written out on whole tensors (chunked, shared vocabulary, gradients), the
vocabulary split over 2 tensor-parallel ranks against one; the sampled-token advantage and loss against
their formulas. All in float64."""

import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

from tests.conftest import free_port
from omni_train.losses.onpolicy import (full_vocab_divergence, sampled_token_advantage, sampled_token_loss,
                                        token_logprobs)

B, L, V = 2, 7, 40
# (divergence, beta) of each kind: beta only matters to "jsd"
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


def _case(seed=0, v_teacher=V):
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(B, L, V, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(B, L, v_teacher, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[0, 0], mask[1, -1] = False, True
    weights = torch.rand(B, L, generator=g, dtype=torch.float64)  # a distinct upstream gradient per position
    return student, teacher, mask, weights


def _by_hand(student, teacher, divergence, beta, temperature):
    """The divergences written out on whole [B, L, V] tensors; autograd gives their gradient."""
    s, t = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)
    p, q = s.exp(), t.exp()
    if divergence == "forward_kl":
        return (q * (t - s)).sum(-1)
    if divergence == "reverse_kl":
        return (p * (s - t)).sum(-1)
    log_m = torch.log((1 - beta) * p + beta * q)
    return beta * (q * (t - log_m)).sum(-1) + (1 - beta) * (p * (s - log_m)).sum(-1)


def _value_and_grad(fn, student, weights):
    x = student.clone().requires_grad_(True)
    value = fn(x)
    (value * weights).sum().backward()
    return value.detach(), x.grad


# ------------------------------------------------------------------------------ full-vocabulary divergence
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.0), ("jsd", 0.5), ("reverse_kl", 1.0)])
def test_equals_trl_generalized_jsd(divergence, beta, temperature):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer  # here: the tp=2 workers import this module, trl ~9 s

    student, teacher, mask, _ = _case()
    ours = full_vocab_divergence(student, teacher, mask, divergence, beta, temperature, group=None)
    labels = torch.where(mask, 0, -100)
    batchmean = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta,
                                                temperature=temperature, reduction="batchmean")
    per_position = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta,
                                                   temperature=temperature, reduction="none").sum(-1)
    assert abs(ours.sum() / mask.sum() - batchmean).item() <= 1e-6  # measured ~1e-16 (float64)
    assert_close(ours[mask], per_position, rtol=0, atol=1e-12)
    assert (ours[~mask] == 0).all() and (ours[mask] > 0).all()


@pytest.mark.parametrize("beta, kl", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_end_points_are_the_kls(beta, kl):
    student, teacher, mask, _ = _case(1)
    jsd = full_vocab_divergence(student, teacher, mask, "jsd", beta, group=None)
    assert torch.equal(jsd, full_vocab_divergence(student, teacher, mask, kl, group=None))
    assert not torch.allclose(full_vocab_divergence(student, teacher, mask, "forward_kl", group=None),
                              full_vocab_divergence(student, teacher, mask, "reverse_kl", group=None))
    with pytest.raises(ValueError, match="0 <= beta <= 1"):
        full_vocab_divergence(student, teacher, mask, "jsd", 1.5, group=None)


@pytest.mark.parametrize("divergence, beta", KINDS)
def test_chunked_equals_unchunked_and_the_formula(divergence, beta):
    student, teacher, mask, weights = _case(2)
    chunked = _value_and_grad(lambda x: full_vocab_divergence(x, teacher, mask, divergence, beta, 1.5,
                                                              chunk_tokens=3, group=None), student, weights)
    whole = _value_and_grad(lambda x: full_vocab_divergence(x, teacher, mask, divergence, beta, 1.5,
                                                            group=None), student, weights)
    for a, b in zip(chunked, whole):
        assert_close(a, b, rtol=0, atol=1e-10)
    formula = _value_and_grad(lambda x: _by_hand(x, teacher, divergence, beta, 1.5) * mask, student, weights)
    for a, b in zip(chunked, formula):
        assert_close(a, b, rtol=1e-10, atol=1e-12)
    grad = chunked[1]
    assert (grad[~mask] == 0).all() and (grad[mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("shared_vocab", [None, 5])
@pytest.mark.parametrize("divergence, beta", KINDS)
def test_gradcheck(divergence, beta, shared_vocab):
    g = torch.Generator().manual_seed(3)
    student = torch.randn(1, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 5, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda x: full_vocab_divergence(x, teacher, mask, divergence, beta, 1.7, chunk_tokens=2,
                                        shared_vocab=shared_vocab, group=None), (student,))


@pytest.mark.parametrize("divergence, beta", KINDS)
def test_shared_vocab_renormalises_over_the_shared_ids(divergence, beta):
    shared = 29
    student, teacher, mask, weights = _case(4, v_teacher=33)
    value, grad = _value_and_grad(lambda x: full_vocab_divergence(x, teacher, mask, divergence, beta, 2.0,
                                                                  chunk_tokens=4, shared_vocab=shared, group=None),
                                  student, weights)
    expected, expected_grad = _value_and_grad(
        lambda x: _by_hand(x, teacher[..., :shared], divergence, beta, 2.0) * mask, student[..., :shared], weights)
    assert_close(value, expected, rtol=1e-10, atol=1e-12)
    assert_close(grad[..., :shared], expected_grad, rtol=1e-10, atol=1e-12)
    assert (grad[..., shared:] == 0).all()
    with pytest.raises(ValueError, match="pass shared_vocab"):
        full_vocab_divergence(student, teacher, mask, divergence, beta, group=None)


# ------------------------------------------------------------------------------------- sampled-token form
def _rollout_case():
    student, teacher, mask, _ = _case(5)
    g = torch.Generator().manual_seed(6)
    rollout = student + 0.1 * torch.randn(student.shape, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, L), generator=g)
    return student, teacher, rollout, ids, mask


def _gathered(logits, ids, temperature=1.0):
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def test_sampled_token_advantage_and_loss_follow_their_formulas():
    student, teacher, rollout, ids, mask = _rollout_case()
    s = token_logprobs(student, ids, temperature=2.0, group=None)
    t = token_logprobs(teacher, ids, temperature=2.0, group=None)
    assert_close(s, _gathered(student, ids, 2.0), rtol=0, atol=1e-12)
    assert not torch.allclose(s, _gathered(student, ids))  # the temperature is applied
    assert torch.isfinite(token_logprobs(student, torch.full_like(ids, -100), group=None)).all()  # labels' -100
    advantage = sampled_token_advantage(s, t)
    assert_close(advantage, _gathered(teacher, ids, 2.0) - _gathered(student, ids, 2.0), rtol=0, atol=1e-12)
    r = _gathered(rollout, ids, 2.0)
    loss = sampled_token_loss(s, r, advantage, mask)
    expected = -advantage * torch.exp(_gathered(student, ids, 2.0) - r)
    assert_close(loss[mask], expected[mask], rtol=1e-12, atol=1e-12)
    assert (loss[~mask] == 0).all() and (loss[mask] != 0).all()


def test_sampled_token_gradient_at_ratio_one_is_the_policy_gradient():
    student, teacher, _, ids, mask = _rollout_case()
    x = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    s = token_logprobs(x, ids, group=None)
    advantage = sampled_token_advantage(s, token_logprobs(teacher, ids, group=None))
    assert not advantage.requires_grad
    # the rollout's log-probs are the student's own (still on the graph: the loss must cut it), with
    # garbage at padding that must neither overflow nor leak into the gradient
    rollout = torch.where(mask, s, -1e4)
    loss = sampled_token_loss(s, rollout, advantage, mask)
    assert torch.equal(loss[mask], -advantage[mask])  # ratio exactly 1
    grad_x, grad_teacher = torch.autograd.grad(loss.sum(), (x, teacher), allow_unused=True)
    assert grad_teacher is None  # the advantage is a constant of the update
    y = student.clone().requires_grad_(True)
    (policy_gradient,) = torch.autograd.grad((-advantage * _gathered(y, ids) * mask).sum(), y)
    assert_close(grad_x, policy_gradient, rtol=0, atol=1e-12)
    assert torch.isfinite(grad_x).all() and (grad_x[~mask] == 0).all() and grad_x[mask].abs().sum() > 0


# ---------------------------------------------------------------------------------- tensor parallel, tp=2
# (divergence, beta, shared_vocab): shared 27 leaves rank 1 seven ids, shared 15 leaves it none
TP_CASES = [("reverse_kl", 0.5, None), ("jsd", 0.5, None), ("jsd", 0.5, 27), ("reverse_kl", 0.5, 15)]
TP_TEMPERATURE = 1.5


def _tp_outputs(student, teacher, ids, mask, weights, columns: slice) -> dict:
    """Values and student-logit gradients (of ``columns``) of each TP_CASE and of token_logprobs, with the
    process group found by ``group="auto"``."""
    out = {}
    for divergence, beta, shared in TP_CASES:
        out[divergence, beta, shared] = _value_and_grad(
            lambda x: full_vocab_divergence(x, teacher[..., columns], mask, divergence, beta, TP_TEMPERATURE,
                                            chunk_tokens=4, shared_vocab=shared), student[..., columns], weights)
    out["token_logprobs"] = _value_and_grad(lambda x: token_logprobs(x, ids, temperature=TP_TEMPERATURE),
                                            student[..., columns], weights)
    return out


def _tp2_worker(rank: int, port: int, queue):
    import os

    from megatron.core import parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        student, teacher, _, ids, mask = _rollout_case()
        weights = _case(5)[3]
        queue.put((rank, _tp_outputs(student, teacher, ids, mask, weights, slice(rank * V // 2, (rank + 1) * V // 2))))
        torch.distributed.barrier()
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tp2_outputs():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_tp2_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.mark.parametrize("case", TP_CASES + ["token_logprobs"], ids=str)
def test_vocab_split_over_two_ranks_equals_one(tp2_outputs, case):
    student, teacher, _, ids, mask = _rollout_case()
    weights = _case(5)[3]
    value, grad = _tp_outputs(student, teacher, ids, mask, weights, slice(None))[case]
    assert grad.abs().sum() > 0
    for rank, outputs in tp2_outputs.items():
        rank_value, rank_grad = outputs[case]
        assert_close(rank_value, value, rtol=1e-10, atol=1e-12)
        assert_close(rank_grad, grad[..., rank * V // 2:(rank + 1) * V // 2], rtol=1e-10, atol=1e-12)
