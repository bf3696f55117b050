"""Off-policy distillation's pieces: the top-k logit term against trl's generalized_jsd_loss (beta=0,
forward KL) on the same K+1 outcomes, vocabulary split over 2 tensor-parallel ranks against one, and the
rules that choose and align a sample's teacher response."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from trl.experimental.gkd.gkd_trainer import GKDTrainer

from tests.conftest import free_port
from omni_train.config.schema import ResponsesConfig
from omni_train.data.chat import ChatEncoder
from omni_train.data.errors import SampleError
from omni_train.data.responses import encode_with_responses, pick_teacher, with_teacher_turns
from omni_train.losses.distill import _tail_log, student_log_probs, top_k_kl

B, L, V, K = 2, 7, 50, 5


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, L, V, generator=g, dtype=torch.float64)
    teacher_logits = 3 * torch.randn(B, L, V, generator=g, dtype=torch.float64)
    top_logprobs, top_ids = torch.log_softmax(teacher_logits, -1).topk(K, dim=-1)
    mask = torch.rand(B, L, generator=g) > 0.3
    return logits, top_ids, top_logprobs, mask


def test_top_k_kl_equals_trl_generalized_jsd_forward_kl():
    logits, top_ids, top_logprobs, mask = _case()
    ours = top_k_kl(logits, top_ids, top_logprobs, mask, group=None)
    # trl on the coarsened K+1 outcomes: the top-k tokens, then everything else
    student = student_log_probs(logits, top_ids)
    student_k1 = torch.cat([student, _tail_log(student)[..., None]], -1)
    teacher_k1 = torch.cat([top_logprobs, _tail_log(top_logprobs)[..., None]], -1)
    labels = torch.where(mask, 0, -100)
    reference = GKDTrainer.generalized_jsd_loss(student_k1, teacher_k1, labels=labels, beta=0.0, temperature=1.0,
                                                reduction="batchmean")
    assert abs(ours.sum() / mask.sum() - reference).item() <= 1e-6
    assert (ours[~mask] == 0).all() and (ours[mask] > 0).all()


def test_top_k_kl_gradient_and_zero_at_the_teacher():
    _, top_ids, top_logprobs, mask = _case(1)
    teacher_full = torch.full((B, L, V), -30.0, dtype=torch.float64)  # the student becomes the teacher
    tail = torch.log(-torch.expm1(torch.logsumexp(top_logprobs, -1)) / (V - K))
    teacher_full[:] = tail[..., None]
    teacher_full.scatter_(-1, top_ids, top_logprobs)
    assert top_k_kl(teacher_full, top_ids, top_logprobs, mask, group=None).abs().max() < 1e-9
    logits = torch.randn(1, 3, V, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: top_k_kl(x, top_ids[:1, :3], top_logprobs[:1, :3], mask[:1, :3],
                                                 group=None).sum(), (logits,))


def _tp2(rank, port, queue):
    import os

    from megatron.core import parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    logits, top_ids, top_logprobs, mask = _case()
    shard = logits[..., rank * V // 2:(rank + 1) * V // 2].clone().requires_grad_(True)
    kl = top_k_kl(shard, top_ids, top_logprobs, mask)
    kl.sum().backward()
    queue.put((rank, kl.detach(), shard.grad))
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def test_vocab_split_over_two_ranks_equals_one():
    logits, top_ids, top_logprobs, mask = _case()
    whole = logits.clone().requires_grad_(True)
    expected = top_k_kl(whole, top_ids, top_logprobs, mask, group=None)
    expected.sum().backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_tp2, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (kl, grad)) for r, kl, grad in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    for rank, (kl, grad) in results.items():
        torch.testing.assert_close(kl, expected.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, whole.grad[..., rank * V // 2:(rank + 1) * V // 2], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- choosing responses
def _msg(role, text):
    return {"role": role, "content": text}


def test_teacher_turns_fill_the_last_slots():
    history = [_msg("user", "a"), _msg("assistant", "A"), _msg("user", "b"), _msg("assistant", "B")]
    t1, t2 = _msg("assistant", "T1"), _msg("assistant", "T2")
    assert with_teacher_turns(history, [t2]) == history[:3] + [t2]
    assert with_teacher_turns(history, [t1, t2]) == [history[0], t1, history[2], t2]
    assert with_teacher_turns(history[:3], [t2]) == history[:3] + [t2]  # a prompt ending with the user turn
    with pytest.raises(SampleError, match="3 teacher turns for 2 assistant slots"):
        with_teacher_turns(history, [t1, t2, t2], key="s1")
    with pytest.raises(SampleError, match="must be assistant turns"):
        with_teacher_turns(history, [_msg("user", "x")], key="s1")


def test_teacher_choice_filters_picks_and_drops_truncated():
    entries = [{"model": "big", "mode": "think", "messages": [_msg("assistant", "1")]},
               {"model": "big", "mode": "no_think", "messages": [_msg("assistant", "2")]},
               {"model": "small", "mode": "no_think", "finish_reason": "length", "messages": [_msg("assistant", "3")]}]
    sample = {"__key__": "s7", "messages": [_msg("user", "q")], "teacher": entries}
    cfg = ResponsesConfig(source="teacher", modes=["no_think"])
    assert pick_teacher(sample, cfg, 0) is entries[1]
    with pytest.raises(SampleError, match="s7.*stopped at its length limit"):
        pick_teacher(sample, ResponsesConfig(source="teacher", teachers=["small"]), 0)
    with pytest.raises(SampleError, match="no teacher response"):
        pick_teacher(sample, ResponsesConfig(source="teacher", teachers=["other"]), 0)
    random = ResponsesConfig(source="teacher", teachers=["big"], pick="random")
    picks = {pick_teacher({**sample, "__key__": f"s{i}"}, random, 0)["mode"] for i in range(20)}
    assert picks == {"think", "no_think"}
    assert all(pick_teacher({**sample, "__key__": f"s{i}"}, random, 0) is
               pick_teacher({**sample, "__key__": f"s{i}"}, random, 0) for i in range(20))


def test_top_logprobs_align_with_the_rendered_response(posttrain_root):
    encoder = ChatEncoder.from_pretrained(str(posttrain_root / "tokenizer"), think="keep")
    answer = "Forty two."
    tokens = encoder.tokenizer(answer, add_special_tokens=False)["input_ids"] + [encoder.ids["im_end"]]
    n = len(tokens)
    ids = np.stack([np.array(tokens), (np.array(tokens) + 1) % 500], 1).astype(np.int32)
    logprobs = np.log(np.tile([[0.9, 0.05]], (n, 1))).astype(np.float32)
    entry = {"model": "t", "mode": "no_think", "messages": [_msg("assistant", answer)],
             "logprobs": {"tokens": "teacher0_tokens.npy", "top_ids": "teacher0_top_ids.npy",
                          "top_logprobs": "teacher0_top_logprobs.npy"}}
    media = {"teacher0_tokens.npy": np.array(tokens, np.int32), "teacher0_top_ids.npy": ids,
             "teacher0_top_logprobs.npy": logprobs}
    sample = {"__key__": "s3", "messages": [_msg("user", "What is six times seven?")], "teacher": [entry],
              "media": media}
    cfg = ResponsesConfig(source="teacher", top_logprobs=2)
    encoded = encode_with_responses(sample, encoder, cfg, 0)
    top = encoded.top_logprobs
    # the no-think answer follows the empty block that keep renders: only the generated tokens have rows
    assert top["mask"].sum() == n and encoded.input_ids[top["mask"]].tolist() == tokens
    assert (top["ids"][top["mask"]] == ids).all() and np.allclose(top["logprobs"][top["mask"]], logprobs)
    assert encoder.tokenizer.decode(encoded.input_ids[encoded.loss_mask]).startswith("<think>\n\n</think>")
    # the turn trains on the teacher's own ids, even where they are not the canonical tokenization
    vocab = encoder.tokenizer.convert_ids_to_tokens(tokens)
    i = next(j for j, t in enumerate(vocab) if len(t) > 1)  # a merged token, given as its single bytes
    split = tokens[:i] + encoder.tokenizer.convert_tokens_to_ids(list(vocab[i])) + tokens[i + 1:]
    assert len(split) > n and encoder.tokenizer.decode(split) == encoder.tokenizer.decode(tokens)
    odd = {**media, "teacher0_tokens.npy": np.array(split, np.int32),
           "teacher0_top_ids.npy": np.resize(ids, (len(split), 2)), "teacher0_top_logprobs.npy":
           np.resize(logprobs, (len(split), 2))}
    encoded = encode_with_responses({**sample, "media": odd}, encoder, cfg, 0)
    assert encoded.input_ids[encoded.top_logprobs["mask"]].tolist() == split
    cut = {**media, "teacher0_tokens.npy": np.array(tokens[:-1], np.int32),
           "teacher0_top_ids.npy": ids[:-1], "teacher0_top_logprobs.npy": logprobs[:-1]}
    with pytest.raises(SampleError, match="s3.*not the end of the rendered response"):
        encode_with_responses({**sample, "media": cut}, encoder, cfg, 0)  # no <|im_end|>: cut short
    with pytest.raises(SampleError, match="stores top-2, data.responses.top_logprobs=3"):
        encode_with_responses(sample, encoder, ResponsesConfig(source="teacher", top_logprobs=3), 0)
    nan = {**media, "teacher0_top_logprobs.npy": np.full_like(logprobs, np.nan)}
    with pytest.raises(SampleError, match="finite"):
        encode_with_responses({**sample, "media": nan}, encoder, cfg, 0)
